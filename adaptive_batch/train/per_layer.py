"""PerLayerBackward: a per-layer rule's subset gradients (DBA's), written into ``.grad``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..contract import (
    Feedback,
    FeedbackSink,
    LayerSelection,
    LayerSelectionRule,
    check_policy_for_stage,
    layer_rule_of,
    require_keys,
)
from ..errors import AdaptiveBatchTypeError
from ..load import get_field, split_indexed
from ..probe import HeadLoss, LossFn, PerSampleGradients, resolve_loss

__all__ = ["PerLayerBackward"]


class PerLayerBackward:
    """One call in place of ``loss.backward()`` that gives every layer its own subset gradient.

    For each batch: per-sample gradients of every layer (``torch.func``, in chunks of at most
    ``max_grad_numel`` numbers), a subset per layer chosen by the policy's per-layer rule, and the
    mean of each layer's subset gradients *added* to ``.grad`` as ``backward()`` would. The
    optimizer is not touched: call ``optimizer.step()`` as usual.

    Args:
        model: the model; samples must be independent in its forward (a BatchNorm layer in
            training mode is refused with a clear error; dropout is fine).
        policy: a policy with a per-layer rule (:class:`~adaptive_batch.policies.DBA`), or the
            rule itself (``DBASelection``).
        sampler: the sampler to report to (batches must then come from an IndexedDataset).
        loss: ``"cross_entropy"``, ``"mse"`` or ``loss_fn(outputs, targets) -> per-sample losses``.
        inputs, targets: where the inputs and targets are in each batch.
        max_grad_numel: memory bound of the per-sample gradients (default ``2**26`` numbers).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from adaptive_batch.policies import DBA
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> backward = PerLayerBackward(model, DBA())
        >>> optimizer.zero_grad()
        >>> loss = backward((torch.randn(16, 4), torch.randint(0, 3, (16,))))  # not loss.backward()
        >>> optimizer.step()
        >>> sorted(backward.last_selection.masks)
        ['0', '2']
    """

    RULE_KEY = "rule"

    def __init__(
        self,
        model: nn.Module,
        policy: Any,
        *,
        sampler: FeedbackSink | None = None,
        loss: str | LossFn | HeadLoss = "cross_entropy",
        inputs: int | str = 0,
        targets: int | str = 1,
        max_grad_numel: int = 2**26,
    ) -> None:
        rule = layer_rule_of(policy)
        if not isinstance(rule, LayerSelectionRule):
            raise AdaptiveBatchTypeError(
                "policy must have a per-layer rule (a DBA policy or a DBASelection); got "
                f"{type(policy).__name__}"
            )
        check_policy_for_stage(policy, "per_layer")
        if sampler is not None:
            sampler.register_reporter(self)
        self.model = model
        self.rule = rule
        self.sampler = sampler
        self.loss = resolve_loss(loss)
        self.inputs = inputs
        self.targets = targets
        self.max_grad_numel = max_grad_numel
        self.last_selection: LayerSelection | None = None
        self.last_feedback: Feedback | None = None

    def __call__(self, batch: Any) -> Tensor:
        """Write the per-layer subset gradients of ``batch`` into ``.grad``; return the batch's
        mean loss (detached)."""
        indices, batch = split_indexed(batch, required=self.sampler is not None)
        grads = PerSampleGradients(
            self.model, self.loss.per_sample, max_grad_numel=self.max_grad_numel
        )
        device = next(iter(grads.params.values())).device
        x = get_field(batch, self.inputs).to(device, non_blocking=True)
        y = get_field(batch, self.targets).to(device, non_blocking=True)
        seeds = grads.new_seeds(x.shape[0])  # the same dropout masks in both passes
        grams, losses = grads.layer_grams(x, y, seeds=seeds)
        selection = self.rule.select_layers(losses, grams)
        weights = {layer: (m.float() / m.sum()).to(device) for layer, m in selection.masks.items()}
        sums = grads.weighted_sums(x, y, weights, seeds=seeds)
        with torch.no_grad():
            for name, parameter in grads.params.items():
                update = sums[name].to(parameter.dtype)
                if parameter.grad is None:
                    parameter.grad = update
                else:
                    parameter.grad += update
        self.last_selection = selection
        self._report(selection, indices, x.shape[0])
        return losses.mean().detach()

    def _report(self, selection: LayerSelection, indices: Tensor | None, size: int) -> None:
        used = torch.stack(list(selection.masks.values())).any(dim=0)
        positions = torch.arange(size)
        kept, dropped = positions[used], positions[~used]
        if indices is not None:
            kept, dropped = indices[kept], indices[dropped]
        stats = {**selection.stats, "kept_fraction": selection.kept_fraction}
        self.last_feedback = Feedback(
            kept=kept, dropped=dropped, reason=selection.reason, stats=stats
        )
        if self.sampler is not None:
            self.sampler.feedback(self.last_feedback)

    def state_dict(self) -> dict[str, Any]:
        return {self.RULE_KEY: self.rule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        require_keys(self, state, (self.RULE_KEY,))
        self.rule.load_state_dict(state[self.RULE_KEY])
