"""What fxfuse changes in the Hugging Face stack at `import torch`, before any model is built.

1. `torch_compile_backend="fxfuse"` is made valid for Hugging Face Trainer / TRL without `import fxfuse`.
transformers hands `torch_compile_backend` to accelerate, whose `DynamoBackend` enum lists the backends
it accepts and rejects any other name before torch ever looks the backend up. torch loads this
module's `register()` at `import torch` (entry-point group `torch.backends`, the hook for out-of-tree
extensions; TORCH_DEVICE_BACKEND_AUTOLOAD=0 turns it off): it imports nothing heavy, it only arranges
for accelerate's enum to learn the name "fxfuse" when accelerate is imported. The backend itself is
found through the `torch_dynamo_backends` entry point, as for any torch.compile call.

2. The forward hook of transformers' `enable_input_require_grads` (which `gradient_checkpointing_enable`,
PEFT and TRL's trainers install on the input embeddings) calls `output.requires_grad_(True)` on an
intermediate tensor, which Dynamo cannot keep in a graph. torch 2.11 breaks the graph there at once; torch
2.13 first traces the whole model, finds the requires-grad intermediate leaked into the loss, restarts, and
then cannot break inside the context managers of PEFT's and transformers' forwards, so every enclosing
frame is traced whole again: 8 tiny layers took 42 s of Dynamo tracing instead of 6. The hook is replaced by
one that makes the same call in a function Dynamo does not trace (`torch.compiler.disable`), so Dynamo
breaks the graph at once in every torch, where torch 2.11 breaks it anyway. Eager runs the same
`requires_grad_` call; compiled runs get the same graphs as under torch 2.11.

Kept outside the `fxfuse` package so that torch's start-up does not import fxfuse (and triton).
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys

_TARGET = "accelerate.utils.dataclasses"
_NAME = "FXFUSE"
_TRANSFORMERS = "transformers.modeling_utils"


def add_to_accelerate(module) -> None:
    """Add FXFUSE to accelerate's DynamoBackend enum (idempotent)."""
    enum_cls = getattr(module, "DynamoBackend", None)
    if enum_cls is None or _NAME in enum_cls.__members__:
        return
    member = str.__new__(enum_cls, _NAME)
    member._name_, member._value_ = _NAME, _NAME
    member.__objclass__ = enum_cls
    enum_cls._member_map_[_NAME] = member
    enum_cls._value2member_map_[_NAME] = member
    enum_cls._member_names_.append(_NAME)


def _requires_grad(output) -> None:
    output.requires_grad_(True)


_requires_grad_in_eager = None  # _requires_grad under torch.compiler.disable, made when transformers is patched


def make_inputs_require_grads(module, input, output) -> None:
    """transformers' hook, its one call kept out of Dynamo's graphs."""
    _requires_grad_in_eager(output)


def _enable_input_require_grads_wrapper(original):
    @functools.wraps(original)
    def enable_input_require_grads(self):
        original(self)
        for handle in getattr(self, "_require_grads_hooks", None) or ():
            hooks = handle.hooks_dict_ref()
            hook = None if hooks is None else hooks.get(handle.id)
            # Only transformers' own hook (by name): a hook someone else registered is theirs to keep.
            if getattr(hook, "__name__", None) == "make_inputs_require_grads" and hook is not make_inputs_require_grads:
                hooks[handle.id] = make_inputs_require_grads

    enable_input_require_grads.fxfuse_patched = True
    return enable_input_require_grads


def break_graph_at_input_require_grads(modeling_utils) -> None:
    """Wrap `PreTrainedModel.enable_input_require_grads` so the hook it installs is the one above (idempotent)."""
    global _requires_grad_in_eager
    cls = getattr(modeling_utils, "PreTrainedModel", None)
    original = getattr(cls, "enable_input_require_grads", None)
    if original is None or getattr(original, "fxfuse_patched", False):
        return  # another transformers, or done already
    import torch
    if _requires_grad_in_eager is None:
        _requires_grad_in_eager = torch.compiler.disable(_requires_grad)
    cls.enable_input_require_grads = _enable_input_require_grads_wrapper(original)


class _PatchAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Lets the normal finders load module `target`, then calls `patch(module)` on it."""

    def __init__(self, target: str = _TARGET, patch=add_to_accelerate):
        self.target, self.patch = target, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        try:
            self.patch(module)
        finally:
            if self in sys.meta_path:
                sys.meta_path.remove(self)


def patch_after_import(target: str, patch) -> None:
    """`patch(module)` on module `target` now if it is imported, else right after its import (once)."""
    if target in sys.modules:
        patch(sys.modules[target])
    elif not any(isinstance(f, _PatchAfterImport) and f.target == target for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport(target, patch))


def register() -> None:
    """Entry point (torch.backends): never raises, so that it can never break `import torch`."""
    try:
        patch_after_import(_TARGET, add_to_accelerate)
        patch_after_import(_TRANSFORMERS, break_graph_at_input_require_grads)
    except Exception:  # noqa: BLE001 - an optional convenience must not break torch's import
        pass
