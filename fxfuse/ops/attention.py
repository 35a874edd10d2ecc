"""Flash attention as custom ops: `fxfuse::flash_attention` (forward, also returns the logsumexp) and
`fxfuse::flash_attention_backward`.

`flash_attention(q, k, v, causal=..., scale=..., key_padding_mask=..., segment_ids=..., attn_mask=...,
cos=..., sin=...)` is the entry point: q [B, Hq, S, D], k and v [B, Hkv, S, D] (GQA without repeating
k and v), bf16 or fp16, D in 16..128. The mask is the conjunction of
- `causal` (key j visible to query i only if j <= i),
- `key_padding_mask`: bool [B, S], True = a real token (Hugging Face's 2-D `attention_mask`, cast to
  bool); False keys are invisible to every query of the row. Queries are not masked: a padded
  query row still gets an output (0 when it sees no key at all), as in stock SDPA;
- `segment_ids`: int [B, S] ids of packed sequences; a query sees only keys of its own id.
  `segment_ids_from_position_ids` turns TRL padding-free `position_ids` (restarting at 0 at each
  sequence start) into these;
- `attn_mask`: a dense [B or 1, Hq or 1, S, S], for masks the per-token parts cannot express (a 4-D
  mask a model builds itself): bool, SDPA's boolean `attn_mask` (True = may attend), or additive in
  q's dtype (eager attention's 0 / dtype minimum; no gradient), added to the scaled scores. Any
  strides, so an `expand`ed mask costs no copy. Per-token masks are cheaper: the kernels load them once per tile
  row or column, the dense mask once per tile.
Rows that see no key give 0 and zero gradients, as stock SDPA (torch 2.13).

`cos`, `sin` ([B or 1, S, D] in q's dtype, Hugging Face's rotary embedding output before its
`unsqueeze(1)`): RoPE fused into the attention. q and k are passed unrotated and the kernels rotate
them as they load them, bit-equal to HF's `apply_rotary_pos_emb` (fxfuse/kernels/rope.py), so the
rotated q and k are never written; the gradients are those of the unrotated q and k. cos and sin
take no gradient (they are constants of the step in HF's models).
Exact (fxfuse.testing.assert_exact) against a float64 evaluation; see fxfuse/kernels/flash_attention.py.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..kernels import flash_attention as kernels

__all__ = ["flash_attention", "segment_ids_from_position_ids"]


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _masks(key_padding_mask: Optional[Tensor], segment_ids: Optional[Tensor]):
    # HF's attention_mask is int64 of 0/1; any nonzero entry marks a real token.
    kpm = key_padding_mask.ne(0).contiguous() if key_padding_mask is not None else None
    seg = segment_ids.to(torch.int32).contiguous() if segment_ids is not None else None
    return kpm, seg


def _rope(cos: Optional[Tensor], sin: Optional[Tensor]):
    return (_last_dim_contiguous(cos) if cos is not None else None,
            _last_dim_contiguous(sin) if sin is not None else None)


@torch.library.custom_op("fxfuse::flash_attention", mutates_args=())
def flash_attention_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                       key_padding_mask: Optional[Tensor], segment_ids: Optional[Tensor],
                       attn_mask: Optional[Tensor], cos: Optional[Tensor],
                       sin: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    kpm, seg = _masks(key_padding_mask, segment_ids)
    cos, sin = _rope(cos, sin)
    # attn_mask goes as it is: the kernels read any strides (an expanded mask stays unmaterialized).
    return kernels.flash_attention_forward(_last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v),
                                           causal=causal, scale=scale, key_padding_mask=kpm, segment_ids=seg,
                                           attn_mask=attn_mask, cos=cos, sin=sin)


@flash_attention_op.register_fake
def _(q, k, v, causal, scale, key_padding_mask, segment_ids, attn_mask, cos, sin):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fxfuse::flash_attention_backward", mutates_args=())
def flash_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor,
                                causal: bool, scale: float, key_padding_mask: Optional[Tensor],
                                segment_ids: Optional[Tensor], attn_mask: Optional[Tensor],
                                cos: Optional[Tensor], sin: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    kpm, seg = _masks(key_padding_mask, segment_ids)
    cos, sin = _rope(cos, sin)
    return kernels.flash_attention_backward(
        dout.contiguous(), _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v),
        lse.contiguous(), causal=causal, scale=scale, key_padding_mask=kpm, segment_ids=seg,
        attn_mask=attn_mask, cos=cos, sin=sin)


@flash_attention_backward_op.register_fake
def _(dout, q, k, v, lse, causal, scale, key_padding_mask, segment_ids, attn_mask, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, key_padding_mask, segment_ids, attn_mask, cos, sin = inputs
    ctx.causal, ctx.scale = causal, scale
    # The backward recomputes what it needs from q, k, v (unrotated: it rotates them again, as the
    # forward did) and the logsumexp; the output is not kept.
    ctx.save_for_backward(q, k, v, output[1], key_padding_mask, segment_ids, attn_mask, cos, sin)


def _backward(ctx, dout, _dlse):
    q, k, v, lse, key_padding_mask, segment_ids, attn_mask, cos, sin = ctx.saved_tensors
    dq, dk, dv = torch.ops.fxfuse.flash_attention_backward(dout, q, k, v, lse, ctx.causal, ctx.scale,
                                                          key_padding_mask, segment_ids, attn_mask, cos, sin)
    # No gradient for causal, scale, the masks, cos and sin.
    return dq, dk, dv, None, None, None, None, None, None, None


flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


def segment_ids_from_position_ids(position_ids: Tensor) -> Tensor:
    """int32 [B, S] segment ids from packed `position_ids` [B, S]: a new segment starts wherever the
    position restarts at 0 (TRL padding-free batches); ids count from 0 within each row."""
    starts = (position_ids == 0).to(torch.int32)
    return (torch.cumsum(starts, dim=-1, dtype=torch.int32) - 1).contiguous()


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
                    key_padding_mask: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
                    attn_mask: Optional[Tensor] = None, cos: Optional[Tensor] = None,
                    sin: Optional[Tensor] = None) -> Tensor:
    """softmax(scale * q @ k^T + mask) @ v for q [B, Hq, S, D], k/v [B, Hkv, S, D]; returns out [B, Hq, S, D].

    scale defaults to 1/sqrt(D). key_padding_mask: bool [B, S], True = attend to this key.
    segment_ids: int [B, S], attend only within the same id. attn_mask [B or 1, Hq or 1, S, S]: bool,
    True = attend, or additive in q's dtype. All combined with `causal`. cos, sin: [B or 1, S, D] in q's dtype, given together:
    q and k are rotated by RoPE (HF's apply_rotary_pos_emb) inside the kernels."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.ops.fxfuse.flash_attention(q, k, v, causal, float(scale), key_padding_mask, segment_ids,
                                            attn_mask, cos, sin)[0]
