"""Speed techniques keep the numbers: exact text trimming, FLIP patch dropout, torch.compile, one
small collective per step (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from mtx_data_pipelines.tokenizer import ClipTokenizer, trimmed_length
from mtx_dist.config import ConfigError, load_config
from mtx_dist.models import ContrastiveModel, get_preset, patch_keep_indices
from tests import dist_workers as w
from tests.dist import run_ranks


def test_trimmed_length_rounds_up_to_the_multiple_and_caps_at_the_context():
    assert [trimmed_length(n, 77, 8) for n in (1, 8, 9, 16, 17, 72, 73, 77)] == [8, 8, 16, 16, 24, 72, 77, 77]
    assert trimmed_length(12, 16, 8) == 16


def test_tokenizer_pads_to_the_longest_caption_only():
    tok = ClipTokenizer(context_length=77)
    texts = ["a red circle", "a small blue square in the top left corner of the picture"]
    full, trimmed = tok(texts), tok(texts, pad_multiple=8)
    longest = int((full != 0).sum(dim=1).max()) if isinstance(full, torch.Tensor) else int((full != 0).sum(1).max())
    assert trimmed.shape == (2, trimmed_length(longest, 77, 8)) and trimmed.shape[1] % 8 == 0
    assert (trimmed == full[:, : trimmed.shape[1]]).all() and (full[:, trimmed.shape[1]:] == 0).all()


def test_training_text_is_padded_to_its_longest_caption_or_to_multiples_of_8_when_compiled(demo_shards):
    from mtx_dist.data import build_loader
    train, _, _ = demo_shards
    for compiled, width_of in ((False, lambda n: n), (True, lambda n: trimmed_length(n, 32, 8))):
        cfg = load_config(None, ["model.preset=tiny", "data.batch_size=8", "data.workers=0", f"run.compile={str(compiled).lower()}"])
        batches = iter(build_loader(cfg, train, train=True, rank=0, world_size=1))
        for _ in range(3):
            text = next(batches)["text"]
            assert text.shape[1] == width_of(int((text != 0).sum(1).max()))


def test_trimmed_text_features_equal_full_length_padding():
    torch.manual_seed(0)
    model = ContrastiveModel.from_preset("tiny").eval()
    text = w.short_text(model.spec, 12, longest=6)  # context 32, trimmed to 8
    with torch.no_grad():
        full, trimmed = model.encode_text(text), model.encode_text(text[:, :8])
    # unit vectors: an absolute 1e-6 is relative to their magnitude
    assert float((full - trimmed).abs().max()) <= 1e-6
    with pytest.raises(ValueError, match="at most 32"):
        model.encode_text(torch.ones(2, 33, dtype=torch.long))


def test_patch_keep_indices_are_a_seeded_random_subset_per_image():
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    keep = patch_keep_indices(16, 64, 0.5, g(1))
    assert keep.shape == (16, 32)
    for row in keep:  # sorted, distinct, in range
        assert row.tolist() == sorted(set(row.tolist())) and 0 <= int(row.min()) and int(row.max()) < 64
    assert len({tuple(r.tolist()) for r in keep}) == 16  # a different subset per image
    assert torch.equal(keep, patch_keep_indices(16, 64, 0.5, g(1)))
    assert not torch.equal(keep, patch_keep_indices(16, 64, 0.5, g(2)))
    assert patch_keep_indices(2, 10, 0.95, g(0)).shape == (2, 1)  # at least one patch survives


def test_keeping_every_patch_is_the_plain_forward_and_dropout_sees_fewer_tokens():
    torch.manual_seed(0)
    model = ContrastiveModel.from_preset("micro")
    image = torch.randn(3, 3, 32, 32)
    every = torch.arange(16).expand(3, 16)
    assert torch.equal(model.encode_image(image), model.encode_image(image, patch_keep=every))
    seen = []
    model.visual.ln_pre.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    model.encode_image(image, patch_keep=every[:, :8])
    model.encode_image(image)
    assert seen == [1 + 8, 1 + 16]


def test_patch_dropout_tail_and_config_checks():
    from mtx_dist.trainer import patch_dropout_at
    cfg = load_config(None, ["run.steps=10", "optim.warmup_steps=1", "model.patch_dropout=0.5",
                             "model.patch_dropout_final_steps=3"])
    assert [patch_dropout_at(cfg, s) for s in range(10)] == [0.5] * 7 + [0.0] * 3
    with pytest.raises(ConfigError, match="patch_dropout_final_steps"):
        load_config(None, ["run.steps=10", "optim.warmup_steps=1", "model.patch_dropout_final_steps=11"])
    with pytest.raises(ConfigError, match="model.patch_dropout"):
        load_config(None, ["model.patch_dropout=1.0"])
    with pytest.raises(ConfigError, match="run.compile"):
        load_config(None, ["run.compile=true", "model.attention=triton"])


def test_low_resolution_resamples_positions_and_full_size_uses_them_as_learned():
    torch.manual_seed(0)
    model = ContrastiveModel.from_preset("micro")  # 32 px, patch 8: a 4 x 4 grid
    v = model.visual
    assert v.positions(4) is v.pos_embed  # full size (evaluation, export): the parameter itself
    small = v.positions(2)
    assert small.shape == (1 + 4, 64) and torch.equal(small[0], v.pos_embed[0])  # class position kept
    # antialiased bicubic shrinking of a constant field is that constant
    with torch.no_grad():
        v.pos_embed[1:] = 0.25
    assert torch.allclose(v.positions(3)[1:], torch.full((9, 64), 0.25), rtol=0, atol=1e-6)
    seen = []
    v.ln_pre.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    v.pos_embed.grad = None
    model.encode_image(torch.randn(2, 3, 24, 24)).sum().backward()
    assert seen == [1 + 9] and v.pos_embed.grad[1:].abs().sum() > 0  # low-res steps train the full-size positions
    for bad in (30, 33):
        with pytest.raises(ValueError, match="multiple of the patch size 8"):
            model.encode_image(torch.randn(1, 3, bad, bad))


def test_low_resolution_step_sees_fewer_tokens_and_composes_with_patch_dropout():
    """The production step at train_image_size=16 runs a 2 x 2 grid (5 tokens), with FLIP 0.5 on top 1 + 2;
    at full size (the tail) the 4 x 4 grid."""
    seen = []

    def hook(model):
        model.visual.ln_pre.register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))

    _engine_losses([], 1, image_sizes=[16], on_model=hook)
    _engine_losses([], 1, drop=0.5, image_sizes=[16], on_model=hook)
    _engine_losses([], 1, image_sizes=[0], on_model=hook)
    assert seen == [1 + 4, 1 + 2, 1 + 16]


def test_low_resolution_tail_flops_and_config_checks():
    from mtx_dist.flops import train_flops_per_sample
    from mtx_dist.trainer import train_image_size_at
    cfg = load_config(None, ["run.steps=10", "optim.warmup_steps=1", "model.train_image_size=48",
                             "model.train_image_size_final_steps=3"])
    assert [train_image_size_at(cfg, s) for s in range(10)] == [48] * 7 + [0] * 3
    tiny = get_preset("tiny")
    assert train_flops_per_sample(tiny, 1 + 36, 32, grid=6) < train_flops_per_sample(tiny, 1 + 36, 32)
    assert train_flops_per_sample(tiny, 1 + 64, 32, grid=8) == train_flops_per_sample(tiny)
    for bad in ("60", "64", "72"):  # not a multiple of the patch (8), not below the image size (64)
        with pytest.raises(ConfigError, match="model.train_image_size"):
            load_config(None, [f"model.train_image_size={bad}"])
    with pytest.raises(ConfigError, match="train_image_size_final_steps"):
        load_config(None, ["run.steps=10", "optim.warmup_steps=1", "model.train_image_size_final_steps=11"])


def _engine_losses(overrides: list[str], steps: int, drop: float = 0.0, image_sizes: list[int] | None = None,
                   on_model=None, on_engine=None) -> dict:
    """``steps`` production train_steps of the micro model on synthetic batches (world size 1), each of
    ``optim.grad_accum`` micro-batches;
    ``image_sizes``: each step's training resolution; ``on_model`` sees the model before training,
    ``on_engine`` the engine."""
    from mtx_dist.engine import build_engine, build_model, setup_runtime
    from mtx_dist.parallel import destroy_groups
    from mtx_dist.step import train_step
    from mtx_dist.trainer import step_setup

    cfg = w.micro_cfg(*overrides)
    runtime = setup_runtime(cfg)
    model = build_model(cfg, runtime)
    if on_model is not None:
        on_model(model)
    engine = build_engine(cfg, model, runtime)
    if on_engine is not None:
        on_engine(engine)
    setup = step_setup(cfg, runtime, engine)
    spec = get_preset("micro")

    def batches():
        for step in range(steps * cfg.optim.grad_accum):
            image, text = w.global_batch(spec, cfg.data.batch_size, step)
            yield {"image": image, "text": text}

    feed = batches()
    sizes = image_sizes or [0] * steps
    results = [train_step(setup, feed, s, drop, image_size=sizes[s]) for s in range(steps)]
    destroy_groups(runtime.groups)
    return {"losses": [float(r.losses.mean()) for r in results], "skipped": [r.skipped for r in results],
            "params": {k: v.detach().clone() for k, v in engine.module.state_dict().items()}}


def test_one_data_parallel_rank_skips_the_gradient_all_reduce_and_trains_identically(monkeypatch):
    """With one data-parallel rank (ZeRO-0) DeepSpeed's gradient all-reduce is switched off: the weights
    after 3 steps equal, bit for bit, those of an engine that runs it (a reduction over one rank)."""
    from tests.helpers import DIST_VARS
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    seen = []
    ours = _engine_losses(["run.device=cpu"], 3, on_engine=lambda e: seen.append(e.enable_backward_allreduce))
    reduced = _engine_losses(["run.device=cpu"], 3, on_engine=lambda e: setattr(e, "enable_backward_allreduce", True))
    assert seen == [False]
    assert not any(ours["skipped"]) and ours["losses"] == reduced["losses"]
    for name, value in ours["params"].items():
        assert torch.equal(value, reduced["params"][name]), name


@pytest.mark.parametrize("accum,precision", [(1, "fp32"), (2, "fp32"), (2, "amp_bf16")])
def test_recycled_token_embedding_gradient_trains_identically(monkeypatch, accum, precision):
    """One process, ZeRO-0, CPU: the token embedding's gradient reuses one tensor across steps (the rows
    a step touched zeroed after its optimizer step) instead of a fresh zero fill; the weights after 4
    steps equal, bit for bit, those trained with the fill: with and without gradient accumulation, in
    fp32 and under bf16 autocast."""
    from mtx_dist.models.embedding import TokenEmbedding
    from tests.helpers import DIST_VARS
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    handed = []

    def watch(engine):
        emb = [m for m in engine.module.modules() if isinstance(m, TokenEmbedding)]
        assert len(emb) == 1 and emb[0].recycling
        engine.optimizer.register_step_post_hook(lambda *_: handed.append(emb[0]._spare.data_ptr()))

    def fill(engine):
        for m in engine.module.modules():
            if isinstance(m, TokenEmbedding):
                m.recycling = False

    overrides = ["run.device=cpu", f"optim.grad_accum={accum}", f"parallel.precision={precision}"]
    ours = _engine_losses(overrides, 4, on_engine=watch)
    filled = _engine_losses(overrides, 4, on_engine=fill)
    assert len(handed) == 4 and len(set(handed)) == 1  # one tensor, taken by autograd without a copy
    assert not any(ours["skipped"]) and ours["losses"] == filled["losses"]
    for name, value in ours["params"].items():
        assert torch.equal(value, filled["params"][name]), name


def test_token_embedding_gradient_is_torch_s_and_recycles_only_its_own_tensor():
    from mtx_dist.models.embedding import TokenEmbedding

    torch.manual_seed(0)
    ours, ref = TokenEmbedding(500, 8), torch.nn.Embedding(500, 8)
    ref.load_state_dict(ours.state_dict())
    ours.recycling = True
    for step in range(3):
        ids = torch.randint(0, 40, (6, 9))
        ids[:, -2:] = 0  # padding rows repeat one id
        g = torch.randn(6, 9, 8)
        ours(ids).backward(g)
        ref(ids).backward(g)
        assert torch.equal(ours.weight.grad, ref.weight.grad)
        kept = ours.weight.grad
        ours.recycle_grad()
        assert ours._spare is kept and not kept.any()  # zeroed in place, kept for the next backward
        assert ours.weight.grad is None  # the step is done with it
        del kept  # a reference left here would make autograd copy the tensor rather than take it
        ref.weight.grad = None
    ours(ids).backward(g)
    ours.weight.grad = ours.weight.grad.clone()  # someone else's tensor now: left alone, not recycled
    ours.recycle_grad()
    assert ours._spare is None and ours.weight.grad.any()
    with torch.no_grad():  # no autograd: the plain lookup
        assert torch.equal(ours(ids), ref(ids))


def test_amp_bf16_autocasts_the_forward_and_keeps_fp32_weights_and_loss(monkeypatch):
    """parallel.precision = amp_bf16 (OpenCLIP's amp_bf16): linear layers compute in bf16 inside the
    engine, weights and optimizer stay fp32, and the losses follow fp32 training within bf16 rounding."""
    from tests.helpers import DIST_VARS
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    seen = set()

    def hook(model):
        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_hook(lambda m, args, out: seen.add(out.dtype))

    amp = _engine_losses(["run.device=cpu", "parallel.precision=amp_bf16"], 3, on_model=hook)
    fp32 = _engine_losses(["run.device=cpu"], 3)
    assert seen == {torch.bfloat16}
    assert all(v.dtype == torch.float32 for v in amp["params"].values() if v.is_floating_point())
    for a, b in zip(amp["losses"], fp32["losses"]):
        assert abs(a - b) <= 2e-2 * abs(b), (amp["losses"], fp32["losses"])  # bf16 has 8 significant bits


def test_medium_matmul_precision_trains_like_fp32_with_math_attention_on_cpu(monkeypatch):
    """parallel.matmul_precision = medium: the runtime sets torch's float32 matmul precision (bf16 products
    on AMX/AVX512-BF16 CPUs, TF32 on GPUs), auto attention on CPU float32 becomes the math path (torch's
    fused CPU kernel is slow under it), and the losses follow exact fp32 within bf16 rounding."""
    import mtx_kernels
    from tests.helpers import DIST_VARS
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    seen = {}

    def hook(engine):
        seen["precision"] = torch.get_float32_matmul_precision()
        seen["backend"] = mtx_kernels.resolve_backend("auto", torch.zeros(1, 1, 4, 8))

    medium = _engine_losses(["run.device=cpu", "parallel.matmul_precision=medium"], 3, on_engine=hook)
    exact = _engine_losses(["run.device=cpu"], 3)
    assert seen == {"precision": "medium", "backend": "math"}
    assert torch.get_float32_matmul_precision() == "highest"  # the second run set it back
    assert not any(medium["skipped"])
    for a, b in zip(medium["losses"], exact["losses"]):
        assert abs(a - b) <= 2e-2 * abs(b), (medium["losses"], exact["losses"])


@pytest.mark.slow
def test_compiled_losses_equal_eager_over_five_steps(monkeypatch):
    from tests.helpers import DIST_VARS
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    eager = _engine_losses(["run.device=cpu"], 5, drop=0.5)
    compiled = _engine_losses(["run.device=cpu", "run.compile=true"], 5, drop=0.5)
    assert not any(eager["skipped"] + compiled["skipped"])
    for a, b in zip(eager["losses"], compiled["losses"]):
        assert abs(a - b) <= 1e-5 * abs(a), (eager, compiled)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["parallel.zero_stage=3"],
    ["parallel.tensor_parallel=2", "parallel.zero_stage=1", "parallel.activation_checkpointing=true"],
], ids=["zero3", "tp2-zero1-checkpointing"])
def test_compiled_equals_eager_on_two_ranks(layout):
    """run.compile under ZeRO-3 (partitioned parameters gathered by hooks) and under TP with
    activation checkpointing: the compiled engine's losses equal the eager engine's over 3 fp32 steps."""
    for eager, compiled in run_ranks(2, w.engine_runs, [layout, [*layout, "run.compile=true"]], 3):
        for a, b in zip(eager["losses"], compiled["losses"]):
            assert abs(a - b) <= 1e-5 * abs(a), (layout, eager["losses"], compiled["losses"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_one_small_all_reduce_per_step_beside_the_gradients(stage):
    r0, r1 = run_ranks(2, w.count_collectives, [f"parallel.zero_stage={stage}"], 3)
    for r in (r0, r1):
        # beside DeepSpeed's gradient reduction and the loss's feature gather: exactly one collective per
        # step, the optimizer's 3-element all-reduce of (non-finite, preemption signal, checkpoint status)
        assert r["ours"] == [[("mtx_dist/optim.py", "all_reduce", 3)]] * 3, r
        assert all(r["deepspeed"]) and all(r["loss"]), r  # both present at every step
        if stage == 0:  # our optimizer clips with the norm it computes anyway: no norm all-reduce of DeepSpeed's
            assert r["deepspeed_small"] == [0, 0, 0], r
        assert r["signal"] == [0, 0, 10], r  # a signal shared by one rank at step 3 reached both
        assert r["checkpoint"] == [0, 1, 2], r  # so did one rank's checkpoint status (MAX)



def test_loader_workers_yield_the_cores_on_cpu_runs_only(tmp_path):
    """data.worker_nice=-1 (auto): niceness 19 when the step runs on the CPU, 0 on a GPU, where the
    workers are the host's main work; an explicit value is kept either way."""
    from mtx_data_pipelines.demo import DemoSpec, shard_spec, write_demo_split
    from mtx_dist.data import build_loader, worker_niceness

    assert (worker_niceness(-1, "cpu"), worker_niceness(-1, "cuda"), worker_niceness(5, "cuda")) == (19, 0, 5)
    shards = shard_spec(write_demo_split(str(tmp_path), DemoSpec("train", 4, image_px=32)))
    cfg = load_config(None, [])
    assert cfg.data.worker_nice == -1
    assert build_loader(cfg, shards, train=True, rank=0, world_size=1, device="cpu").cfg.worker_nice == 19
    cfg = load_config(None, ["data.worker_nice=3"])
    assert build_loader(cfg, shards, train=True, rank=0, world_size=1, device="cpu").cfg.worker_nice == 3
