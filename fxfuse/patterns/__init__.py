"""The built-in patterns, in the order the backend tries them."""
from __future__ import annotations

from .lora_nf4 import PATTERN as NF4_LORA
from .rms_norm import PATTERN as RMS_NORM
from .rope import PATTERN as ROPE

BUILTIN_PATTERNS = [RMS_NORM, NF4_LORA, ROPE]

__all__ = ["BUILTIN_PATTERNS"]
