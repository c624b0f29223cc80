"""``mtx-dist train``: pretrain from a TOML config plus ``section.key=value`` overrides."""

from __future__ import annotations

import argparse

from mtx_dist.config import describe, load_cli_config

DEFAULT_CONFIG_HELP = "defaults = configs/tiny-cpu.toml (a CPU quickstart on generated demo shards)"


def _run(args: argparse.Namespace) -> int:
    if args.help_config:
        print(describe())
        return 0
    resume = [f"checkpoint.resume={args.resume}"] if args.resume else []
    cfg = load_cli_config(args.config, [*args.overrides, *resume])  # raises ConfigError before anything starts

    # Record preemption signals from here on: the imports below take seconds, and a SIGUSR1 from
    # SLURM in that window would otherwise kill the process instead of asking for a checkpoint.
    from mtx_launchers.signals import Preemption, parse_signals
    early = Preemption(parse_signals(cfg.run.preemption_signals)).install()

    from mtx_dist.trainer import train
    train(cfg, early)
    return 0


def register(sub) -> None:
    t = sub.add_parser("train", help="pretrain (no arguments: CPU quickstart on demo shards)",
                       description=f"Train. {DEFAULT_CONFIG_HELP}. Override any key with section.key=value.")
    t.add_argument("config", nargs="?", help="TOML config file (optional)")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the file")
    t.add_argument("--resume", metavar="latest|TAG", help="continue from a checkpoint of run.dir "
                   "('latest' starts fresh when there is none)")
    t.add_argument("--help-config", action="store_true", help="list every config key with its default")
    t.set_defaults(func=_run)
