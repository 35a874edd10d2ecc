"""torch.library custom ops: the only bridge between graphs and kernels.

Each op has a fake (meta) implementation and an autograd registration whose backward is again a
custom op, so AOTAutograd and Inductor treat fxfuse kernels as opaque calls.
"""
from . import rms_norm  # noqa: F401  (registers fxfuse::rms_norm_*)
from . import nf4_lora  # noqa: F401  (registers fxfuse::nf4_lora_linear*)
from . import rope  # noqa: F401  (registers fxfuse::rope*)
