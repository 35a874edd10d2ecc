"""The built-in patterns, in the order the backend tries them."""
from __future__ import annotations

from .rms_norm import PATTERN as RMS_NORM

BUILTIN_PATTERNS = [RMS_NORM]

__all__ = ["BUILTIN_PATTERNS"]
