"""Gram matrices of per-sample head gradients, two ways.

* :func:`linear_head_gram` -- closed form for a linear head ``z = W a + b``. The per-sample
  gradient is ``g_i = delta_i (x) [a_i; 1]`` with ``delta_i = dloss_i / dz_i``, so
  ``g_i . g_j = (delta_i . delta_j) (a_i . a_j + 1)``: two ``B x B`` products, never a
  ``B x C x D`` tensor.
* :func:`functorch_gram` -- any head module and any loss: per-sample gradients of the head's
  parameters with ``torch.func`` (``functional_call`` + ``vmap(grad)``), materialised in chunks
  whose size a memory budget bounds.

``delta`` comes from :func:`cross_entropy_logit_grads` (analytic) or :func:`logit_grads` (autograd,
any per-sample loss).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from .per_sample import PerSampleGradients

__all__ = [
    "LossFn",
    "cross_entropy_logit_grads",
    "cross_entropy_losses",
    "functorch_gram",
    "linear_head_gram",
    "logit_grads",
]

#: ``loss_fn(outputs [B, ...], targets [B, ...]) -> per-sample losses [B]``
LossFn = Callable[[Tensor, Tensor], Tensor]


def _is_soft(logits: Tensor, targets: Tensor) -> bool:
    return targets.is_floating_point() and targets.shape == logits.shape


def cross_entropy_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy for class-index or class-probability targets."""
    return F.cross_entropy(logits, targets, reduction="none")


def cross_entropy_logit_grads(logits: Tensor, targets: Tensor) -> Tensor:
    """``[B, C]`` gradients of per-sample cross-entropy with respect to the logits.

    ``softmax(z) - onehot(y)`` for class indices; ``softmax(z) * sum(y) - y`` for probabilities.
    """
    if logits.dim() != 2:
        raise ValueError(
            f"closed-form cross-entropy needs [B, C] logits; got {tuple(logits.shape)}"
        )
    probs = torch.softmax(logits, dim=1)
    if _is_soft(logits, targets):
        return probs * targets.sum(dim=1, keepdim=True) - targets
    if targets.shape != logits.shape[:1] or targets.is_floating_point():
        raise ValueError(
            f"cross-entropy targets must be class indices of shape [B] or probabilities of "
            f"shape [B, C]; got {targets.dtype} of shape {tuple(targets.shape)}"
        )
    return probs.scatter_add(1, targets.long().unsqueeze(1), -torch.ones_like(probs[:, :1]))


def _sample_loss(loss_fn: LossFn) -> Callable[[Tensor, Tensor], Tensor]:
    # Run a batched per-sample loss on one sample by giving it a batch dimension of 1.
    def one(output: Tensor, target: Tensor) -> Tensor:
        return loss_fn(output.unsqueeze(0), target.unsqueeze(0)).sum()

    return one


def logit_grads(logits: Tensor, targets: Tensor, loss_fn: LossFn) -> Tensor:
    """``[B, ...]`` gradients of each sample's loss with respect to its own outputs (autograd)."""
    return vmap(grad(_sample_loss(loss_fn)))(logits, targets)


def linear_head_gram(
    features: Tensor, delta: Tensor, *, weight_term: bool = True, bias_term: bool = True
) -> Tensor:
    """Closed-form ``[B, B]`` Gram matrix of per-sample gradients of a linear head.

    Args:
        features: ``[B, D]`` inputs of the head.
        delta: ``[B, C]`` gradients of the per-sample losses with respect to the head's outputs.
        weight_term: include the weight's gradient (``False`` when the weight is frozen).
        bias_term: include the bias's gradient (``False`` without a trainable bias).

    Example:
        >>> import torch
        >>> a, d = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -0.5]])
        >>> linear_head_gram(a, d).item()  # ||d||^2 * (||a||^2 + 1) = 0.5 * 6
        3.0
    """
    if features.dim() != 2 or delta.dim() != 2 or features.shape[0] != delta.shape[0]:
        raise ValueError(
            f"linear_head_gram needs [B, D] features and [B, C] deltas; got "
            f"{tuple(features.shape)} and {tuple(delta.shape)}"
        )
    if not (weight_term or bias_term):
        raise ValueError("a linear head with neither weight nor bias trainable has no gradient")
    batch = features.shape[0]
    inner = features @ features.T if weight_term else features.new_zeros(batch, batch)
    if bias_term:
        inner = inner + 1.0
    return (delta @ delta.T) * inner


def functorch_gram(
    head: nn.Module,
    features: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    *,
    max_numel: int = 2**26,
) -> Tensor:
    """``[B, B]`` Gram matrix of per-sample gradients of ``head``'s trainable parameters.

    Per-sample gradients come from ``vmap(grad(...))`` over ``functional_call(head, ...)`` in
    chunks holding at most ``max_numel`` numbers (see :class:`~adaptive_batch.per_sample.PerSampleGradients`).
    """
    return PerSampleGradients(head, loss_fn, max_numel=max_numel).gram(features, targets)
