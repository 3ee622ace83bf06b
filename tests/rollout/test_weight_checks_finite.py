"""check_finite finds every NaN / inf tensor (by its extremes first), and only those."""

import pytest
import torch

from megatron_vespo.rollout.embedded.weight_checks import check_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_each_non_finite_value_is_named_with_its_count(dtype, value):
    good = torch.randn(7, 5).to(dtype)
    poisoned = torch.randn(33).to(dtype)
    poisoned[[3, 20]] = value
    with pytest.raises(ValueError, match=r"1 tensor\(s\) hold NaN or inf: w2 \(2 of 33 values non-finite\)"):
        check_finite([("w1", good), ("w2", poisoned), ("ids", torch.arange(4)), ("empty", torch.zeros(0))])


def test_large_finite_values_pass():
    huge = torch.tensor([torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max, 0.0])
    check_finite([("w", huge), ("d", torch.tensor([1e300, -1e300], dtype=torch.float64))])


def test_dtypes_without_cpu_aminmax_are_checked_exactly():
    fp8 = getattr(torch, "float8_e5m2", None)  # e5m2 has inf and NaN
    if fp8 is None:
        pytest.skip("no float8_e5m2 in this torch")
    t = torch.tensor([1.0, float("inf")]).to(fp8)
    with pytest.raises(ValueError, match="f8"):
        check_finite([("f8", t)])
    check_finite([("ok", torch.tensor([1.0, 2.0]).to(fp8))])
