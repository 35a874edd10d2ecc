"""Causal-LM cross-entropy as custom ops: `fxfuse::cross_entropy`, `fxfuse::lm_head_cross_entropy`,
`fxfuse::fused_linear_cross_entropy` and their backwards.

    causal_lm_cross_entropy(logits_2d, labels_1d, ignore_index, num_items_in_batch)
    lm_head_causal_lm_loss(hidden, weight, labels_1d, ignore_index, num_items_in_batch)
        -> (loss, logits, carrier)
    fused_linear_cross_entropy(hidden_2d, weight, labels_1d, ignore_index, num_items_in_batch, chunk_rows)

are transformers' `ForCausalLMLoss` after its label shift: `F.cross_entropy(logits.float(), labels,
ignore_index=..., reduction='mean')`, or reduction 'sum' divided by `num_items_in_batch`. Both
return the fp32 scalar loss.

The ops return per-row losses (fp64) and logsumexps (fp32); the reduction is plain torch, in fp64
with one rounding to fp32 at the end (kernels/cross_entropy.py says why), and autograd through it
hands the backward op its per-row scale, dloss / count or dloss / num_items_in_batch, exactly as
the stock fp32 division computes it. The lse output takes no gradient (marked non-differentiable:
a silently missing gradient would be worse than an error).

`lm_head_cross_entropy` is the lm_head projection and the loss together, for a graph that also
returns the logits: the forward forms the [N, V] logits a chunk of rows at a time and returns them
whole; it does not keep them for the backward, which forms each chunk again (so logits the caller
drops are freed at once), overwrites it with the loss's gradient and multiplies it out to
dhidden = dlogits @ weight: the full [N, V] gradient never exists. The returned logits take no
gradient in the op: `attach_logits_grad` gives them one, outside the compiled graph (see there why).

`fused_linear_cross_entropy` also replaces the lm_head projection, for a caller that needs no
logits: it computes the logits `hidden @ weight.T` in hidden's dtype, as the stock lm_head does, a
chunk of rows at a time, and applies the cross-entropy kernel to each chunk, so the [N, V] logits
never exist at once. Its backward computes each chunk's logits again, overwrites them in place with
their gradient (in hidden's dtype, rounded once, as the stock backward rounds it) and multiplies out
dhidden = dlogits @ weight per chunk; dweight, only when the weight requires grad, is accumulated
over the chunks in fp32 and rounded once.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import cross_entropy as kernels

__all__ = ["causal_lm_cross_entropy", "lm_head_causal_lm_loss", "attach_logits_grad", "fused_linear_cross_entropy",
           "default_chunk_rows"]

# A chunk's logits are at most this large (bf16 with Llama-3's 128256 vocabulary: 1024 rows,
# 250 MiB). Big enough that each chunk's GEMMs run at full speed, small next to the stock path's
# [N, V] bf16 logits plus three fp32 copies of them.
_CHUNK_BYTES = 256 * 1024 * 1024
# The fp32 temporary of one dweight update (CUDA: a bf16 GEMM with fp32 output, added into the
# accumulator) is cut along the vocabulary to at most this size.
_DWEIGHT_TEMP_BYTES = 256 * 1024 * 1024


def default_chunk_rows(vocab_size: int, dtype: torch.dtype) -> int:
    """Rows per chunk such that a chunk of logits takes at most ~256 MiB (a multiple of 64 rows when >= 64)."""
    rows = max(1, _CHUNK_BYTES // (vocab_size * torch.empty((), dtype=dtype).element_size()))
    return rows - rows % 64 if rows >= 64 else rows


def _unit_column_stride(t: Tensor) -> Tensor:
    # The kernel takes any row stride; only a column stride other than 1 needs a copy.
    return t if t.dim() != 2 or t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


# ------------------------------------------------------------------------------------------------
# fxfuse::cross_entropy
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("fxfuse::cross_entropy", mutates_args=())
def cross_entropy_op(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    return kernels.cross_entropy_forward(_unit_column_stride(logits), labels.contiguous(), ignore_index)


@cross_entropy_op.register_fake
def _(logits, labels, ignore_index):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float64), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("fxfuse::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(dloss: Tensor, logits: Tensor, labels: Tensor, lse: Tensor,
                              ignore_index: int) -> Tensor:
    return kernels.cross_entropy_backward(dloss, _unit_column_stride(logits), labels.contiguous(),
                                          lse.contiguous(), ignore_index)


@cross_entropy_backward_op.register_fake
def _(dloss, logits, labels, lse, ignore_index):
    return logits.new_empty(logits.shape)


def _ce_setup_context(ctx, inputs, output):
    logits, labels, ignore_index = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(output[1])


def _ce_backward(ctx, dloss, _dlse):
    logits, labels, lse = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None
    return torch.ops.fxfuse.cross_entropy_backward(dloss, logits, labels, lse, ctx.ignore_index), None, None


cross_entropy_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


# ------------------------------------------------------------------------------------------------
# fxfuse::lm_head_cross_entropy
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("fxfuse::lm_head_cross_entropy", mutates_args=())
def lm_head_cross_entropy_op(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                             chunk_rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logits, per-row loss, lse, gradient carrier); chunk_rows: rows of logits formed at a time, here
    and again in the backward. The carrier, fp32 and of hidden's shape, carries the gradient that reaches
    the logits from outside the loss (`attach_logits_grad`); its values are never read."""
    _check_linear(hidden, weight, labels, chunk_rows)
    logits = hidden.new_empty(hidden.shape[0], weight.shape[0])
    loss, lse = _linear_cross_entropy_forward(hidden, weight, labels, ignore_index, chunk_rows, logits_out=logits)
    return logits, loss, lse, gradient_carrier(hidden)


@lm_head_cross_entropy_op.register_fake
def _(hidden, weight, labels, ignore_index, chunk_rows):
    n = hidden.shape[0]
    return (hidden.new_empty(n, weight.shape[0]), hidden.new_empty(n, dtype=torch.float64),
            hidden.new_empty(n, dtype=torch.float32), gradient_carrier(hidden))


def gradient_carrier(hidden: Tensor) -> Tensor:
    """An fp32 tensor of hidden's shape over one element (all strides 0): only its gradient is used, and a
    real one would sit beside the returned logits at the forward's peak (64 MiB at 4096 x 4096). Not a
    view (it has no base), so AOTAutograd returns it as it is; its gradient arrives dense."""
    return hidden.new_zeros(1, dtype=torch.float32).as_strided(hidden.shape, (0,) * hidden.dim())


@torch.library.custom_op("fxfuse::lm_head_cross_entropy_backward", mutates_args=())
def lm_head_cross_entropy_backward_op(dloss: Tensor, dcarrier: Tensor, hidden: Tensor, weight: Tensor,
                                      labels: Tensor, lse: Tensor, ignore_index: int, chunk_rows: int,
                                      need_dhidden: bool, need_dweight: bool) -> tuple[Tensor, Tensor]:
    """dcarrier: the gradient that reached the carrier output (the logits' gradient from outside the
    loss, multiplied out in fp32), added to the loss's before dhidden's one rounding."""
    _check_linear(hidden, weight, labels, chunk_rows)
    return _linear_cross_entropy_backward(dloss, hidden, weight, labels, lse, ignore_index, chunk_rows,
                                          need_dhidden, need_dweight, dhidden_carried=dcarrier)


@lm_head_cross_entropy_backward_op.register_fake
def _(dloss, dcarrier, hidden, weight, labels, lse, ignore_index, chunk_rows, need_dhidden, need_dweight):
    return _grad_buffers(hidden, weight, need_dhidden, need_dweight, fake=True)


def _lmce_setup_context(ctx, inputs, output):
    hidden, weight, labels, ignore_index, chunk_rows = inputs
    # The logits are not saved: the backward forms them again, a chunk at a time (one lm_head product,
    # about 2% of a Llama-3-8B step). Saved, they would stay on the GPU until the backward even where
    # the caller dropped them at once, as training loops and TRL's trainer do: 1 GiB at 2 x 2048 tokens.
    ctx.save_for_backward(hidden, weight, labels, output[2])
    ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows
    # The logits take no gradient here: a differentiable [N, V] output of a compiled graph is handed a
    # zero gradient of its size by autograd whenever the caller does not use it, the very memory this
    # op saves. `attach_logits_grad` gives the returned logits their gradient instead, through the
    # carrier output, whose zero gradient is [N, H] fp32 (and only in the backward).
    ctx.mark_non_differentiable(output[0], output[2])


def _lmce_backward(ctx, _dlogits, dloss, _dlse, dcarrier):
    hidden, weight, labels, lse = ctx.saved_tensors
    need_dhidden, need_dweight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dhidden or need_dweight):
        return None, None, None, None, None
    if dloss is None:  # only the logits were differentiated
        dloss = lse.new_zeros(lse.shape)
    if dcarrier is None:
        dcarrier = hidden.new_zeros(hidden.shape, dtype=torch.float32)
    dhidden, dweight = torch.ops.fxfuse.lm_head_cross_entropy_backward(
        dloss, dcarrier, hidden, weight, labels, lse, ctx.ignore_index, ctx.chunk_rows, need_dhidden,
        need_dweight)
    return (dhidden if need_dhidden else None), (dweight if need_dweight else None), None, None, None


lm_head_cross_entropy_op.register_autograd(_lmce_backward, setup_context=_lmce_setup_context)


class _LogitsGrad(torch.autograd.Function):
    """The lm_head's backward for a gradient that reaches its logits from outside the loss: multiplied
    out in fp32 (not rounded) to the loss op's carrier output, which takes it into the op's backward."""

    @staticmethod
    def forward(ctx, logits, carrier, weight):
        ctx.save_for_backward(weight)
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, dlogits):
        (weight,) = ctx.saved_tensors
        v = dlogits.shape[-1]
        dhidden = _mm_fp32(dlogits.reshape(-1, v), weight).view(*dlogits.shape[:-1], weight.shape[1])
        return None, dhidden, None


def attach_logits_grad(logits: Tensor, carrier: Tensor, weight: Tensor) -> Tensor:
    """The logits returned by `lm_head_causal_lm_loss` (which take no gradient) made differentiable: a
    gradient reaching them flows, as the stock lm_head's would, into `carrier` (its third output)
    and through the loss op's backward to the hidden states. The lm_head weight must be frozen.

    Called outside any compiled graph (the fxfuse backend calls it on the graph's outputs): a caller
    that never differentiates the logits then costs nothing, where a differentiable output of a
    compiled graph is handed a zero gradient the size of the logits."""
    if weight.requires_grad:
        raise ValueError("attach_logits_grad: the lm_head weight requires grad; only a frozen lm_head's returned "
                         "logits are supported (fxfuse keeps a trained lm_head apart from the loss)")
    if not torch.is_grad_enabled() or not carrier.requires_grad:
        return logits
    return _LogitsGrad.apply(logits, carrier, weight)


# ------------------------------------------------------------------------------------------------
# fxfuse::fused_linear_cross_entropy
# ------------------------------------------------------------------------------------------------


def _check_linear(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_rows: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden must be [N, H] and weight [V, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_linear_cross_entropy: hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"fused_linear_cross_entropy: hidden on {hidden.device}, weight on {weight.device}")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"fused_linear_cross_entropy: labels must be 1-D of length N={hidden.shape[0]}, "
                         f"got {tuple(labels.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows}")


def _chunks(n: int, chunk_rows: int):
    for start in range(0, n, chunk_rows):
        yield start, min(start + chunk_rows, n)


def _grad_buffers(hidden: Tensor, weight: Tensor, need_dhidden: bool, need_dweight: bool, fake: bool = False):
    """The backward ops' outputs: dhidden, and dweight's fp32 accumulator (None when not needed; `fake`: the
    op's fake result, dweight in the weight's dtype). A custom op cannot return None: an empty tensor stands
    for "not needed"."""
    dhidden = hidden.new_empty(hidden.shape) if need_dhidden else hidden.new_empty(0)
    if fake:
        return dhidden, weight.new_empty(weight.shape) if need_dweight else weight.new_empty(0)
    return dhidden, (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dweight else None)


def _weight_grad_out(dweight32: Tensor | None, weight: Tensor) -> Tensor:
    """dweight rounded once to the weight's dtype, or the empty stand-in."""
    if dweight32 is None:
        return weight.new_empty(0)
    return dweight32 if weight.dtype == torch.float32 else dweight32.to(weight.dtype)


def _mm_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b of 16-bit (or fp32) matrices in fp32, accumulated in fp32 and not rounded to 16 bits."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    # CPU has no 16-bit GEMM with fp32 output; products of 16-bit values are exact in fp32.
    return a.float() @ b.float()


def _add_weight_grad(dweight32: Tensor, dlogits: Tensor, hidden: Tensor) -> None:
    """dweight32 += dlogits.T @ hidden with fp32 accumulation and no rounding to the 16-bit dtype."""
    if dlogits.dtype == torch.float32:
        dweight32.addmm_(dlogits.t(), hidden)
    elif dlogits.is_cuda:
        # A 16-bit GEMM with fp32 output (fp32 accumulation inside, as the stock dweight GEMM has),
        # cut along the vocabulary so that its fp32 temporary stays small.
        rows = max(1, _DWEIGHT_TEMP_BYTES // (4 * hidden.shape[1]))
        for v0 in range(0, dweight32.shape[0], rows):
            dweight32[v0:v0 + rows] += torch.mm(dlogits[:, v0:v0 + rows].t(), hidden, out_dtype=torch.float32)
    else:
        # CPU has no 16-bit GEMM with fp32 output; products of 16-bit values are exact in fp32, so
        # upcasting and an fp32 GEMM compute the same thing.
        dweight32.addmm_(dlogits.t().float(), hidden.float())


def _linear_cross_entropy_forward(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                                  chunk_rows: int, logits_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(per-row loss, lse) of the logits hidden @ weight.T, formed a chunk of rows at a time in one chunk
    buffer; `logits_out`: where to keep them whole. The backward forms each chunk again by the same
    product on the same shapes, so its logits are these bits and agree with the saved lse."""
    n, v = hidden.shape[0], weight.shape[0]
    labels = labels.contiguous()
    # Checked once for the batch here rather than once per chunk in the kernel wrapper.
    kernels.check_labels(labels, v, ignore_index)
    loss = hidden.new_empty(n, dtype=torch.float64)
    lse = hidden.new_empty(n, dtype=torch.float32)
    in_place = logits_out is not None and _same_product_in_place(logits_out, chunk_rows)
    # One logits buffer for all chunks (the last chunk uses its first rows), as in the backward.
    buf = None if in_place else hidden.new_empty(min(chunk_rows, n), v)
    weight_t = weight.t()
    for start, end in _chunks(n, chunk_rows):
        # The stock lm_head's product, in hidden's dtype (F.linear without bias is this mm).
        out = logits_out[start:end] if in_place else buf[:end - start]
        logits = torch.mm(hidden[start:end], weight_t, out=out)
        kernels.cross_entropy_forward(logits, labels[start:end], ignore_index,
                                      loss_out=loss[start:end], lse_out=lse[start:end], validate_labels=False)
        if logits_out is not None and not in_place:
            logits_out[start:end] = logits
    return loss, lse


def _same_product_in_place(logits_out: Tensor, chunk_rows: int) -> bool:
    """Whether each chunk's product can be written straight into the returned logits and still give the bits
    the backward's product into its chunk buffer gives (tests/test_cross_entropy.py checks it on the GPU):
    on CUDA, where cuBLAS picks its kernel by the shapes and by each pointer's alignment (up to 256 bytes),
    so every chunk of the logits must start 256-byte aligned as a fresh buffer does. It spares a chunk
    buffer beside the whole logits, the forward's peak (250 MiB at Llama-3's vocabulary)."""
    chunk_bytes = chunk_rows * logits_out.stride(0) * logits_out.element_size()
    return logits_out.is_cuda and logits_out.data_ptr() % 256 == 0 and chunk_bytes % 256 == 0


def _linear_cross_entropy_backward(dloss: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, lse: Tensor,
                                   ignore_index: int, chunk_rows: int, need_dhidden: bool, need_dweight: bool,
                                   dhidden_carried: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(dhidden, dweight or its empty stand-in), each chunk's logits formed again as the forward formed
    them; `dhidden_carried`: an fp32 gradient of hidden from elsewhere, added before dhidden's rounding."""
    n, v = hidden.shape[0], weight.shape[0]
    labels, lse = labels.contiguous(), lse.contiguous()
    dhidden, dweight32 = _grad_buffers(hidden, weight, need_dhidden, need_dweight)
    if need_dhidden or need_dweight:
        buf = hidden.new_empty(min(chunk_rows, n), v)
        weight_t = weight.t()
        for start, end in _chunks(n, chunk_rows):
            h = hidden[start:end]
            logits = torch.mm(h, weight_t, out=buf[:end - start])
            # In place: the chunk's gradient overwrites its logits (the kernel reads each row before
            # it writes it), so the backward holds one chunk buffer, never an fp32 gradient.
            dlogits = kernels.cross_entropy_backward(dloss[start:end], logits, labels[start:end],
                                                     lse[start:end], ignore_index, dlogits_out=logits)
            if need_dhidden and dhidden_carried is None:
                # The stock backward's dlogits @ weight, in hidden's dtype, row block by row block.
                torch.mm(dlogits, weight, out=dhidden[start:end])
            elif need_dhidden:
                # The same in fp32 plus the carried gradient, rounded once to hidden's dtype.
                dhidden[start:end] = _mm_fp32(dlogits, weight).add_(dhidden_carried[start:end])
            if need_dweight:
                _add_weight_grad(dweight32, dlogits, h)
    return dhidden, _weight_grad_out(dweight32, weight)


@torch.library.custom_op("fxfuse::fused_linear_cross_entropy", mutates_args=())
def fused_linear_cross_entropy_op(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                                  chunk_rows: int) -> tuple[Tensor, Tensor]:
    _check_linear(hidden, weight, labels, chunk_rows)
    return _linear_cross_entropy_forward(hidden, weight, labels, ignore_index, chunk_rows)


@fused_linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, ignore_index, chunk_rows):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float64), hidden.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("fxfuse::fused_linear_cross_entropy_backward", mutates_args=())
def fused_linear_cross_entropy_backward_op(dloss: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor,
                                           lse: Tensor, ignore_index: int, chunk_rows: int, need_dhidden: bool,
                                           need_dweight: bool) -> tuple[Tensor, Tensor]:
    _check_linear(hidden, weight, labels, chunk_rows)
    return _linear_cross_entropy_backward(dloss, hidden, weight, labels, lse, ignore_index, chunk_rows,
                                          need_dhidden, need_dweight)


@fused_linear_cross_entropy_backward_op.register_fake
def _(dloss, hidden, weight, labels, lse, ignore_index, chunk_rows, need_dhidden, need_dweight):
    return _grad_buffers(hidden, weight, need_dhidden, need_dweight, fake=True)


def _flce_setup_context(ctx, inputs, output):
    hidden, weight, labels, ignore_index, chunk_rows = inputs
    ctx.save_for_backward(hidden, weight, labels, output[1])
    ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows
    ctx.mark_non_differentiable(output[1])


def _flce_backward(ctx, dloss, _dlse):
    hidden, weight, labels, lse = ctx.saved_tensors
    need_dhidden, need_dweight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dhidden or need_dweight):
        return None, None, None, None, None
    dhidden, dweight = torch.ops.fxfuse.fused_linear_cross_entropy_backward(
        dloss, hidden, weight, labels, lse, ctx.ignore_index, ctx.chunk_rows, need_dhidden, need_dweight)
    return (dhidden if need_dhidden else None), (dweight if need_dweight else None), None, None, None


fused_linear_cross_entropy_op.register_autograd(_flce_backward, setup_context=_flce_setup_context)


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def _reduce(loss_rows: Tensor, labels: Tensor, ignore_index: int, num_items_in_batch) -> Tensor:
    # fp64 rows summed in fp64, one division, one rounding to fp32: the correctly rounded mean
    # almost always, where the stock fp32 sum and division are a few tenths of an ulp off.
    total = loss_rows.sum()
    if num_items_in_batch is None:
        # 'mean': divided by the rows not ignored; none at all gives 0 / 0 = NaN, as in torch.
        denominator = (labels != ignore_index).sum()
    elif isinstance(num_items_in_batch, Tensor):
        denominator = num_items_in_batch.to(total.device)
    else:
        denominator = num_items_in_batch  # HF accepts a Python int too
    return (total / denominator).to(torch.float32)


def causal_lm_cross_entropy(logits_2d: Tensor, labels_1d: Tensor, ignore_index: int = -100,
                            num_items_in_batch=None) -> Tensor:
    """transformers' ForCausalLMLoss on already shifted labels: the fp32 scalar loss.

    logits_2d: [N, V] bf16, fp16 or fp32 (any row stride, unit column stride); labels_1d: [N] int64.
    'mean' over the rows whose label is not ignore_index when num_items_in_batch is None, else the
    sum divided by num_items_in_batch (a tensor or an int).
    """
    loss_rows, _ = torch.ops.fxfuse.cross_entropy(logits_2d, labels_1d, ignore_index)
    return _reduce(loss_rows, labels_1d, ignore_index, num_items_in_batch)


def lm_head_causal_lm_loss(hidden: Tensor, weight: Tensor, labels_1d: Tensor, ignore_index: int = -100,
                           num_items_in_batch=None, chunk_rows: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`logits = F.linear(hidden, weight)` and `causal_lm_cross_entropy(logits.view(-1, V), labels_1d, ...)`.

    hidden: [..., H]; weight: [V, H] of the same dtype (the lm_head weight, no bias). Returns
    (loss, logits [..., V], carrier [..., H]: fp32, all strides 0); the backward forms the logits' gradient
    `chunk_rows` rows at a time (default: `default_chunk_rows`, ~256 MiB), never the full [N, V] (module docstring).
    The logits take no gradient: `attach_logits_grad(logits, carrier, weight)` gives them the stock
    lm_head's.
    """
    if hidden.dim() < 1:
        raise ValueError("lm_head_causal_lm_loss: hidden must have a last (feature) dimension")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], hidden.dtype)
    logits, loss_rows, _, carrier = torch.ops.fxfuse.lm_head_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels_1d, ignore_index, chunk_rows)
    loss = _reduce(loss_rows, labels_1d, ignore_index, num_items_in_batch)
    return loss, logits.view(*hidden.shape[:-1], weight.shape[0]), carrier.view(hidden.shape)


def fused_linear_cross_entropy(hidden_2d: Tensor, weight: Tensor, labels_1d: Tensor, ignore_index: int = -100,
                               num_items_in_batch=None, chunk_rows: int | None = None) -> Tensor:
    """`causal_lm_cross_entropy(hidden_2d @ weight.T, labels_1d, ...)` without forming the [N, V] logits.

    hidden_2d: [N, H]; weight: [V, H] of the same dtype (the lm_head weight, no bias). The logits are
    computed `chunk_rows` rows at a time (default: `default_chunk_rows`, ~256 MiB of logits).
    """
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], hidden_2d.dtype)
    loss_rows, _ = torch.ops.fxfuse.fused_linear_cross_entropy(hidden_2d, weight, labels_1d, ignore_index,
                                                               chunk_rows)
    return _reduce(loss_rows, labels_1d, ignore_index, num_items_in_batch)
