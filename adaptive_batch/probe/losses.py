"""Per-sample losses on the head's outputs, by name, with their gradients in closed form.

A :class:`HeadLoss` gives per-sample losses ``[B]`` and, where it is known in closed form, the
gradient of each sample's loss with respect to that sample's outputs (``delta``); without it the
gradient comes from ``torch.func``. Named losses are looked up in :data:`LOSSES`
(:func:`register_loss` adds one); any callable ``loss_fn(outputs, targets) -> [B]`` works too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from ..errors import AdaptiveBatchError, AdaptiveBatchTypeError

__all__ = [
    "LOSSES",
    "HeadLoss",
    "LossFn",
    "register_loss",
    "resolve_loss",
    "sequence_cross_entropy",
]

#: ``loss_fn(outputs [B, ...], targets [B, ...]) -> per-sample losses [B]``
LossFn = Callable[[Tensor, Tensor], Tensor]

IGNORE_INDEX = -100  # torch's default for cross-entropy: such targets carry no loss and no gradient


@dataclass(frozen=True)
class HeadLoss:
    """A per-sample loss and what is known about it.

    Attributes:
        name: how it is asked for (``HeadProbe(model, loss=name)``).
        per_sample: ``(outputs, targets) -> [B]``.
        output_grads: ``(outputs, targets) -> [B, ...]``, the gradient of each sample's loss with
            respect to its own outputs in closed form; ``None`` computes it with ``torch.func``.
        check: raises a clear error for outputs and targets the loss cannot take.
    """

    name: str
    per_sample: LossFn
    output_grads: LossFn | None = None
    check: Callable[[Tensor, Tensor], None] | None = None

    def losses(self, outputs: Tensor, targets: Tensor) -> Tensor:
        if self.check is not None:
            self.check(outputs, targets)
        losses = self.per_sample(outputs, targets)
        if losses.shape != outputs.shape[:1]:
            raise AdaptiveBatchError(
                f"the loss must return per-sample losses of shape [{outputs.shape[0]}]; got "
                f"{tuple(losses.shape)} (use reduction='none' and reduce all but the batch dim)"
            )
        return losses

    def gradients(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``[B, ...]`` gradient of each sample's loss with respect to its own outputs."""
        if self.output_grads is not None:
            return self.output_grads(outputs, targets)

        def one(output: Tensor, target: Tensor) -> Tensor:
            return self.per_sample(output.unsqueeze(0), target.unsqueeze(0)).sum()

        return vmap(grad(one))(outputs, targets)


LOSSES: dict[str, HeadLoss] = {}


def register_loss(loss: HeadLoss) -> HeadLoss:
    """Make ``loss`` available by its name."""
    LOSSES[loss.name] = loss
    return loss


def resolve_loss(loss: str | LossFn | HeadLoss) -> HeadLoss:
    """The :class:`HeadLoss` for a name, a callable (gradients by ``torch.func``) or itself."""
    if isinstance(loss, HeadLoss):
        return loss
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise AdaptiveBatchError(
                f"unknown loss {loss!r}: give one of {sorted(LOSSES)} or a callable "
                "loss_fn(outputs, targets) -> per-sample losses [B]"
            )
        return LOSSES[loss]
    if callable(loss):
        return HeadLoss(getattr(loss, "__name__", "custom"), loss)
    raise AdaptiveBatchTypeError(
        f"loss must be a name in {sorted(LOSSES)} or a callable; got {type(loss).__name__}"
    )


def _check_cross_entropy(logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 2:
        raise AdaptiveBatchError(
            f"loss='cross_entropy' needs [B, C] outputs; the head gives {tuple(logits.shape)}. "
            "For [B, T, V] sequence logits use loss='sequence_cross_entropy'; for other shapes "
            "pass loss=<a callable returning per-sample losses [B]>."
        )
    if logits.shape[1] == 1:
        raise AdaptiveBatchError(
            "the head has a single output, and cross-entropy over one class is always 0 (every "
            "batch would be scored alike and the policy would never move): for regression use "
            "HeadProbe(model, loss='mse'), or a loss callable"
        )
    if targets.is_floating_point():
        if targets.shape != logits.shape:
            raise AdaptiveBatchError(
                f"cross-entropy takes class indices (integers, [B]) or class probabilities "
                f"([B, C] floats); got float targets of shape {tuple(targets.shape)}. For "
                "regression use HeadProbe(model, loss='mse'), or a loss callable"
            )
    elif targets.shape != logits.shape[:1]:
        raise AdaptiveBatchError(
            f"cross-entropy class indices must have shape [B] = [{logits.shape[0]}]; got "
            f"{tuple(targets.shape)}"
        )


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE_INDEX)


def _cross_entropy_grads(logits: Tensor, targets: Tensor) -> Tensor:
    """``softmax(z) - onehot(y)`` (zero for ignored targets); ``softmax(z) * sum(y) - y`` for
    probabilities."""
    probs = torch.softmax(logits, dim=1)
    if targets.is_floating_point():
        return probs * targets.sum(dim=1, keepdim=True) - targets
    ignored = targets == IGNORE_INDEX
    classes = targets.long().masked_fill(ignored, 0).unsqueeze(1)
    delta = probs.scatter_add(1, classes, -torch.ones_like(probs[:, :1]))
    return delta.masked_fill(ignored.unsqueeze(1), 0.0)


def _as_output_shape(outputs: Tensor, targets: Tensor) -> Tensor:
    if targets.shape == outputs.shape:
        return targets
    if outputs.dim() == 2 and outputs.shape[1] == 1 and targets.shape == outputs.shape[:1]:
        return targets.unsqueeze(1)  # [B] targets for a [B, 1] head, the usual regression
    raise AdaptiveBatchError(
        f"loss='mse' needs targets shaped like the outputs {tuple(outputs.shape)} (or [B] for "
        f"[B, 1] outputs); got {tuple(targets.shape)}"
    )


def _check_mse(outputs: Tensor, targets: Tensor) -> None:
    if not targets.is_floating_point():
        raise AdaptiveBatchError(
            f"loss='mse' needs float targets; got {targets.dtype} (class indices belong to "
            "loss='cross_entropy')"
        )
    _as_output_shape(outputs, targets)


def _mse(outputs: Tensor, targets: Tensor) -> Tensor:
    diff = outputs - _as_output_shape(outputs, targets).to(outputs.dtype)
    return diff.square().flatten(1).mean(dim=1)


def _mse_grads(outputs: Tensor, targets: Tensor) -> Tensor:
    diff = outputs - _as_output_shape(outputs, targets).to(outputs.dtype)
    return 2.0 * diff / diff[0].numel()


def sequence_cross_entropy(ignore_index: int = IGNORE_INDEX, *, shift: bool = False) -> HeadLoss:
    """Cross-entropy of a sequence model: logits ``[B, T, V]``, token targets ``[B, T]``; a
    sequence's loss is the mean over its tokens whose target is not ``ignore_index`` (padding,
    prompt tokens), and those carry no gradient. Registered as ``"sequence_cross_entropy"`` with
    torch's ``-100``; call it for another padding id: ``HeadProbe(model,
    loss=sequence_cross_entropy(ignore_index=pad_id))``.

    With ``shift=True`` the targets are the batch's ``labels`` of a causal language model, which
    the model shifts itself (``transformers``' ``...ForCausalLM``): position ``t``'s logits
    predict ``labels[:, t + 1]``, and the last position predicts nothing. Registered as
    ``"causal_lm_cross_entropy"``; it equals the model's own loss per sequence.

    Example:
        >>> import torch
        >>> loss = sequence_cross_entropy()
        >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens: log(4) per token
        >>> round(loss.losses(logits, torch.tensor([[1, 2, -100]])).item(), 4)  # padding left out
        1.3863
        >>> causal = sequence_cross_entropy(shift=True)  # labels as the model takes them
        >>> round(causal.losses(logits, torch.tensor([[1, 2, -100]])).item(), 4)  # predicts only the 2
        1.3863
    """
    name = "causal_lm_cross_entropy" if shift else "sequence_cross_entropy"

    def aligned(targets: Tensor) -> Tensor:
        """The target of each position's logits (the next label, when shifted)."""
        if not shift:
            return targets
        return F.pad(targets[:, 1:], (0, 1), value=ignore_index)

    def check(logits: Tensor, targets: Tensor) -> None:
        if logits.dim() != 3:
            raise AdaptiveBatchError(
                f"loss={name!r} needs [B, T, V] logits; the head gives "
                f"{tuple(logits.shape)} (for [B, C] use loss='cross_entropy')"
            )
        if targets.is_floating_point() or targets.shape != logits.shape[:2]:
            raise AdaptiveBatchError(
                f"loss={name!r} needs integer token targets of shape [B, T] = "
                f"{list(logits.shape[:2])}, {ignore_index} where there is no token; got "
                f"{targets.dtype} {tuple(targets.shape)}"
            )

    def counts(targets: Tensor) -> Tensor:
        return (targets != ignore_index).sum(dim=1).clamp_min(1)  # all padding: loss 0, not NaN

    def losses(logits: Tensor, targets: Tensor) -> Tensor:
        targets = aligned(targets)
        tokens = F.cross_entropy(
            logits.transpose(1, 2), targets.long(), reduction="none", ignore_index=ignore_index
        )
        return tokens.sum(dim=1) / counts(targets)

    def gradients(logits: Tensor, targets: Tensor) -> Tensor:
        targets = aligned(targets)
        batch, steps, vocab = logits.shape
        flat = targets.reshape(-1).long()
        flat = flat.masked_fill(flat == ignore_index, IGNORE_INDEX)
        delta = _cross_entropy_grads(logits.reshape(-1, vocab), flat).view(batch, steps, vocab)
        return delta / counts(targets).to(delta.dtype).view(batch, 1, 1)

    return HeadLoss(name, losses, gradients, check)


cross_entropy = register_loss(
    HeadLoss("cross_entropy", _cross_entropy, _cross_entropy_grads, _check_cross_entropy)
)
mse = register_loss(HeadLoss("mse", _mse, _mse_grads, _check_mse))
register_loss(sequence_cross_entropy())
register_loss(sequence_cross_entropy(shift=True))
