"""What fxfuse changes in bitsandbytes so that a 4-bit LoRA layer under FSDP2 reaches one graph whole.

FSDP2 (`fully_shard`) replaces each `Params4bit` by a plain parameter (in forward, the all-gathered
unsharded `nn.Parameter`), which has lost `.quant_state`. bitsandbytes' `Linear4bit.forward` then calls
`fix_4bit_weight_quant_state_from_module`, which wraps the weight in a new `Params4bit` in every forward;
`Params4bit.__new__` assigns `self.data = data`, where Dynamo breaks the graph. The 4-bit GEMM and the
adapter path then land in different graphs and no LoRA pattern can fire (tests/test_fsdp2.py).

fxfuse replaces that fix-up, on `import fxfuse`, by the same fix-up done in place: the module's
`quant_state` set on the parameter FSDP2 put there, no `Params4bit` rebuilt. The weight's bytes, its
quantization state and every result are bitsandbytes' own; Dynamo records the attribute store and traces
on. A weight that still has its `quant_state` (no FSDP) is left alone, as before; anything else (no
quantization state on the module, a weight that is not a column of packed bytes) goes to bitsandbytes'
own function, with its warning or assertion. `restore()` puts bitsandbytes' function back.
"""
from __future__ import annotations

import fxfuse_autoload

__all__ = ["install", "restore", "fix_quant_state_in_place"]

_MODULE = "bitsandbytes.nn.modules"
_NAME = "fix_4bit_weight_quant_state_from_module"
_ORIGINAL = {}


def fix_quant_state_in_place(module) -> None:
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:
        return
    state = getattr(module, "quant_state", None)
    if state is None or weight.dim() != 2 or weight.shape[1] != 1:
        return _ORIGINAL[_MODULE](module)
    weight.quant_state = state


def _patch(bnb_modules) -> None:
    original = getattr(bnb_modules, _NAME, None)
    if original is None or original is fix_quant_state_in_place:
        return  # another bitsandbytes, or done already
    _ORIGINAL[_MODULE] = original
    setattr(bnb_modules, _NAME, fix_quant_state_in_place)


def install() -> None:
    """Patch bitsandbytes now if it is imported, else when it is (idempotent)."""
    fxfuse_autoload.patch_after_import(_MODULE, _patch)


def restore() -> None:
    """Put bitsandbytes' own fix-up back (FSDP2's 4-bit LoRA layers then keep the stock path)."""
    import sys
    module = sys.modules.get(_MODULE)
    if module is not None and _MODULE in _ORIGINAL:
        setattr(module, _NAME, _ORIGINAL.pop(_MODULE))
