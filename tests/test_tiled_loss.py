"""The column-tiled CLIP loss (mtx_kernels.tiled_loss): same value and gradients as the plain loss, on one
process and on 2 gloo ranks with gather-with-grad, in a fraction of the plain loss's peak memory."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mtx_kernels.tiled_loss import tiled_clip_loss, tiled_cross_entropy
from mtx_dist.config import ConfigError, load_config
from mtx_dist.loss import ClipLoss, build_loss, clip_loss
from tests import dist_workers as w
from tests.dist import run_ranks
from tests.helpers import REPO

TOL = 1e-5  # fp32, relative: errors are measured against max(1, the reference's largest magnitude)
BF16_TOL = 1e-2  # bf16 features vs their fp32 originals: the rounding of the inputs (8 mantissa bits)


def features(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dtype).requires_grad_()


def grads(loss: torch.Tensor, inputs) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


def loss_err(x: torch.Tensor, y: torch.Tensor) -> float:
    """|x - y| relative to the reference y (losses here are ~4-8: summation order scales with them)."""
    return abs(float(x.detach() - y.detach())) / max(1.0, abs(float(y.detach())))


def max_err(xs, ys) -> float:
    """Largest |x - y| of each pair relative to the reference's largest entry (at least 1)."""
    return max(float((x.float() - y.float()).abs().max()) / max(1.0, float(y.float().abs().max()))
               for x, y in zip(xs, ys))


@pytest.mark.parametrize("rows,cols,tile", [
    (4, 16, 4),     # tile divides N
    (5, 17, 4),     # it does not: a short last tile
    (8, 33, 32),
    (16, 100, 1),   # one column per tile
    (6, 10, 64),    # tile > N: one tile
    (3, 1, 1), (7, 1, 8),  # N = 1
])
@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_tiled_cross_entropy_equals_the_plain_one(rows, cols, tile, scale_shape):
    a, b = features(rows, 24, seed=rows), features(cols, 24, seed=100 + cols)
    scale = torch.full(scale_shape, 14.3, requires_grad=True)
    labels = torch.randint(0, cols, (rows,), generator=torch.Generator().manual_seed(tile))
    tiled = tiled_cross_entropy(a, b, scale, labels, tile)
    plain = F.cross_entropy(scale * a @ b.t(), labels)
    assert tiled.shape == () and tiled.dtype == torch.float32
    assert loss_err(tiled, plain) < TOL
    g_tiled, g_plain = grads(tiled, (a, b, scale)), grads(plain, (a, b, scale))
    assert g_tiled[2].shape == scale.shape
    assert max_err(g_tiled, g_plain) < TOL
    if cols > 1:  # not a comparison of vanishing gradients (with one column the loss is 0)
        assert max(float(g.abs().max()) for g in g_plain) > 1e-3


@pytest.mark.parametrize("tile", [1, 5, 8, 1000])
def test_tiled_clip_loss_equals_clip_loss_on_one_process(tile):
    img, txt = features(8, 16, seed=1), features(8, 16, seed=2)
    scale = torch.tensor(10.0, requires_grad=True)
    tiled = tiled_clip_loss(img, txt, txt, img, scale, torch.arange(8), tile)
    plain = clip_loss(img, txt, scale)
    g_plain = grads(plain, (img, txt, scale))
    assert loss_err(tiled, plain) < TOL
    assert max_err(grads(tiled, (img, txt, scale)), g_plain) < TOL
    # ClipLoss with a tile size on one process takes the same path
    via_module = build_loss("clip", None, tile_size=tile)(img, txt, scale)
    assert loss_err(via_module, plain) < TOL
    assert max_err(grads(via_module, (img, txt, scale)), g_plain) < TOL


def test_local_rows_against_all_columns_match_clip_loss_local_branch():
    """What rank r of W computes with local_loss: its B rows against all W*B columns, positives at
    r*B + i (the gathered features here are a slice of one leaf, as the all-gather's backward makes them)."""
    world, per_rank, rank = 4, 3, 2
    img_all, txt_all = features(world * per_rank, 16, seed=3), features(world * per_rank, 16, seed=4)
    scale = torch.tensor(7.0, requires_grad=True)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    labels = torch.arange(per_rank) + rank * per_rank
    tiled = tiled_clip_loss(img_all[rows], txt_all, txt_all[rows], img_all, scale, labels, tile=5)
    plain = (F.cross_entropy(scale * img_all[rows] @ txt_all.t(), labels)
             + F.cross_entropy(scale * txt_all[rows] @ img_all.t(), labels)) / 2
    assert loss_err(tiled, plain) < TOL
    assert max_err(grads(tiled, (img_all, txt_all, scale)), grads(plain, (img_all, txt_all, scale))) < TOL


def test_bf16_features_give_the_float32_result():
    img32, txt32 = features(32, 64, seed=5), features(48, 64, seed=6)
    img16, txt16 = (t.detach().bfloat16().requires_grad_() for t in (img32, txt32))
    scale = torch.tensor(14.3, requires_grad=True)
    labels = torch.arange(32) + 8
    low = tiled_cross_entropy(img16, txt16, scale, labels, tile=10)
    assert low.dtype == torch.float32
    g_low = grads(low, (img16, txt16, scale))
    assert [g.dtype for g in g_low] == [torch.bfloat16, torch.bfloat16, torch.float32]
    # the math is float32: equal to the plain loss on the same (bf16-rounded) values up to fp32 rounding
    up = [t.detach().float().requires_grad_() for t in (img16, txt16)]
    plain_up = F.cross_entropy(scale * up[0] @ up[1].t(), labels)
    assert loss_err(low, plain_up) < TOL
    g_up = grads(plain_up, (*up, scale))
    assert max_err(g_low[2:], g_up[2:]) < TOL
    for g, ref in zip(g_low[:2], g_up[:2]):  # only the final rounding of the gradient to bf16 differs
        assert torch.allclose(g.float(), ref, rtol=1e-2, atol=1e-5)
    # and within BF16_TOL (relative) of the fp32 loss on the unrounded features
    ref = F.cross_entropy(scale * img32 @ txt32.t(), labels)
    assert float(low.detach()) == pytest.approx(float(ref.detach()), rel=BF16_TOL)
    g_ref = grads(ref, (img32, txt32, scale))
    for g, r in zip(g_low, g_ref):
        assert float((g.float() - r).norm() / r.norm()) < BF16_TOL


def test_float32_under_autocast():
    img, txt = features(16, 32, seed=9), features(16, 32, seed=10)
    scale = torch.tensor(14.3, requires_grad=True)
    ref = tiled_clip_loss(img, txt, txt, img, scale, torch.arange(16), tile=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = tiled_clip_loss(img, txt, txt, img, scale, torch.arange(16), tile=5)
    assert loss_err(low, ref) < TOL
    assert max_err(grads(low, (img, txt, scale)), grads(ref, (img, txt, scale))) < TOL


def test_only_per_row_statistics_are_saved_for_the_backward():
    """The plain loss keeps B x N floats alive between forward and backward; the tiled one only its
    inputs and B log-sum-exps."""
    rows, cols, dim = 16, 512, 8
    a, b = features(rows, dim, seed=7), features(cols, dim, seed=8)
    scale = torch.tensor(10.0, requires_grad=True)
    labels = torch.arange(rows)

    def saved_numel(fn) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    inputs = a.numel() + b.numel() + scale.numel() + labels.numel()
    assert saved_numel(lambda: tiled_cross_entropy(a, b, scale, labels, tile=64)) == inputs + rows
    assert saved_numel(lambda: F.cross_entropy(scale * a @ b.t(), labels)) >= rows * cols


def test_bad_shapes_and_sizes_are_errors():
    a, b, s = torch.randn(4, 8), torch.randn(6, 8), torch.tensor(1.0)
    with pytest.raises(ValueError, match="expected a"):
        tiled_cross_entropy(a, torch.randn(6, 7), s, torch.arange(4), 2)
    with pytest.raises(ValueError, match="one label per row"):
        tiled_cross_entropy(a, b, s, torch.arange(3), 2)
    with pytest.raises(ValueError, match="must be >= 1"):
        tiled_cross_entropy(a, b, s, torch.arange(4), 0)
    with pytest.raises(ValueError, match="tile_size must be >= 0"):
        ClipLoss(tile_size=-1)
    with pytest.raises(ConfigError, match="config key 'loss.tile_size' = -1: must be >= 0"):
        load_config(None, ["loss.tile_size=-1"])
    assert load_config(None, ["loss.tile_size=4096"]).loss.tile_size == 4096


# -- 2 gloo ranks: the tiled loss behind the differentiable all-gather -------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("local_loss", [True, False])
def test_dp2_tiled_loss_equals_the_global_batch(local_loss):
    # 3 pairs per rank: 6 columns in tiles of 4 (a short last tile); every parameter's gradient checked
    for r in run_ranks(2, w.dp_loss_grads, "clip", True, local_loss, 3, 4):
        # relative: the loss is ~2.6 and the largest gradient entry ~12 (gradient error ~8e-6 here)
        assert abs(r["loss"] - r["ref_loss"]) <= TOL * max(1.0, abs(r["ref_loss"])), r
        assert r["grad_err"] <= TOL * max(1.0, r["grad_scale"]), r
        assert r["grad_scale"] > 1e-3


# -- peak memory, measured in a fresh interpreter per variant ---------------------------------------

_PEAK_CHILD = r"""
import json, sys
import torch, torch.nn.functional as F
from mtx_kernels.tiled_loss import tiled_clip_loss
variant, rows, cols, dim, tile = sys.argv[1], *map(int, sys.argv[2:6])

def leaves(n):
    g = torch.Generator().manual_seed(0)
    return [F.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_() for _ in range(2)]

def step(img_all, txt_all, b):  # one rank's local loss: its b rows against all columns, forward + backward
    img, txt, labels, scale = img_all[:b], txt_all[:b], torch.arange(b), torch.tensor(14.3)
    if variant == "tiled":
        loss = tiled_clip_loss(img, txt_all, txt, img_all, scale, labels, tile)
    else:
        loss = (F.cross_entropy(scale * img @ txt_all.t(), labels)
                + F.cross_entropy(scale * txt @ img_all.t(), labels)) / 2
    loss.backward()
    return loss.item()

step(*leaves(256), 64)  # thread pools and kernels initialized outside the measurement
inputs = leaves(cols)

def status(key):  # kB, from the kernel's accounting of this process
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark (VmHWM) to the current RSS: earlier peaks do not count
before = status("VmRSS")
loss = step(*inputs, rows)
print(json.dumps({"peak_mib": (status("VmHWM") - before) / 1024, "loss": loss}))
"""


def peak_mib(variant: str, rows: int, cols: int, dim: int, tile: int) -> dict:
    # glibc otherwise raises its mmap threshold after the first large free and keeps freed blocks in
    # the heap, which makes the resident-set peak depend on allocation history, not on live memory
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/"), "PYTHONPATH": REPO,
           "MALLOC_MMAP_THRESHOLD_": "65536"}  # a clean environment: nothing from earlier tests
    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, variant, str(rows), str(cols), str(dim), str(tile)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tiled_peak_memory_is_a_fraction_of_the_plain_one():
    rows, cols, dim, tile = 2048, 16384, 64, 1024  # plain: two 2048 x 16384 fp32 logit matrices (128 MiB each)
    plain, tiled = peak_mib("plain", rows, cols, dim, 0), peak_mib("tiled", rows, cols, dim, tile)
    assert tiled["loss"] == pytest.approx(plain["loss"], rel=TOL, abs=TOL)  # TOL * max(1, |loss|)
    assert plain["peak_mib"] > 2 * rows * cols * 4 / 2 ** 20  # at least the two logit matrices
    assert tiled["peak_mib"] < 0.1 * plain["peak_mib"], (tiled, plain)
