"""PerLayerBackward: DBA's per-layer subset gradients, written into ``.grad``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .batch_structure import get_field
from .feedback import Feedback
from .head_gradients import LossFn, cross_entropy_losses
from .indexed import IndexedSample
from .per_sample import PerSampleGradients
from .policies.dba import DBA, DBASelection, LayerSelection
from .sampler import AdaptiveBatchSampler

__all__ = ["PerLayerBackward"]


class PerLayerBackward:
    """One call in place of ``loss.backward()`` that gives every layer DBA's own subset gradient.

    For each batch: per-sample gradients of every layer (``torch.func``, in chunks of at most
    ``max_grad_numel`` numbers), a subset per layer chosen by the policy, and the mean of each
    layer's subset gradients *added* to ``.grad`` as ``backward()`` would. The optimizer is not
    touched: call ``optimizer.step()`` as usual.

    Args:
        model: the model; samples must be independent in its forward (a BatchNorm layer in
            training mode is refused with a clear error; dropout is fine).
        policy: a :class:`~adaptive_batch.policies.DBA` (or a bare ``DBASelection``).
        sampler: the sampler to report to (batches must then come from an IndexedDataset).
        loss: ``"cross_entropy"`` or ``loss_fn(outputs, targets) -> per-sample losses``.
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

    def __init__(
        self,
        model: nn.Module,
        policy: DBA | DBASelection,
        *,
        sampler: AdaptiveBatchSampler | None = None,
        loss: str | LossFn = "cross_entropy",
        inputs: int | str = 0,
        targets: int | str = 1,
        max_grad_numel: int = 2**26,
    ) -> None:
        if isinstance(policy, DBA):
            policy = policy.per_layer
        if not isinstance(policy, DBASelection):
            raise TypeError(
                f"policy must be a DBA policy or a DBASelection; got {type(policy).__name__}"
            )
        if loss != "cross_entropy" and not callable(loss):
            raise ValueError(f"loss must be 'cross_entropy' or a callable; got {loss!r}")
        self.model = model
        self.rule = policy
        self.sampler = sampler
        self.loss_fn: LossFn = cross_entropy_losses if loss == "cross_entropy" else loss  # type: ignore[assignment]
        self.inputs = inputs
        self.targets = targets
        self.max_grad_numel = max_grad_numel
        self.last_selection: LayerSelection | None = None
        self.last_feedback: Feedback | None = None

    def __call__(self, batch: Any) -> Tensor:
        """Write the per-layer subset gradients of ``batch`` into ``.grad``; return the batch's
        mean loss (detached)."""
        indices = None
        if isinstance(batch, IndexedSample):
            indices, batch = torch.as_tensor(batch.index).flatten().cpu(), batch.sample
        elif self.sampler is not None:
            raise ValueError(
                "reporting to a sampler needs dataset indices: wrap the dataset as IndexedDataset(dataset)"
            )
        grads = PerSampleGradients(self.model, self.loss_fn, max_numel=self.max_grad_numel)
        device = next(iter(grads.params.values())).device
        x = get_field(batch, self.inputs).to(device, non_blocking=True)
        y = get_field(batch, self.targets).to(device, non_blocking=True)
        seeds = grads.new_seeds(x.shape[0])  # the same dropout masks in both passes
        grams, losses = grads.layer_grams(x, y, seeds=seeds)
        selection = self.rule.select_layers(losses, {layer: g for layer, g in grams.items()})
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
        return {"rule": self.rule.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state["rule"])
