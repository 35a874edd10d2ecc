"""How every fxfuse op is registered with torch.library: one decorator, `triton_op_or_custom_op`.

On the GPU an op is a `torch.library.triton_op`: torch.compile traces into its body (torch ops and
Triton launches through `kernels.common.launch`), so Inductor compiles and launches the kernels
itself. A plain custom op would stay an opaque Python call at run time, and its Python (argument
handling, several Triton launches through Triton's own launcher) cost more host time than the GPU
time of the kernels it starts (measured on the H200: benchmarks/RESULTS.md).

Under Triton's interpreter (CPU tests) the kernels cannot be traced (they run on real data only),
so the op is an opaque `custom_op` with the given fake implementation. Both register the same
Python body, so what the tests check is what runs eagerly on the GPU.

Also here: what a kernel failure looks like to the user (`KernelError`). A Triton kernel can fail
where it was never run before (out of shared memory on a smaller GPU, a launch error). Where an op
launches its kernels itself (a custom op), the failure is raised again as a `KernelError` that names
the op, the kernel, the inputs' shapes and the patterns that put the op in the graph, and says how to
turn them off. Where Inductor launches them (a traced triton_op), the backend names the failure with
the graph's patterns and their shapes, while Inductor compiles the graph or while its forward runs.
"""
from __future__ import annotations

import inspect
import traceback
from typing import Callable, Iterable

import torch

from ..kernels.common import interpreted, memoize_access_analysis

__all__ = ["triton_op_or_custom_op", "KernelError", "is_kernel_failure", "failed_kernel", "kernel_named_in",
           "describe", "disable_hint", "note_pattern_ops", "patterns_of_op"]


class KernelError(RuntimeError):
    """One of fxfuse's Triton kernels failed to compile or run on this device (e.g. it needs more shared
    memory than the GPU gives a block). The message names the op, the kernel, the inputs' shapes and
    the patterns that use it; `options={"disable": [...]}` keeps the stock path there."""


# op name ("fxfuse::rms_norm") -> names of the patterns whose replacements were seen calling it
# (recorded by the backend when it checks a replacement on the graph's fake values).
_PATTERNS_OF_OP: dict[str, set[str]] = {}


def note_pattern_ops(pattern: str, ops: Iterable[str]) -> None:
    for op in ops:
        _PATTERNS_OF_OP.setdefault(op, set()).add(pattern)


def patterns_of_op(op: str) -> list[str]:
    """The patterns that put `op` (or, for "X_backward", its forward X) in a graph in this process."""
    forward = op[: -len("_backward")] if op.endswith("_backward") else op
    return sorted(_PATTERNS_OF_OP.get(op, set()) | _PATTERNS_OF_OP.get(forward, set()))


def is_kernel_failure(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is Triton's: compile, resources, launch, or
    the interpreter's. Errors of fxfuse's own argument checks are not (they are raised as they are)."""
    from triton.runtime.errors import TritonError
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TritonError) or "Triton Error" in str(exc) or "No valid triton configs" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def failed_kernel(exc: BaseException) -> str | None:
    """The name of the fxfuse Triton kernel the traceback of `exc` went through, if any."""
    name = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        fn = getattr(frame.f_locals.get("self"), "fn", None)
        if getattr(fn, "__module__", "").startswith("fxfuse.kernels"):
            name = fn.__name__
    return name


def kernel_named_in(text: str) -> str | None:
    """The first fxfuse Triton kernel whose name appears in `text` (e.g. Inductor's error while it
    compiles its copy of the kernel), or None."""
    import re
    for word in re.findall(r"_[A-Za-z0-9_]+_kernel", text):
        if word in _fxfuse_kernel_names():
            return word
    return None


def _fxfuse_kernel_names() -> set[str]:
    import importlib
    import pkgutil

    from .. import kernels
    names = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        names.update(k for k, v in vars(module).items() if k.endswith("_kernel") and hasattr(v, "fn"))
    return names


def describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe(v) for v in value) + "]"
    return repr(value)


def disable_hint(patterns: list[str]) -> str:
    if not patterns:
        return "torch.compile(..., options={'disable': [<pattern>]}) keeps the stock path for a pattern"
    return f"torch.compile(..., options={{'disable': {patterns!r}}}) keeps the stock path there"


def _kernel_error(op: str, signature: inspect.Signature, args, kwargs, exc: BaseException) -> KernelError:
    try:
        bound = signature.bind(*args, **kwargs)
        inputs = ", ".join(f"{k}: {describe(v)}" for k, v in bound.arguments.items())
    except TypeError:
        inputs = ", ".join(describe(a) for a in args)
    kernel = failed_kernel(exc)
    devices = {str(a.device) for a in args if isinstance(a, torch.Tensor)}
    patterns = patterns_of_op(op)
    return KernelError(
        f"fxfuse op {op}" + (f", Triton kernel {kernel}" if kernel else "") + f" failed on "
        f"{', '.join(sorted(devices)) or 'its device'} for inputs ({inputs}): {type(exc).__name__}: {exc} | "
        f"patterns that use this op: {', '.join(patterns) or 'none recorded in this process'}; "
        f"{disable_hint(patterns)}")


def _raising_kernel_errors(name: str, fn: Callable) -> Callable:
    signature = inspect.signature(fn)

    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not is_kernel_failure(exc):
                raise
            raise _kernel_error(name, signature, args, kwargs, exc) from exc
    run.__name__, run.__qualname__, run.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return run


def triton_op_or_custom_op(name: str, fake: Callable, traced: bool = True):
    """Decorator registering `fn` as the op `name` ("fxfuse::..."), which mutates none of its inputs.

    `fake` computes the outputs' metadata from fake inputs (used when interpreted, or with
    traced=False; a triton_op is its own fake implementation, so `fake` must agree with `fn`'s
    outputs in shape, dtype and strides). traced=False keeps an op opaque on the GPU too: for ops
    whose kernels Inductor has not yet been seen to compile (its copy of a kernel's source is
    compiled with its own argument handling)."""
    def register(fn):
        if interpreted() or not traced:
            # The schema comes from `fn`: the wrapper that names kernel failures has none of its own.
            from torch._library.infer_schema import infer_schema
            schema = infer_schema(fn, mutates_args=())
            op = torch.library.custom_op(name, mutates_args=(), schema=schema)(_raising_kernel_errors(name, fn))
            op.register_fake(fake)
        else:
            memoize_access_analysis()  # compile time: see its docstring
            # Traced by Inductor, whose code then launches the kernels: the backend names a failure there
            # (torch infers a triton_op's schema from the function itself, so it takes no wrapper).
            op = torch.library.triton_op(name, mutates_args=())(fn)
        return op
    return register
