"""ProbeResult's quadratic forms against explicit per-sample gradient arithmetic."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaptive_batch import ProbeResult


@given(seed=st.integers(0, 10_000), size=st.integers(1, 30), dim=st.integers(1, 6))
def test_quadratic_forms_match_explicit_gradients(seed, size, dim):
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(size, dim, generator=gen, dtype=torch.float64)
    weights = torch.rand(4, size, generator=gen, dtype=torch.float64) + 0.01
    result = ProbeResult(losses=torch.zeros(size, dtype=torch.float64), gram=grads @ grads.T)

    weighted_means = (weights @ grads) / weights.sum(1, keepdim=True)
    torch.testing.assert_close(
        result.subset_mean_grad_sq_norms(weights), weighted_means.square().sum(1)
    )
    torch.testing.assert_close(result.grad_sq_norms(), grads.square().sum(1))
    mean = grads.mean(0)
    torch.testing.assert_close(result.mean_grad_sq_norm(), mean.square().sum())
    variance = sum(((g - mean) ** 2).sum() for g in grads) / size
    torch.testing.assert_close(result.grad_variance(), variance)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\[B, B\]"):
        ProbeResult(losses=torch.zeros(3), gram=torch.zeros(3, 2))
    with pytest.raises(ValueError):
        ProbeResult(losses=torch.zeros(3, 1), gram=torch.zeros(3, 3))
