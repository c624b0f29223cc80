"""Build a model without materialising it: construct on the meta device, record its initialisation,
replay it one parameter at a time.

Why: a seeded build allocates every fp32 weight of the full model on every rank (ViT-bigG-14: 10 GB
per rank, eight ranks per node) although tensor parallelism keeps a slice of most of them. Here the
constructor runs on the meta device under a recorder that notes, in order, every in-place
initialisation call on a parameter (``nn.init.*`` and ``Tensor.*_`` methods). The replay then runs
those calls again on real CPU tensors under the same seed, so the random stream is consumed exactly
as an eager build consumes it: the values are the eager build's, bit for bit. Each parameter exists
in full only while its own calls run (draws that a later call overwrites go to a scratch tensor and
are dropped), then ``place(name, tensor)`` keeps what this rank needs (its TP slice) on its device.

Why our own: torch's meta device gives the construction, not the values; torchdistx's deferred_init
(which records at the dispatcher) is unmaintained and not installable with our torch.

Rules the model code must follow (checked, :class:`DeferredInitError` names the parameter): every
parameter is initialised in place, as a whole (``nn.Parameter(torch.empty(...))`` then an ``nn.init``
call or a ``Tensor.*_`` method, from numbers and the random stream; no values from factory functions
or other computed tensors, no slices of a parameter written, no tied parameters, no buffers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# Calls that replace every value of their tensor: a draw before the last one of these only has to
# consume the random stream. Others (mul_, add_, clamp_, ...) continue the values of the call before.
OVERWRITING = {"uniform_", "normal_", "fill_", "zero_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
               "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "trunc_normal_", "orthogonal_", "eye_",
               "dirac_", "sparse_", "copy_", "random_", "exponential_", "geometric_", "log_normal_", "cauchy_"}
# In-place calls that change a flag, not the values: run as they are.
FLAGS = {"requires_grad_", "share_memory_", "retain_grad_"}
# Reads of a parameter's metadata that construction may do freely.
METADATA = {"__get__", "dim", "size", "is_contiguous", "numel", "__len__", "stride", "is_floating_point",
            "is_complex", "ndimension", "nelement", "element_size", "__repr__", "__format__"}


class DeferredInitError(ValueError):
    pass


@dataclass
class InitCall:
    func: Callable
    name: str  # the parameter it writes
    args: tuple
    kwargs: dict
    overwrites: bool


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Callable, int, tuple, dict]] = []  # (function, id of the tensor written, args)
        self.touched: list[tuple[str, int]] = []  # (op name, id of the tensor) of every other op
        self.aliases: dict[int, int] = {}  # id of p.data / p.detach() -> id of p (writes to them are p's)
        self.keep: list[torch.Tensor] = []  # tensors whose ids are recorded, alive so that the ids stay theirs
        self.meta_inputs: list[tuple[str, int]] = []  # in-place calls that read other meta tensors

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Tensor methods pass the tensor first; nn.init functions pass it as the keyword "tensor".
        target = args[0] if args else kwargs.get("tensor")
        op = getattr(func, "__name__", str(func))
        if (isinstance(target, torch.Tensor) and target.is_meta and op.endswith("_") and not op.startswith("__")
                and op not in FLAGS):
            # An in-place call on a meta tensor computes nothing: recorded, not run (running it would
            # also import torch._dynamo through the meta kernels of the random ops, ~1 s).
            key = self.aliases.get(id(target), id(target))
            rest = {k: v for k, v in kwargs.items() if k != "tensor"}
            if any(isinstance(a, torch.Tensor) and a.is_meta for a in (*args[1:], *rest.values())):
                self.meta_inputs.append((op, key))  # values computed on the meta device: nothing to replay
            self.calls.append((func, key, args[1:], rest))
            self.keep.append(target)  # alive, so that no later tensor takes its id
            return target
        out = func(*args, **kwargs)
        if isinstance(target, torch.Tensor):
            key = self.aliases.get(id(target), id(target))
            attr = getattr(getattr(func, "__self__", None), "__name__", None)  # of a property's __get__
            if (op == "__get__" and attr == "data") or op == "detach":
                self.aliases[id(out)] = key
                self.keep.append(out)
            elif op not in METADATA and op not in FLAGS:
                self.touched.append((op, key))
        return out


def record(build: Callable[[], nn.Module]) -> tuple[nn.Module, list[InitCall]]:
    """``build()`` on the meta device (no memory, no random draws) and its parameters' init calls, in
    order."""
    recorder = _Recorder()
    with torch.device("meta"), recorder:
        model = build()
    names = {id(p): n for n, p in model.named_parameters()}
    tied = [n for n, p in model.named_parameters(remove_duplicate=False) if names.get(id(p)) != n]
    if tied:
        raise DeferredInitError(f"parameters {', '.join(tied)} are tied to others; deferred init covers untied ones")
    if any(True for _ in model.buffers()):
        raise DeferredInitError(f"{type(model).__name__} has buffers; deferred init covers parameters only")
    for op, key in recorder.meta_inputs:
        if key in names:
            raise DeferredInitError(f"parameter {names[key]}: {op} from another tensor computed during construction "
                                    "(only initialisation from numbers and the random stream can be replayed)")
    for op, key in recorder.touched:
        if key in names:
            raise DeferredInitError(f"parameter {names[key]}: {op} during construction (only whole in-place "
                                    "initialisation can be replayed)")
    stray = [getattr(func, "__name__", str(func)) for func, key, _, _ in recorder.calls if key not in names]
    if stray:  # e.g. a temporary drawn from the random stream: the replay would not draw it
        raise DeferredInitError(f"{stray[0]} on a tensor that is not a parameter during construction (only "
                                "parameters' initialisation is replayed, so the random stream would diverge)")
    calls = [InitCall(func, names[key], args, kwargs, getattr(func, "__name__", "") in OVERWRITING)
             for func, key, args, kwargs in recorder.calls]
    first = {}
    for c in calls:
        first.setdefault(c.name, c.overwrites)
    for name in names.values():
        if name not in first:
            raise DeferredInitError(f"parameter {name} is never initialised in place (its values would come from "
                                    "a factory function): use nn.Parameter(torch.empty(...)) and an nn.init call")
        if not first[name]:
            raise DeferredInitError(f"parameter {name}: its first initialisation call does not set every value")
    return model, calls


def materialize(calls: list[InitCall], shapes: dict[str, tuple[torch.Size, torch.dtype]],
                place: Callable[[str, torch.Tensor], None]) -> None:
    """Replay ``calls`` on CPU from the global random state (seed it as before an eager build; it ends
    where an eager build leaves it), one parameter at a time; ``place(name, full)`` receives each
    parameter's final values (CPU, full shape) once its last call has run. ``shapes``: name -> (shape,
    dtype) of every parameter, from the meta model before any layer was swapped."""
    # A parameter's calls fall into segments, each starting with an overwriting call. Only the last
    # segment's values are kept; an earlier one lives from its first call to its last and is dropped
    # then (its draws still consumed the random stream as they must).
    last = {c.name: i for i, c in enumerate(calls)}
    segment_end: dict[int, bool] = {}
    following: dict[str, bool] = {}
    for i in reversed(range(len(calls))):
        name = calls[i].name
        segment_end[i] = following.get(name, True)  # the parameter's next call overwrites, or there is none
        following[name] = calls[i].overwrites
    current: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, c in enumerate(calls):
            if c.overwrites:
                shape, dtype = shapes[c.name]
                current[c.name] = torch.empty(shape, dtype=dtype)
            c.func(current[c.name], *c.args, **c.kwargs)
            if i == last[c.name]:
                place(c.name, current.pop(c.name))
            elif segment_end[i]:
                del current[c.name]


def place_into(model: nn.Module, device: torch.device | str, shard: Callable[[str, torch.Tensor], torch.Tensor]
               = lambda name, t: t) -> Callable[[str, torch.Tensor], None]:
    """A ``place`` for :func:`materialize`: a parameter still on the meta device becomes a real one on
    ``device`` holding ``shard(name, full)`` (this rank's slice of a tensor-parallel layer, else
    ``full``), with the attributes set on the meta one (megatron-core's TP flags); one that is already
    real receives ``shard(name, full)``."""
    modules = dict(model.named_modules())

    def place(name: str, full: torch.Tensor) -> None:
        owner, _, attr = name.rpartition(".")
        module = modules[owner]
        old = getattr(module, attr)
        if old.is_meta:
            part = shard(name, full)
            if part is not full:  # a slice is a view of the whole: its own storage, or the whole stays alive
                part = part.clone(memory_format=torch.contiguous_format)
            new = nn.Parameter(part.to(device), requires_grad=old.requires_grad)
            new.__dict__.update(old.__dict__)
            setattr(module, attr, new)
        else:
            old.data.copy_(shard(name, full))

    return place
