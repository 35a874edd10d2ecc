"""Every fxfuse custom op passes torch.library.opcheck (schema, fake, autograd registration, AOT)."""
import pytest
import torch

import fxfuse  # noqa: F401  (registers the ops)


@pytest.mark.parametrize("shape", [(3, 40), (2, 5, 72)])
def test_rms_norm_ops_opcheck(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(shape[-1], dtype=torch.bfloat16)).requires_grad_()
    torch.library.opcheck(torch.ops.fxfuse.rms_norm.default, (x, w, 1e-6))
    y, rstd = torch.ops.fxfuse.rms_norm(x, w, 1e-6)
    dy = torch.randn_like(y)
    for need_dw in (True, False):
        torch.library.opcheck(torch.ops.fxfuse.rms_norm_backward.default,
                              (dy, x.detach(), w.detach(), rstd.detach(), need_dw))


def test_rms_norm_op_autograd_respects_requires_grad():
    x = torch.randn(4, 40, dtype=torch.bfloat16, requires_grad=True)
    w = 1 + 0.1 * torch.randn(40, dtype=torch.bfloat16)  # frozen, as norm weights are under QLoRA
    y = fxfuse.ops.rms_norm.rms_norm(x, w, 1e-6)
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all() and w.grad is None
