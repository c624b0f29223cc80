"""``mtx-dist verify``: check checkpoints and exports against their manifests, every recorded hash included."""

from __future__ import annotations

import argparse


def _targets(path: str) -> list[tuple[str, str]]:
    """(kind, directory) to check for a run directory, a checkpoint directory or an export directory."""
    import os

    from mtx_dist import checkpoint as ckpt
    from mtx_dist.export.common import MANIFEST_FILE

    if os.path.isfile(os.path.join(path, ckpt.MANIFEST)):
        return [("checkpoint", path)]
    if os.path.isfile(os.path.join(path, MANIFEST_FILE)) and not os.path.isdir(ckpt.checkpoint_root(path)):
        return [("export", path)]
    root = ckpt.checkpoint_root(path)
    out = []
    if os.path.isdir(root):  # every checkpoint directory, complete or not (an unfinished one is reported)
        out += [("checkpoint", os.path.join(root, t)) for t in sorted(os.listdir(root))
                if os.path.isdir(os.path.join(root, t))]
    if os.path.isfile(os.path.join(path, "export", MANIFEST_FILE)):
        out.append(("export", os.path.join(path, "export")))
    return out


def _run(args: argparse.Namespace) -> int:
    import os
    import sys

    from mtx_dist import checkpoint as ckpt
    from mtx_dist.export.common import ExportError, verify_export

    targets = _targets(args.path)
    if not targets:
        print(f"mtx-dist verify: {os.path.abspath(args.path)}: no checkpoint, export or run directory there",
              file=sys.stderr)
        return 2
    bad = 0
    for kind, path in targets:
        if path.endswith((ckpt.TMP_SUFFIX, ckpt.OLD_SUFFIX)):
            print(f"skip {kind} {path}: left by an interrupted save; never read, removed by the next save")
            continue
        try:
            if kind == "checkpoint":
                manifest = ckpt.validate(path, full=True)
                files = manifest["files"]
                hashed = sum("sha256" in m for m in files.values())
                note = "" if hashed == len(files) else (f"; sizes only for {len(files) - hashed} large files "
                                                        f"(saved with checkpoint.verify=size)")
                print(f"ok   checkpoint {path}: {len(files)} files, sha256 of {hashed} checked{note}")
            else:
                manifest = verify_export(path, require=None)
                print(f"ok   export {path}: {len(manifest['files'])} files, every sha256 checked, safetensors load")
        except (ckpt.CheckpointError, ExportError) as e:
            bad += 1
            print(f"BAD  {kind} {path}: {e}")
    return 1 if bad else 0


def register(sub) -> None:
    v = sub.add_parser("verify", help="check checkpoints and exports against their manifests (every hash)",
                       description="Check a run directory (all its checkpoints and its export), one checkpoint "
                                   "directory, or an export directory: every file present with its recorded size "
                                   "and sha256 (checkpoints saved with checkpoint.verify=full record the hash of "
                                   "every file; otherwise of the small ones), every .pt file loadable as data, "
                                   "every .safetensors file readable. Exit code 0 when all are good, 1 when one "
                                   "is not.")
    v.add_argument("path", help="run directory, checkpoint directory or export directory")
    v.set_defaults(func=_run)
