"""Every place mtx-dist relies on torch internals, in one module.

Each function below depends on something torch does not promise as API; ``tests/test_torch_compat.py``
checks each assumption against the installed torch and fails naming the one that no longer holds.
Verified with torch ``VERIFIED_WITH``.

1. :func:`optimizer_without_dynamo` and :func:`adam_step` -- ``torch.optim.Optimizer``'s
   ``add_param_group``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` are wrapped by
   ``torch._disable_dynamo``, whose wrapper imports ``torch._dynamo`` at the first call (0.85 s of every
   start-up: sympy, the symbolic shapes) to mark them untraceable, and caches the marked function as
   ``__dynamo_disable`` on the undecorated one (``__wrapped__``); ``Adam.step``'s wrapper
   (``_use_grad_for_differentiable``) imports it to put graph breaks around the step and sets grad mode
   to the optimizer's ``differentiable`` flag. While ``torch._dynamo`` is not imported nothing can trace
   them, so none of that has an effect: the cache holds a function that runs the undecorated one until
   ``torch._dynamo`` is imported (by anyone: a later ``torch.compile`` in the same process) and from
   then on marks it as torch would; our AdamW steps through the undecorated ``Adam.step`` under
   ``no_grad`` on the same condition (and never when ``differentiable`` is set).
"""

from __future__ import annotations

import inspect
import sys

import torch

VERIFIED_WITH = "2.13.0"
DYNAMO = "torch._dynamo"
DISABLED_OPTIMIZER_METHODS = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")
_CACHE = "__dynamo_disable"  # the attribute torch._compile._disable_dynamo caches its result in


def _disabled_once_dynamo_is_there(fn):
    """What torch's wrapper finds in its cache: ``fn`` itself until ``torch._dynamo`` is imported, then
    (for good) ``fn`` marked untraceable, as the wrapper would have made it."""
    def run(*args, **kwargs):
        dynamo = sys.modules.get(DYNAMO)
        if dynamo is None:
            return fn(*args, **kwargs)
        disabled = dynamo.disable(fn, recursive=True, wrapping=False)
        setattr(fn, _CACHE, disabled)
        return disabled(*args, **kwargs)
    return run


def optimizer_without_dynamo() -> bool:
    """(1) Let torch's optimizer methods run without importing ``torch._dynamo`` while nothing has
    imported it; True if done (False: it is imported already, torch's wrappers stay as they are)."""
    if DYNAMO in sys.modules:
        return False
    for name in DISABLED_OPTIMIZER_METHODS:
        fn = getattr(getattr(torch.optim.Optimizer, name), "__wrapped__", None)
        if fn is not None and getattr(fn, _CACHE, None) is None:
            setattr(fn, _CACHE, _disabled_once_dynamo_is_there(fn))
    return True


_ADAM_STEP = inspect.unwrap(torch.optim.Adam.step)  # below torch's step-hook and grad-mode wrappers


def adam_step(optimizer: torch.optim.Adam, closure=None):
    """(1) ``Adam.step`` (AdamW's too) without its wrappers' graph breaks, hence without importing
    ``torch._dynamo``, while it is not imported and ``differentiable`` is off; the caller holds
    ``torch.no_grad``. Otherwise torch's own step."""
    if DYNAMO in sys.modules or optimizer.defaults.get("differentiable") or _ADAM_STEP is torch.optim.Adam.step:
        return torch.optim.Adam.step(optimizer, closure)
    return _ADAM_STEP(optimizer, closure)
