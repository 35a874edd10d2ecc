"""Makes `torch_compile_backend="fxfuse"` valid for Hugging Face Trainer / TRL without `import fxfuse`.

transformers hands `torch_compile_backend` to accelerate, whose `DynamoBackend` enum lists the backends
it accepts and rejects any other name before torch ever looks the backend up. torch loads this
module's `register()` at `import torch` (entry-point group `torch.backends`, the hook for out-of-tree
extensions; TORCH_DEVICE_BACKEND_AUTOLOAD=0 turns it off): it imports nothing heavy, it only arranges
for accelerate's enum to learn the name "fxfuse" when accelerate is imported. The backend itself is
found through the `torch_dynamo_backends` entry point, as for any torch.compile call.

Kept outside the `fxfuse` package so that torch's start-up does not import fxfuse (and triton).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_TARGET = "accelerate.utils.dataclasses"
_NAME = "FXFUSE"


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
    except Exception:  # noqa: BLE001 - an optional convenience must not break torch's import
        pass
