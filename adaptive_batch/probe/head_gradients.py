"""Gram matrices of per-sample head gradients: closed forms by head type, ``torch.func`` otherwise.

As opacus keeps a registry of per-layer gradient samplers, the probe keeps one of closed-form
Gram matrices by head type (:data:`CLOSED_FORMS`, extended with :func:`register_closed_form`).
For a linear head ``z = W a + b`` the per-sample gradient is ``g_i = delta_i (x) [a_i; 1]`` with
``delta_i = dloss_i / dz_i``, so ``g_i . g_j = (delta_i . delta_j) (a_i . a_j + 1)``: two
``B x B`` products, never a ``B x C x D`` tensor; a head applied at every position of a
sequence (``[B, T, D]`` inputs) sums over the sample's positions. Any other head goes through
:func:`functorch_gram`: per-sample gradients with ``torch.func``, in memory-bounded chunks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import AdaptiveBatchError, renamed_arguments
from .losses import LossFn
from .per_sample import PerSampleGradients

__all__ = [
    "CLOSED_FORMS",
    "closed_form_for",
    "functorch_gram",
    "gradient_moments",
    "linear_head_gram",
    "linear_head_moments",
    "register_closed_form",
]

#: ``(head, features [B, ...], delta) -> [B, B]``, or ``None`` for inputs it does not take;
#: ``delta()`` gives the ``[B, ...]`` gradients of the per-sample losses with respect to the
#: head's outputs (computed only when the closed form applies).
HeadGram = Callable[[nn.Module, Tensor, Callable[[], Tensor]], "Tensor | None"]
CLOSED_FORMS: dict[type[nn.Module], HeadGram] = {}


def register_closed_form(head_type: type[nn.Module]) -> Callable[[HeadGram], HeadGram]:
    """Register the closed-form Gram of a head type (a decorator)."""

    def register(function: HeadGram) -> HeadGram:
        CLOSED_FORMS[head_type] = function
        return function

    return register


def closed_form_for(head: nn.Module) -> HeadGram | None:
    """The registered closed form for ``head``'s type (or a parent type), else ``None``."""
    for head_type in type(head).__mro__:
        if head_type in CLOSED_FORMS:
            return CLOSED_FORMS[head_type]
    return None


def _token_view(features: Tensor, delta: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """``[B, T, D]`` features and ``[B, T, C]`` deltas (``T = 1`` for ``[B, D]`` inputs)."""
    if features.dim() < 2 or features.shape[:-1] != delta.shape[:-1]:
        raise AdaptiveBatchError(
            f"{name} needs [B, D] (or [B, T, D]) features and [B, C] (or [B, T, C]) deltas with "
            f"the same leading dims; got {tuple(features.shape)} and {tuple(delta.shape)}"
        )
    batch = features.shape[0]
    return features.reshape(batch, -1, features.shape[-1]), delta.reshape(
        batch, -1, delta.shape[-1]
    )


def _check_terms(weight_term: bool, bias_term: bool) -> None:
    if not (weight_term or bias_term):
        raise AdaptiveBatchError(
            "a linear head with neither weight nor bias trainable has no gradient"
        )


def _explicit_gradients(features: Tensor, delta: Tensor, weight_term: bool, bias_term: bool):
    """``[B, C (D + 1)]`` per-sample gradients, written out: for when that is the smaller tensor."""
    parts = [torch.einsum("btc,btd->bcd", delta, features).flatten(1)] if weight_term else []
    if bias_term:
        parts.append(delta.sum(1))
    return torch.cat(parts, dim=1)


def linear_head_gram(
    features: Tensor, delta: Tensor, *, weight_term: bool = True, bias_term: bool = True
) -> Tensor:
    """Closed-form ``[B, B]`` Gram matrix of per-sample gradients of a linear head.

    Args:
        features: ``[B, D]`` inputs of the head, or ``[B, T, D]`` for a head applied at every
            position of a sequence (the sample's gradient sums over its positions).
        delta: ``[B, C]`` (or ``[B, T, C]``) gradients of the per-sample losses with respect to
            the head's outputs.
        weight_term: include the weight's gradient (``False`` when the weight is frozen).
        bias_term: include the bias's gradient (``False`` without a trainable bias).

    ``g_i . g_j = sum_ts (delta_it . delta_js) (a_it . a_js + 1)``: products over pairs of
    positions, ``(B T)^2`` numbers, or the per-sample gradients written out where ``B C (D + 1)``
    is fewer.

    Example:
        >>> import torch
        >>> a, d = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -0.5]])
        >>> linear_head_gram(a, d).item()  # ||d||^2 * (||a||^2 + 1) = 0.5 * 6
        3.0
    """
    _check_terms(weight_term, bias_term)
    a, d = _token_view(features, delta, "linear_head_gram")
    (batch, steps, width), classes = a.shape, d.shape[-1]
    if (batch * steps) ** 2 > batch * classes * (width + 1):
        grads = _explicit_gradients(a, d, weight_term, bias_term)
        return grads @ grads.T
    a, d = a.flatten(0, 1), d.flatten(0, 1)
    inner = a @ a.T if weight_term else a.new_zeros(a.shape[0], a.shape[0])
    if bias_term:
        inner = inner + 1.0
    pairs = (d @ d.T) * inner
    return pairs.view(batch, steps, batch, steps).sum(dim=(1, 3))


@register_closed_form(nn.Linear)
def _linear(head: nn.Module, features: Tensor, delta: Callable[[], Tensor]) -> Tensor | None:
    assert isinstance(head, nn.Linear)
    if features.dim() < 2:
        return None
    return linear_head_gram(
        features,
        delta(),
        weight_term=head.weight.requires_grad,
        bias_term=head.bias is not None and head.bias.requires_grad,
    )


def linear_head_moments(
    features: Tensor, delta: Tensor, *, weight_term: bool = True, bias_term: bool = True
) -> tuple[Tensor, Tensor]:
    """``([B] ||g_i||^2, ||mean_i g_i||^2)`` of a linear head's per-sample gradients in
    ``O(B (C + D))`` memory for ``[B, D]`` inputs: what sizing rules need, without a ``B x B``
    Gram matrix.

    ``||g_i||^2 = ||delta_i||^2 (||a_i||^2 + 1)``; the mean gradient is ``delta^T [a, 1] / B``
    (the head's own gradient shape, ``C x (D + 1)``), or, where that is larger than the batch's
    Gram matrix, the Gram matrix's mean. For ``[B, T, D]`` inputs (a head at every position) a
    sample's squared norm sums over its pairs of positions (``B T^2`` numbers) or, where fewer,
    its gradient written out (``B C (D + 1)``).

    Example:
        >>> import torch
        >>> a, d = torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[0.5, -0.5], [1.0, 0.0]])
        >>> norms, mean = linear_head_moments(a, d)
        >>> norms.tolist(), mean.item()  # 0.5 * 6, 1 * 2; (3 + 2 + 2 * g_0 . g_1) / 4, g_0 . g_1 = 1.5
        ([3.0, 2.0], 2.0)
    """
    _check_terms(weight_term, bias_term)
    if features.dim() == 2 and delta.dim() == 2 and features.shape[0] == delta.shape[0]:
        return _flat_linear_head_moments(features, delta, weight_term, bias_term)
    a, d = _token_view(features, delta, "linear_head_moments")
    (batch, steps, width), classes = a.shape, d.shape[-1]
    if steps * steps <= classes * (width + 1):
        inner = a @ a.transpose(1, 2) if weight_term else a.new_zeros(batch, steps, steps)
        sq_norms = ((d @ d.transpose(1, 2)) * (inner + float(bias_term))).sum(dim=(1, 2))
    else:
        sq_norms = _explicit_gradients(a, d, weight_term, bias_term).square().sum(1)
    if classes * width <= (batch * steps) ** 2:
        a, d = a.flatten(0, 1), d.flatten(0, 1)
        mean_sq = d.new_zeros(())
        if weight_term:
            mean_sq = mean_sq + (d.T @ a).square().sum() / batch**2
        if bias_term:
            mean_sq = mean_sq + d.sum(0).square().sum() / batch**2
    else:
        gram = linear_head_gram(features, delta, weight_term=weight_term, bias_term=bias_term)
        mean_sq = gram.sum() / batch**2
    return sq_norms, mean_sq.clamp_min(0.0)


def _flat_linear_head_moments(
    a: Tensor, d: Tensor, weight_term: bool, bias_term: bool
) -> tuple[Tensor, Tensor]:
    """:func:`linear_head_moments` for ``[B, D]`` inputs in a dozen ops (a step pays each op's
    launch): two row norms, and the mean gradient ``d^T a / B`` with the bias's ``sum d / B``."""
    batch = a.shape[0]
    d_sq = d.square().sum(1)
    if weight_term:
        sq_norms = d_sq * (a.square().sum(1) + float(bias_term))
        total = (d.T @ a).square().sum()
        if bias_term:
            total = total + d.sum(0).square().sum()
    else:
        sq_norms, total = d_sq, d.sum(0).square().sum()
    return sq_norms, (total / batch**2).clamp_min(0.0)


def gradient_moments(
    head: nn.Module, features: Tensor, delta: Callable[[], Tensor]
) -> tuple[Tensor, Tensor] | None:
    """:func:`linear_head_moments` for a linear head; else the moments of the registered
    closed-form Gram matrix; ``None`` for a head with neither."""
    if isinstance(head, nn.Linear) and features.dim() >= 2:
        return linear_head_moments(
            features,
            delta(),
            weight_term=head.weight.requires_grad,
            bias_term=head.bias is not None and head.bias.requires_grad,
        )
    closed = closed_form_for(head)
    gram = closed(head, features, delta) if closed is not None else None
    if gram is None:
        return None
    return gram.diagonal(), (gram.sum() / gram.shape[0] ** 2).clamp_min(0.0)


@renamed_arguments(max_numel="max_grad_numel")
def functorch_gram(
    head: nn.Module,
    features: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    *,
    max_grad_numel: int = 2**26,
) -> Tensor:
    """``[B, B]`` Gram matrix of per-sample gradients of ``head``'s trainable parameters.

    Per-sample gradients come from ``vmap(grad(...))`` over ``functional_call(head, ...)`` in
    chunks holding at most ``max_grad_numel`` numbers (see
    :class:`~adaptive_batch.probe.PerSampleGradients`).
    """
    return PerSampleGradients(head, loss_fn, max_grad_numel=max_grad_numel).gram(features, targets)
