"""fxfuse: a torch.compile backend that rewrites QLoRA Llama training graphs into exact Triton kernels.

    model = torch.compile(model, backend="fxfuse")
    print(fxfuse.explain(model, **batch))
"""
from .backend import fxfuse_backend, last_report
from .matcher import Match, Pattern, PatternError
from .ops.library import KernelError
from .report import Report, explain

import fxfuse_autoload as _autoload

from . import bitsandbytes_compat as _bitsandbytes_compat

_autoload.register()  # covers TORCH_DEVICE_BACKEND_AUTOLOAD=0: importing fxfuse is then enough
_bitsandbytes_compat.install()  # FSDP2's 4-bit LoRA layers whole in one graph (see the module)

__version__ = "0.1.0"
__all__ = ["fxfuse_backend", "explain", "Report", "Pattern", "Match", "PatternError", "KernelError", "last_report"]
