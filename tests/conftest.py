"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import DIST_VARS, torchvision_shim

# Triton reads TRITON_INTERPRET once, when it is first imported (torch's FLOP counter imports it
# through inductor while tests are being collected): without a GPU, Triton kernels can only run in
# its interpreter, so switch it on before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


@pytest.fixture(autouse=True)
def _restore_process_environment():
    """An in-process training run writes into os.environ: mlflow.set_tracking_uri sets
    MLFLOW_TRACKING_URI, and the runtime sets the launcher variables (RANK, WORLD_SIZE, MASTER_PORT,
    ...) of its single process. Without this, later tests' subprocesses (CLI runs, a SLURM cluster's
    daemons and jobs) would inherit that run's store and its rank layout. The runtime also sets the
    process's float32 matmul precision (parallel.matmul_precision), restored likewise."""
    keys = ("MLFLOW_TRACKING_URI", *DIST_VARS)
    before = {k: os.environ.get(k) for k in keys}
    matmul = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(matmul)
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def open_clip():
    torchvision_shim()
    import open_clip as oc
    return oc


@pytest.fixture(scope="session")
def timm():
    torchvision_shim()
    import timm as t
    return t


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """Small demo train/val shards shared by data tests: (train spec, val spec, directory)."""
    from mtx_data_pipelines.demo import DemoSpec, shard_spec, write_demo_split

    d = str(tmp_path_factory.mktemp("demo"))
    train = write_demo_split(d, DemoSpec("train", 600, samples_per_shard=128, image_px=40))
    val = write_demo_split(d, DemoSpec("val", 48, samples_per_shard=32, image_px=40, distinct=True))
    return shard_spec(train), shard_spec(val), d
