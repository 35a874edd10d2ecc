"""fxfuse.testing.check_pattern: a pattern's exactness in one call (the built-in patterns pass, a replacement
that is less exact or drops a gradient fails), and float64_casts (the reference evaluated in float64)."""
import dataclasses
import importlib.util
import pathlib

import pytest
import torch

from fxfuse.patterns import cross_entropy, rms_norm, swiglu
from fxfuse.testing import ExactnessError, check_pattern, float64_casts


def test_float64_casts_keep_float64():
    x, bf = torch.randn(4, dtype=torch.float64), torch.ones(1, dtype=torch.bfloat16)
    with float64_casts():
        casts = [x.float(), x.half(), x.bfloat16(), x.to(torch.float32), x.to("cpu", torch.bfloat16),
                 x.to(dtype=torch.float16), x.to(bf), x.type_as(bf), torch.softmax(x, 0, dtype=torch.float32)]
        assert all(c.dtype == torch.float64 for c in casts), [c.dtype for c in casts]
        assert x.to(torch.int64).dtype == torch.int64  # not a floating cast
        assert torch.ones(2, dtype=torch.bfloat16).float().dtype == torch.float32  # not float64: untouched
    assert x.float().dtype == torch.float32  # only inside


@pytest.mark.parametrize("pattern", [rms_norm.PATTERN, swiglu.PATTERN, cross_entropy.MEAN, cross_entropy.SUM],
                         ids=lambda p: p.name)
def test_builtin_patterns_pass(pattern):
    results = check_pattern(pattern)
    # Three seeds, every output and every floating input's gradient checked.
    assert len(results) >= 3 * 2 and all(r["rms"] <= 1.25 * r["stock_rms"] for r in results)


def test_odd_shapes_given_by_the_caller():
    x, w = torch.randn(3, 7, 97, dtype=torch.bfloat16), torch.randn(97, dtype=torch.bfloat16)
    assert len(check_pattern(rms_norm.PATTERN, (x, w, 1e-5), seeds=(5,))) == 3  # y, dx, dweight


def test_example_pattern_from_outside_the_package():
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "new_architecture.py"
    spec = importlib.util.spec_from_file_location("fxfuse_example_new_architecture_cp", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    check_pattern(mod.GEMMA_RMS_NORM, (torch.randn(2, 5, 48, dtype=torch.bfloat16),
                                       torch.randn(48, dtype=torch.bfloat16), 1e-6))


def _with_replacement(pattern, replacement):
    return dataclasses.replace(pattern, name=pattern.name + "_broken", replacement=replacement)


def test_a_less_exact_replacement_fails():
    # SwiGLU with a 2^-7 relative error on top: bf16's own rounding is 2^-9, so stock is far closer.
    broken = _with_replacement(swiglu.PATTERN, lambda gate, up: swiglu.swiglu_reference(gate, up) * (1 + 2 ** -7))
    with pytest.raises(ExactnessError, match="error"):
        check_pattern(broken)


def test_a_missing_gradient_fails():
    broken = _with_replacement(swiglu.PATTERN, lambda gate, up: swiglu.swiglu_reference(gate, up.detach()))
    with pytest.raises(ExactnessError, match="no gradient for floating input 1"):
        check_pattern(broken)


def test_nan_fails():
    broken = _with_replacement(swiglu.PATTERN, lambda gate, up: swiglu.swiglu_reference(gate, up) / 0 * 0)
    with pytest.raises(ExactnessError):
        check_pattern(broken)


def test_bad_calls_raise_clear_errors():
    from fxfuse.patterns.lora import PLAIN_LORA
    with pytest.raises(ValueError, match="builds its replacement's arguments"):
        check_pattern(PLAIN_LORA)
    with pytest.raises(ValueError, match="seeds"):
        check_pattern(swiglu.PATTERN, seeds=())
    with pytest.raises(ValueError, match="no floating-point tensor"):
        check_pattern(swiglu.PATTERN, (torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64)))
