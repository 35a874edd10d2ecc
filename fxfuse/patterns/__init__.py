"""The built-in patterns, in the order the backend tries them."""
from __future__ import annotations

from .attention import PATTERNS as ATTENTION
from .cross_entropy import MEAN as CAUSAL_LM_LOSS, SUM as CAUSAL_LM_LOSS_SUM
from .lora import NF4_LORA, NF4_LORA_AUTOCAST, PLAIN_LORA, PLAIN_LORA_BIAS
from .rms_norm import PATTERN as RMS_NORM
from .rope import PATTERN as ROPE
from .swiglu import PATTERN as SWIGLU

BUILTIN_PATTERNS = [RMS_NORM, NF4_LORA, NF4_LORA_AUTOCAST, PLAIN_LORA, PLAIN_LORA_BIAS, ROPE, *ATTENTION, SWIGLU,
                    CAUSAL_LM_LOSS_SUM, CAUSAL_LM_LOSS]

__all__ = ["BUILTIN_PATTERNS"]
