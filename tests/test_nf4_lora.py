"""LoRA on a bitsandbytes 4-bit base: the op against the stock PEFT module and float64, the pattern
on whole models, and what it declines."""
import pytest
import torch

import fxfuse
from fxfuse.canonicalize import linear_4bit_info
from fxfuse.kernels.nf4 import dequantize_params4bit
from fxfuse.ops.nf4_lora import nf4_lora_linear
from fxfuse.testing import assert_exact

from qlora_llama import batch, build, check_compiled_gradients

ENABLE = {"enable": ["nf4_lora"]}
ODD = dict(hidden_size=72, intermediate_size=200, num_attention_heads=4, num_key_value_heads=2)


def _op_args(mod):
    st = mod.base_layer.weight.quant_state
    nested = (st.state2.absmax, st.state2.code, st.offset, st.state2.blocksize) if st.nested else (None,) * 3 + (0,)
    return (mod.base_layer.weight.data, st.absmax, *nested[:3], mod.lora_A.default.weight,
            mod.lora_B.default.weight, mod.scaling["default"], st.quant_type, st.shape[0], st.shape[1],
            st.blocksize, nested[3])


def _stock(mod, x):
    """The stock bf16 path as bitsandbytes computes it on CUDA (and on CPU through its default kernels):
    dequantize the whole flattened weight, then PEFT's adapter path in fp32."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    st = mod.base_layer.weight.quant_state
    absmax = st.absmax
    if st.nested:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(absmax, st.state2.absmax, st.state2.code,
                                                                     st.state2.blocksize, torch.float32) + st.offset
    w = _dequantize_4bit_compute(mod.base_layer.weight.data.reshape(-1), absmax, _get_4bit_code(st.quant_type, "cpu"),
                                 st.blocksize, st.shape, x.dtype)
    a, b = mod.lora_A.default.weight, mod.lora_B.default.weight
    result = torch.nn.functional.linear(x, w).clone()
    return result + (torch.nn.functional.linear(torch.nn.functional.linear(x.float(), a), b)
                     * mod.scaling["default"]).to(x.dtype)


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "sq"])
@pytest.mark.parametrize("proj", ["mlp.gate_proj", "mlp.down_proj", "self_attn.k_proj"])
@pytest.mark.parametrize("shape", ["llama", "odd"])
def test_op_is_bit_equal_to_stock_and_exact(proj, double_quant, shape):
    model, _ = build(layers=1, twin=False, double_quant=double_quant, **(ODD if shape == "odd" else {}))
    mod = model.get_submodule(f"base_model.model.model.layers.0.{proj}")
    in_f = mod.base_layer.weight.quant_state.shape[1]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 37, in_f, generator=g).to(torch.bfloat16).requires_grad_()  # 111 tokens
    a, b = mod.lora_A.default.weight, mod.lora_B.default.weight

    # For whole-block rows the PEFT module itself is the stock path; see _stock for the others.
    stock = mod(x) if shape == "llama" else _stock(mod, x)
    dy = torch.randn(stock.shape, generator=g).to(torch.bfloat16)
    s_dx, s_da, s_db = torch.autograd.grad(stock, (x, a, b), dy)

    ours = nf4_lora_linear(x, *_op_args(mod))
    o_dx, o_da, o_db = torch.autograd.grad(ours, (x, a, b), dy)
    # Same roundings as the stock path, in the same order: bit-equal.
    assert torch.equal(ours, stock) and torch.equal(o_dx, s_dx)
    assert torch.equal(o_da, s_da) and torch.equal(o_db, s_db)

    # And exact against float64 (criterion of fxfuse.testing).
    w64 = dequantize_params4bit(mod.base_layer.weight).double()
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y64 = x64 @ w64.t() + (x64 @ a64.t()) @ b64.t() * mod.scaling["default"]
    r_dx, r_da, r_db = torch.autograd.grad(y64, (x64, a64, b64), dy.double())
    assert_exact("y", ours, y64, stock)
    for name, o, r, s in (("dx", o_dx, r_dx, s_dx), ("dA", o_da, r_da, s_da), ("dB", o_db, r_db, s_db)):
        assert_exact(name, o, r, s)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_pattern_fires_on_every_adapter_and_gradients_are_exact(checkpointing):
    report = check_compiled_gradients(checkpointing, ENABLE)
    assert report.counts() == {"rms_norm": 5, "nf4_lora": 14}, str(report)
    assert "layers.1.mlp.down_proj" in report.where("nf4_lora")


def test_off_by_default_and_said_so():
    model, _ = build(layers=1, twin=False)
    rep = fxfuse.explain(model, **batch(), options={"inner": "eager"})
    assert "nf4_lora" not in rep.counts()
    assert "off by default" in str(rep) and "nf4_lora" in str(rep)


def test_fp4_base_is_supported():
    model, _ = build(layers=1, twin=False, quant_type="fp4")
    rep = fxfuse.explain(model, **batch(), options={**ENABLE, "inner": "eager"})
    assert rep.counts().get("nf4_lora") == 7, str(rep)


def test_lora_dropout_is_declined_with_the_reason():
    model, _ = build(layers=1, twin=False, lora_dropout=0.1)
    rep = fxfuse.explain(model, **batch(), options={**ENABLE, "inner": "eager"})
    assert "nf4_lora" not in rep.counts()
    reasons = [d.reason for d in rep.declines if d.pattern == "nf4_lora"]
    assert len(reasons) == 7 and all("dropout" in r for r in reasons), reasons


def test_quantization_state_is_read_from_the_graph():
    model, _ = build(layers=1, checkpointing=True, twin=False)
    gms = []
    torch.compile(model, backend=lambda gm, ex: gms.append(gm) or gm.forward)(**batch())
    from fxfuse.canonicalize import canon, subgraphs
    specs = [linear_4bit_info(n) for gm in gms for _, sub in subgraphs(gm) for n in sub.graph.nodes
             if n.op == "call_function" and (c := canon(n)) is not None and c.key == "linear_4bit"]
    assert len(specs) == 7
    for s in specs:
        assert s.quant_type == "nf4" and s.blocksize == 64 and s.bias is None and s.nested is not None
        assert s.weight.meta["example_value"].dtype == torch.uint8
        assert s.absmax.meta["example_value"].dtype == torch.uint8  # double quantization: uint8 absmax
    assert {s.shape for s in specs} == {(64, 64), (32, 64), (128, 64), (64, 128)}


def test_ops_opcheck():
    model, _ = build(layers=1, twin=False, **ODD)
    mod = model.get_submodule("base_model.model.model.layers.0.mlp.down_proj")
    x = torch.randn(2, 5, 200, dtype=torch.bfloat16, requires_grad=True)
    args = (x, *_op_args(mod))
    torch.library.opcheck(torch.ops.fxfuse.nf4_lora_linear.default, args)
