"""Every place mtx-dist relies on torch internals, in one module.

Each function below depends on something torch does not promise as API; ``tests/test_torch_compat.py``
checks each assumption against the installed torch and fails naming the one that no longer holds.
Verified with torch ``VERIFIED_WITH``.

1. :func:`optimizer_without_dynamo` and :func:`adam_step` -- ``torch.optim.Optimizer``'s
   ``add_param_group``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` are wrapped by
   ``torch._disable_dynamo``, whose wrapper imports ``torch._dynamo`` at the first call (0.85 s of every
   start-up: sympy, the symbolic shapes) to mark them untraceable, and caches the marked function as
   ``__dynamo_disable`` on the undecorated one (``__wrapped__``); ``Adam.step``'s wrapper
   (``_use_grad_for_differentiable``, also ``__wrapped__``) imports it to put graph breaks around the step
   and sets grad mode to the optimizer's ``differentiable`` flag. An eager run traces nothing, so none of
   that has an effect: the cache is filled with the undecorated function, and our AdamW steps through
   ``Adam.step.__wrapped__`` under ``no_grad`` (``differentiable`` is never set). Compiled runs
   (``run.compile``) compile the model only, never the optimizer, and keep torch's wrappers whenever
   ``torch._dynamo`` is already imported.
"""

from __future__ import annotations

import sys

import torch

VERIFIED_WITH = "2.13.0"
DYNAMO = "torch._dynamo"
DISABLED_OPTIMIZER_METHODS = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")
_CACHE = "__dynamo_disable"  # the attribute torch._compile._disable_dynamo caches its result in


def optimizer_without_dynamo() -> bool:
    """(1) Let torch's optimizer methods run without importing ``torch._dynamo``, in a process that has
    not imported it (nothing is being compiled); True if done. Call it only when nothing will trace an
    optimizer method: the methods then run unmarked."""
    if DYNAMO in sys.modules:
        return False
    for name in DISABLED_OPTIMIZER_METHODS:
        fn = getattr(getattr(torch.optim.Optimizer, name), "__wrapped__", None)
        if fn is not None and getattr(fn, _CACHE, None) is None:
            setattr(fn, _CACHE, fn)
    return True


_ADAM_STEP = getattr(torch.optim.Adam.step, "__wrapped__", None)


def adam_step(optimizer: torch.optim.Adam, closure=None):
    """(1) ``Adam.step`` (AdamW's too) without its wrapper's graph breaks, hence without importing
    ``torch._dynamo``; the caller holds ``torch.no_grad``. Falls back to the wrapped step when torch
    no longer exposes the undecorated one."""
    if _ADAM_STEP is None:
        return torch.optim.Adam.step(optimizer, closure)
    return _ADAM_STEP(optimizer, closure)
