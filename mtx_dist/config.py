"""The typed configuration tree: dataclasses, loaded from TOML, overridden with ``a.b.c=value``.

Validation happens here, before any process group starts. Every error names the key, the value
and what is allowed. The dataclass defaults are the quickstart (``configs/tiny-cpu.toml``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from mtx_kernels import BACKENDS as ATTENTION_BACKENDS
from mtx_launchers.signals import parse_signals
from mtx_dist.errors import UserError
from mtx_dist.devices import DEVICES
from mtx_dist.models.presets import GeometryError, ModelSpec, check_geometry, get_preset, is_config_path


class ConfigError(UserError, ValueError):
    """A configuration key or value that is not allowed."""

    label = "config error"


def _opt(default: Any, help: str, choices: tuple | None = None, min: float | None = None,
         max: float | None = None, key: str | None = None) -> Any:
    """A config key. ``key``: its name in TOML and on the command line when that is not a Python
    identifier (``checkpoint.async``, field ``async_``)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "key": key}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


option = _opt  # for typed sections outside this module (mtx_dist.adapt.config)


@dataclass
class RunConfig:
    dir: str = _opt("runs/quickstart", "run directory: checkpoints/ and export/ go here")
    name: str = _opt("", "run name shown in MLflow (default: the run directory's name)")
    steps: int = _opt(300, "optimizer steps to train in total", min=1)
    seed: int = _opt(0, "seed for initialization and the data stream", min=0)
    device: str = _opt("auto", "where to train: auto picks cuda when available", DEVICES)
    log_every: int = _opt(10, "steps between metric logs", min=1)
    eval_at_end: bool = _opt(True, "held-out retrieval on data.val at the end of training")
    export_at_end: bool = _opt(True, "export the encoder to <run.dir>/export at the end (Meta-Transformer blocks, "
                                "OpenCLIP, MLflow pyfunc)")
    preemption_signals: str = _opt("USR1,TERM", "signals that ask for a checkpoint and a clean stop (exit code "
                                   "75), comma-separated; '' = none handled")
    preemption_check_every: int = _opt(1, "steps between the all-ranks check for a preemption signal (one "
                                       "integer all-reduce)", min=1)
    compile: bool = _opt(False, "torch.compile the model inside the DeepSpeed engine (compile time is reported "
                         "apart from step time)")
    hang_watchdog: bool = _opt(True, "a rank on which no step completes within run.hang_timeout_s writes the stacks of "
                               "its threads to <run.dir>/hang-rank<N>.txt and exits with code 76 (rank 0 requeues "
                               "under SLURM when run.requeue)")
    hang_timeout_s: float = _opt(0.0, "seconds without a completed step before a rank counts as hung (below "
                                 "parallel.dist_timeout_s); 0 = auto: 20x the median step time, at least 300 s, at "
                                 "most 0.8x parallel.dist_timeout_s; always at least 3600 s for the first step, "
                                 "checkpoints, evaluation and export, and for every step with run.compile", min=0)
    requeue: bool = _opt(True, "after a preemption checkpoint under SLURM, rank 0 runs `scontrol requeue "
                         "$SLURM_JOB_ID` (the job restarts and resumes with --resume latest)")


@dataclass
class ModelConfig:
    preset: str = _opt("tiny", "model geometry: micro, tiny, vit-b16, vit-l14, an OpenCLIP ViT model name (ViT-B-32, "
                       "ViT-L-14-336, ViT-H-14, ViT-g-14, ViT-bigG-14, ...: open_clip_torch's model configs) or "
                       "the path of an open_clip_config.json")
    attention: str = _opt("auto", "attention backend (mtx_kernels.attention)", ATTENTION_BACKENDS)
    patch_dropout: float = _opt(0.0, "FLIP: fraction of each image's patch tokens dropped in training (a random "
                                "subset per sample; class token kept; never in evaluation or export)", min=0, max=0.95)
    patch_dropout_final_steps: int = _opt(0, "FLIP's unmasked tail: the last N training steps keep every patch",
                                          min=0)
    train_image_size: int = _opt(0, "low-resolution training (CLIPA): training images are shrunk to this side "
                                 "(a multiple of the patch size, below the preset's image size) and the position "
                                 "embeddings resampled to match; never in evaluation or export; 0 = full size",
                                 min=0)
    train_image_size_final_steps: int = _opt(0, "the full-resolution tail of low-resolution training: the last N "
                                             "training steps run at the preset's image size", min=0)
    # Custom geometry: each key replaces that value of the preset (0 = the preset's own).
    embed_dim: int = _opt(0, "width of the shared embedding both towers project to (0 = the preset's)", min=0)
    vision_image_size: int = _opt(0, "image side in pixels (0 = the preset's)", min=0, key="vision.image_size")
    vision_patch_size: int = _opt(0, "patch side in pixels (0 = the preset's)", min=0, key="vision.patch_size")
    vision_width: int = _opt(0, "image tower width (0 = the preset's)", min=0, key="vision.width")
    vision_layers: int = _opt(0, "image tower depth (0 = the preset's)", min=0, key="vision.layers")
    vision_heads: int = _opt(0, "image tower attention heads (0 = the preset's)", min=0, key="vision.heads")
    vision_mlp_ratio: float = _opt(0.0, "image tower MLP width / width (0 = the preset's)", min=0,
                                   key="vision.mlp_ratio")
    text_context_length: int = _opt(0, "text tokens, EOT included (0 = the preset's)", min=0,
                                    key="text.context_length")
    text_width: int = _opt(0, "text tower width (0 = the preset's)", min=0, key="text.width")
    text_layers: int = _opt(0, "text tower depth (0 = the preset's)", min=0, key="text.layers")
    text_heads: int = _opt(0, "text tower attention heads (0 = the preset's)", min=0, key="text.heads")
    text_mlp_ratio: float = _opt(0.0, "text tower MLP width / width (0 = the preset's)", min=0, key="text.mlp_ratio")
    init_from: str = _opt("", "start from an OpenCLIP checkpoint file (.safetensors/.pt/.bin; plain, or "
                          "{'state_dict': ...} with 'module.' prefixes) or a transformers CLIPModel folder (config.json + "
                          "model.safetensors) of the preset's geometry; '' = random init")

    def custom_keys(self) -> dict[str, Any]:
        """The geometry keys set here ({"vision.width": 512, ...}; empty: the preset as it is)."""
        return {_key(f): getattr(self, f.name) for f in dataclasses.fields(self)
                if (f.name.startswith(("vision_", "text_")) or f.name == "embed_dim") and getattr(self, f.name)}

    @property
    def spec(self) -> ModelSpec:
        """The geometry to build: the preset's, with the custom geometry keys applied."""
        spec = get_preset(self.preset)
        custom = self.custom_keys()
        if not custom:
            return spec
        towers = {"vision": spec.vision, "text": spec.text}
        for key, value in custom.items():
            if key == "embed_dim":
                continue
            tower, name = key.split(".")
            towers[tower] = dataclasses.replace(towers[tower], **{name: value})
        return ModelSpec(custom.get("embed_dim", spec.embed_dim), towers["vision"], towers["text"])

    @property
    def config_file(self) -> str | None:
        """The model config file the preset names (absolute once the config is loaded), or None."""
        return self.preset if is_config_path(self.preset) else None

    @property
    def geometry_name(self) -> str:
        """The preset's name, or ``<name>-custom`` when custom geometry keys change it."""
        return self.preset if self.spec == get_preset(self.preset) else f"{self.preset}-custom"


@dataclass
class DataConfig:
    train: str = _opt("", "training shards (WebDataset spec); empty = generated demo shards")
    val: str = _opt("", "held-out shards for retrieval; empty = generated demo shards")
    batch_size: int = _opt(64, "samples per step per data-parallel rank", min=1)
    workers: int = _opt(2, "loader worker processes per rank", min=0, max=256)
    worker_nice: int = _opt(-1, "niceness added to the loader workers (0-19); -1 = auto: 19 when training on the "
                            "CPU (the step keeps the cores, the workers run in its idle moments: about 7 % faster "
                            "steps on a 2-core CPU), 0 on GPUs (there the workers are the host's main work)",
                            min=-1, max=19)
    shuffle_buffer: int = _opt(1000, "samples in the shuffle buffer of each worker", min=0)
    max_pixels: int = _opt(89_478_485, "images with more pixels are skipped (decompression bombs)", min=1)
    train_weights: str = _opt("", "mixing weights of the '::'-separated sources of data.train, e.g. '0.7,0.3' "
                              "(each worker picks every sample's source with a seeded RNG); '' = read all "
                              "sources as one")
    mode: str = _opt("epoch", "epoch: every sample once per epoch over all ranks and workers; resampled: each "
                     "worker draws shards with replacement (endless, no coordination)", ("epoch", "resampled"))
    backend: str = _opt("cpu", "decode/augment backend: cpu (PIL worker processes) or dali (NVIDIA DALI; GPU "
                        "decode when training on cuda)", ("cpu", "dali"))
    jpeg_draft: bool = _opt(False, "cpu backend: decode large JPEGs at a reduced scale (libjpeg draft) that still "
                            "covers the output size; faster, slightly different low-pass filtering")
    text_trim: bool = _opt(True, "pad each batch's text only to its longest caption (EOT included; under run.compile "
                           "rounded up to a multiple of 8, a few shapes to compile); features equal "
                           "full-length padding exactly")
    prefetch: bool = _opt(True, "on cuda: copy the next batch to the device (pinned memory, side stream) while "
                          "the current step runs")
    dali_index_dir: str = _opt("", "dali: folder for index files of shards without one beside them ('' = "
                               "~/.cache/mtx-dist/dali-index)")
    demo_dir: str = _opt("data/demo", "where demo shards are generated when train/val are empty")
    demo_train_samples: int = _opt(8192, "training samples in the generated demo shards", min=1)
    demo_val_samples: int = _opt(128, "held-out samples in the generated demo shards (distinct scenes)",
                                 min=2, max=240)


@dataclass
class ParallelConfig:
    tensor_parallel: int = _opt(1, "tensor-parallel size T (megatron-core); data-parallel size = world / T",
                                min=1, max=64)
    zero_stage: int = _opt(0, "DeepSpeed ZeRO stage (partitions over the data-parallel group)", (0, 1, 2, 3))
    precision: str = _opt("fp32", "training precision: fp32; bf16 = DeepSpeed's bf16 (bf16 weights and gradients, fp32 "
                          "master copy in the optimizer); amp_bf16 = fp32 weights, gradients and optimizer with the "
                          "forward under torch.autocast(bfloat16) (OpenCLIP's --precision amp_bf16; the loss stays "
                          "fp32)", ("fp32", "bf16", "amp_bf16"))
    matmul_precision: str = _opt("highest", "float32 matmuls (torch.set_float32_matmul_precision): highest = exact "
                                 "fp32; high = TF32 on NVIDIA GPUs (OpenCLIP's own setting there); medium = also bf16 "
                                 "products with fp32 accumulation on CPUs with AMX or AVX512-BF16 (~3x faster matmuls, "
                                 "about 3 significant digits per product)", ("highest", "high", "medium"))
    activation_checkpointing: bool = _opt(False, "recompute each transformer block in the backward")
    overlap_comm: bool = _opt(True, "ZeRO: overlap gradient reduction with the backward")
    reduce_bucket_size: int = _opt(500_000_000, "ZeRO: elements per gradient reduce bucket", min=1)
    allgather_bucket_size: int = _opt(500_000_000, "ZeRO 1/2: elements per parameter all-gather bucket", min=1)
    stage3_prefetch_bucket_size: int = _opt(50_000_000, "ZeRO-3: elements of parameters prefetched ahead", min=0)
    stage3_param_persistence_threshold: int = _opt(100_000, "ZeRO-3: parameters this small stay unpartitioned",
                                                   min=0)
    dist_timeout_s: float = _opt(600.0, "timeout of process-group collectives, seconds", min=1)


@dataclass
class OptimConfig:
    lr: float = _opt(1e-3, "peak learning rate", min=0)
    weight_decay: float = _opt(0.1, "AdamW weight decay (not applied to gains, biases, embeddings)", min=0)
    beta1: float = _opt(0.9, "AdamW beta1", min=0, max=1)
    beta2: float = _opt(0.98, "AdamW beta2", min=0, max=1)
    eps: float = _opt(1e-6, "AdamW epsilon", min=0)
    warmup_steps: int = _opt(30, "linear warmup steps", min=0)
    schedule: str = _opt("cosine", "learning-rate schedule after warmup", ("cosine", "constant"))
    decay_steps: int = _opt(0, "steps over which the schedule decays (0 = run.steps)", min=0)
    min_lr_ratio: float = _opt(0.0, "final learning rate as a fraction of lr", min=0, max=1)
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 = off)", min=0)
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step", min=1)
    implementation: str = _opt("auto", "AdamW kernel: fused (one kernel over all tensors), foreach (batched ops) "
                               "or for-loop; auto = the one measured fastest on the device",
                               ("auto", "fused", "foreach", "for-loop"))
    max_skipped_steps: int = _opt(10, "stop after this many consecutive steps skipped for a non-finite loss or "
                                  "gradient norm", min=1)


@dataclass
class LossConfig:
    kind: str = _opt("clip", "contrastive loss: CLIP softmax (InfoNCE) or SigLIP sigmoid", ("clip", "siglip"))
    gather_with_grad: bool = _opt(True, "clip: all-gather features with gradient (exact global-batch gradient)")
    local_loss: bool = _opt(True, "clip: each rank scores its own rows against all columns (B x N logits)")
    tile_size: int = _opt(0, "clip: compute the logits in column tiles of this many (0 = untiled); peak memory "
                             "B x tile instead of B x N", min=0)


@dataclass
class CheckpointConfig:
    every: int = _opt(100, "steps between checkpoints (a final one is always written)", min=1)
    resume: str = _opt("", "'' = fresh run, 'latest', or a checkpoint tag/path under run.dir")
    keep: int = _opt(3, "complete checkpoints kept; older ones are deleted after a newer one is written", min=1)
    verify: str = _opt("size", "what a checkpoint's manifest records and resume checks: size = every file's size "
                       "and the small files' sha256; full = the sha256 of every file (catches flipped bits inside "
                       "tensor data; costs a read of every file at save and resume)", ("size", "full"))
    async_: bool = _opt(False, "asynchronous saves: training stops only to copy the state into host memory (kept "
                        "between saves: one more copy of this rank's checkpoint in RAM); a background thread writes "
                        "the files, and the checkpoint becomes `latest` once every rank has written (agreed at a "
                        "later step). At most one save in flight; a preemption or the end of the run waits for it",
                        key="async")
    direct_io: bool = _opt(True, "write checkpoint files with O_DIRECT, past the page cache (no copy into it, and "
                           "the cached data set is not evicted by checkpoints, unless checkpoint.verify = full reads "
                           "them back); where the filesystem refuses O_DIRECT, files are written normally")


@dataclass
class TrackingConfig:
    enabled: bool = _opt(True, "log to MLflow (rank 0)")
    uri: str = _opt("", "tracking URI; '' = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    experiment: str = _opt("mtx-dist", "MLflow experiment name")
    peak_tflops: float = _opt(0.0, "peak TFLOP/s per device for MFU; 0 = known by device name and precision",
                              min=0)
    register_as: str = _opt("mtx-dist-encoder", "register the exported encoder as a version of this MLflow model "
                            "('' = do not register); a store without a model registry only warns")
    retry_s: float = _opt(30.0, "after a failed MLflow call, wait this long before trying again (doubles up to "
                          "8x while failures continue); training never waits for the store", min=0)
    buffer: int = _opt(100_000, "metric points kept while the store is unreachable (the oldest are dropped "
                       "and counted beyond this)", min=1)
    request_timeout_s: int = _opt(10, "seconds one MLflow HTTP request may take (no retries inside MLflow)",
                                  min=1)
    system_metrics: bool = _opt(True, "MLflow's system metrics (CPU, memory, disk, network; GPUs through NVML): "
                                "one monitor per node, under system/ in the run")
    system_metrics_interval_s: float = _opt(10.0, "seconds between system-metric samples", min=0.1)
    system_metrics_samples: int = _opt(1, "system-metric samples averaged into each logged point", min=1)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        return {s: {_key(f): getattr(sub, f.name) for f in dataclasses.fields(sub)}
                for s in _fields(Config) for sub in [getattr(self, s)]}

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def flat(self) -> dict[str, Any]:
        """``{"run.steps": 300, ...}`` (MLflow params)."""
        return {f"{s}.{k}": v for s, sub in self.to_dict().items() for k, v in sub.items()}


# -- loading ------------------------------------------------------------------------------------

def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def _fields(cls) -> dict[str, dataclasses.Field]:
    """The keys of a section (or the section names of Config) and their fields."""
    return {_key(f): f for f in dataclasses.fields(cls)}


def _unknown(key: str, name: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, allowed, n=1)
    prefix = key[: len(key) - len(name)]
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; allowed here: {', '.join(allowed)}")


def _check_value(key: str, f: dataclasses.Field, ftype: type, value: Any) -> Any:
    if ftype is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if ftype is bool and not isinstance(value, bool) or ftype is not bool and isinstance(value, bool) \
            or not isinstance(value, ftype):
        raise ConfigError(f"config key '{key}' = {value!r}: expected {ftype.__name__}")
    choices, lo, hi = f.metadata.get("choices"), f.metadata.get("min"), f.metadata.get("max")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}' = {value!r}: allowed values are {', '.join(map(repr, choices))}")
    if lo is not None and value < lo:
        raise ConfigError(f"config key '{key}' = {value!r}: must be >= {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"config key '{key}' = {value!r}: must be <= {hi}")
    return value


def _flatten(table: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Keys of a section's table, nested tables joined with dots (TOML's ``vision.width = 512`` and
    ``[model.vision]`` both nest; the key is ``vision.width``)."""
    out = []
    for k, v in table.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _apply(cfg: Config, data: dict, source: str) -> None:
    sections = _fields(Config)
    for sname, sval in data.items():
        if sname not in sections:
            raise _unknown(sname, sname, list(sections))
        if not isinstance(sval, dict):
            raise ConfigError(f"config key '{sname}' in {source} must be a table of keys, got {sval!r}")
        sub = getattr(cfg, sname)
        hints = typing.get_type_hints(type(sub))
        fields = _fields(type(sub))
        for k, v in _flatten(sval):
            key = f"{sname}.{k}"
            if k not in fields:
                raise _unknown(key, k, list(fields))
            name = fields[k].name
            setattr(sub, name, _check_value(key, fields[k], hints[name], v))


def _parse_override(item: str) -> tuple[str, Any, str]:
    """``key=value`` -> (key, TOML value, raw text). Bare strings need no quotes: model.preset=vit-b16."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value, raw


def validate(cfg: Config) -> Config:
    """Checks that involve more than one key."""
    if cfg.optim.warmup_steps > cfg.run.steps and cfg.optim.decay_steps == 0:
        raise ConfigError(f"config key 'optim.warmup_steps' = {cfg.optim.warmup_steps}: must be <= "
                          f"run.steps ({cfg.run.steps})")
    if cfg.optim.decay_steps and cfg.optim.decay_steps < cfg.optim.warmup_steps:
        raise ConfigError(f"config key 'optim.decay_steps' = {cfg.optim.decay_steps}: must be >= "
                          f"optim.warmup_steps ({cfg.optim.warmup_steps})")
    try:
        parse_signals(cfg.run.preemption_signals)
    except ValueError as e:
        raise ConfigError(f"config key 'run.preemption_signals' = {cfg.run.preemption_signals!r}: {e}") from None
    if cfg.data.backend == "dali":  # DALI's reader has neither a per-sample source choice nor shard draws
        if cfg.data.train_weights:
            raise ConfigError(f"config key 'data.train_weights' = {cfg.data.train_weights!r}: mixing weights need "
                              "data.backend = 'cpu'")
        if cfg.data.mode != "epoch":
            raise ConfigError(f"config key 'data.mode' = {cfg.data.mode!r}: data.backend = 'dali' reads in "
                              "epoch mode only")
    if cfg.data.train_weights:  # checked on the text now, not when the loader starts
        from mtx_data_pipelines.sources import ShardSpecError, source_weights
        try:
            source_weights(cfg.data.train, cfg.data.train_weights)
        except ShardSpecError as e:
            raise ConfigError(f"config key 'data.train_weights' = {cfg.data.train_weights!r}: {e}") from None
    for key in ("patch_dropout_final_steps", "train_image_size_final_steps"):
        if getattr(cfg.model, key) > cfg.run.steps:
            raise ConfigError(f"config key 'model.{key}' = {getattr(cfg.model, key)}: must be <= run.steps "
                              f"({cfg.run.steps})")
    if cfg.model.config_file:  # recorded absolute: a resume or an export finds it from anywhere
        cfg.model.preset = os.path.abspath(cfg.model.preset)
    try:
        spec = get_preset(cfg.model.preset)
    except GeometryError as e:
        raise ConfigError(f"config key 'model.preset' = {cfg.model.preset!r}: {e}") from None
    spec = cfg.model.spec
    problems = check_geometry(spec)
    if problems:
        key, _, rest = problems[0].partition(" = ")
        raise ConfigError(f"config key 'model.{key}' = {rest} (preset {cfg.model.preset!r})")
    vision = spec.vision
    if cfg.model.train_image_size and (cfg.model.train_image_size % vision.patch_size
                                       or cfg.model.train_image_size >= vision.image_size):
        raise ConfigError(f"config key 'model.train_image_size' = {cfg.model.train_image_size}: must be a multiple "
                          f"of the patch size ({vision.patch_size}) below the image size ({vision.image_size}) of "
                          f"preset {cfg.model.preset!r}, or 0 (full size)")
    if cfg.run.hang_watchdog and cfg.run.hang_timeout_s >= cfg.parallel.dist_timeout_s:
        raise ConfigError(f"config key 'run.hang_timeout_s' = {cfg.run.hang_timeout_s}: must be below "
                          f"parallel.dist_timeout_s ({cfg.parallel.dist_timeout_s}): ranks waiting for a hung one sit "
                          f"in a collective, which would time out first")
    if cfg.run.compile and cfg.model.attention == "triton":
        raise ConfigError("config key 'run.compile' = true: model.attention = 'triton' (our kernel, launched from a "
                          "custom autograd function) is not traced by torch.compile; use 'auto', 'sdpa' or "
                          "'flash_attn' with compile, or run.compile = false")
    tp = cfg.parallel.tensor_parallel
    if tp > 1:
        for tower, t in (("vision", spec.vision), ("text", spec.text)):
            hidden = int(t.width * t.mlp_ratio)
            for what, n in (("heads", t.heads), ("width", t.width), ("mlp width", hidden)):
                if n % tp:
                    raise ConfigError(f"config key 'parallel.tensor_parallel' = {tp}: the {tower} tower's {what} "
                                      f"({n}) of preset {cfg.model.preset!r} is not divisible by it")
    return cfg


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the TOML file, then ``section.key=value`` overrides; validated."""
    cfg = Config()
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path!r} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path!r} is not valid TOML: {e}") from None
        _apply(cfg, data, path)
    for item in overrides:
        key, value, raw = _parse_override(item)
        parts = key.split(".", 1)
        if len(parts) != 2:
            sections = list(_fields(Config))
            if parts[0] not in sections:
                raise _unknown(key, parts[0], sections)
            raise ConfigError(f"config key '{key}' must be section.key; keys of '{parts[0]}': "
                              f"{', '.join(_fields(type(getattr(cfg, parts[0]))))}")
        section = getattr(cfg, parts[0], None)
        name = _fields(type(section)).get(parts[1]) if dataclasses.is_dataclass(section) else None
        if not isinstance(value, str) and name is not None \
                and typing.get_type_hints(type(section)).get(name.name) is str:
            value = raw.strip()  # a string key takes the text as written: run.dir=2024 is the folder "2024"
        _apply(cfg, {parts[0]: {parts[1]: value}}, "the command line")
    return validate(cfg)


def load_cli_config(config: str | None, overrides: list[str]) -> Config:
    """A subcommand's ``[CONFIG.toml] [section.key=value ...]``: the first positional may already be
    an override (``mtx-dist train run.steps=5``, no config file given)."""
    overrides = list(overrides)
    if config and "=" in config and not config.endswith(".toml"):
        overrides.insert(0, config)
        config = None
    return load_config(config, overrides)


def describe_section(cls, section: str) -> list[str]:
    """``[section]`` and every key of a typed section with its default and help text."""
    lines = [f"[{section}]"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        extra = f"  one of {', '.join(map(str, f.metadata['choices']))}" if f.metadata.get("choices") else ""
        lines.append(f"  {_key(f)} = {default!r}  # {f.metadata['help']}{extra}")
    return lines


def describe() -> str:
    """Every key with its default and help text (for ``mtx-dist train --help-config`` and docs)."""
    return "\n".join(line for sname, sfield in _fields(Config).items()
                     for line in describe_section(sfield.default_factory, sname))


def check_section(obj, section: str, error: type[Exception] = ConfigError) -> None:
    """Every key of a typed section (a dataclass of :func:`option` fields, e.g. ``mtx-dist adapt``'s)
    against its type, choices and bounds, with the same messages as the training config's keys."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        try:
            setattr(obj, f.name, _check_value(f"{section}.{_key(f)}", f, hints[f.name], getattr(obj, f.name)))
        except ConfigError as e:
            raise error(str(e)) from None
