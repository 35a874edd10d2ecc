"""torch.library custom ops: the only bridge between graphs and kernels.

Each op has a fake (meta) implementation and an autograd registration whose backward is again a
custom op, so AOTAutograd and Inductor treat fxfuse kernels as opaque calls.
"""
from . import rms_norm  # noqa: F401  (registers fxfuse::rms_norm_*)
from . import nf4_lora  # noqa: F401  (registers fxfuse::lora_linear*)
from . import swiglu  # noqa: F401  (registers fxfuse::swiglu*)
from . import cross_entropy  # noqa: F401  (registers fxfuse::cross_entropy*, fused_linear_cross_entropy*)
from . import rope  # noqa: F401  (registers fxfuse::rope*)
from . import attention  # noqa: F401  (registers fxfuse::flash_attention*)
