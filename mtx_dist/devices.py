"""Where to run: one rule for every command (training, eval, adapt, the MLflow pyfunc model).
Imports torch only when a device is resolved (configs validate their device names without it)."""

from __future__ import annotations

from mtx_dist.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(UserError, RuntimeError):
    """A device that this machine does not have."""

    label = "device error"


def resolve_device(name: str | None = "auto", local_rank: int | None = None):
    """``auto`` (or None): CUDA when torch sees a device, else the CPU; ``cuda`` without one is
    refused. With ``local_rank`` (a launched rank), this process's CUDA device becomes
    ``local_rank`` modulo the visible devices."""
    import torch

    name = name or "auto"
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise DeviceError(f"device {name!r}: choose one of {', '.join(DEVICES)}")
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r}: torch sees no CUDA device")
    if local_rank is not None:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name if ":" in name else "cuda")
