"""Per-sample gradients of a module's parameters, grouped by layer, in memory-bounded chunks.

``torch.func`` computes them (``vmap(grad(...))`` over ``functional_call``). Everything is built
from chunks of samples whose gradients hold at most a budget of numbers; Gram matrices need pairs
of chunks, so chunks are recomputed rather than all held. Each chunk runs under its own RNG seed,
drawn once per call, so a recomputed chunk sees the same dropout masks as the first time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["PerSampleGradients"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _layer_of(parameter_name: str) -> str:
    return parameter_name.rpartition(".")[0]


class PerSampleGradients:
    """Per-sample gradients of ``module``'s trainable parameters.

    A *layer* is the module that owns parameters directly (a ``Linear``, a ``Conv2d``, a
    ``LayerNorm``); layers are named as in ``named_modules()``.

    Args:
        module: the module; its forward must treat samples independently.
        loss_fn: ``loss_fn(outputs [B, ...], targets [B, ...]) -> per-sample losses [B]``.
        max_numel: the most per-sample gradient numbers held at once.

    Raises:
        ValueError: for a BatchNorm layer in training mode (it mixes the samples of a batch, so
            per-sample gradients do not exist), or a module without trainable parameters.
    """

    def __init__(self, module: nn.Module, loss_fn: LossFn, *, max_numel: int = 2**26) -> None:
        for name, sub in module.named_modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
                raise ValueError(
                    f"{name or type(sub).__name__} is a BatchNorm layer in training mode: it mixes "
                    "the samples of a batch, so per-sample gradients do not exist. Put it in eval "
                    "mode, or use GroupNorm / LayerNorm."
                )
        self.module = module
        self.loss_fn = loss_fn
        self.max_numel = max_numel
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError(f"{type(module).__name__} has no trainable parameters")
        self.layers: dict[str, list[str]] = {}
        for name in self.params:
            self.layers.setdefault(_layer_of(name), []).append(name)
        self.num_params = sum(p.numel() for p in self.params.values())

    def _sample_loss(
        self, params: dict[str, Tensor], x: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor]:
        output = functional_call(self.module, params, (x.unsqueeze(0),))
        loss = self.loss_fn(output, y.unsqueeze(0)).sum()
        return loss, loss.detach()

    def chunk_slices(self, batch: int) -> list[slice]:
        """Row slices of the batch: one when all gradients fit the budget, else chunks of half the
        budget each (a Gram block holds two)."""
        if batch * self.num_params <= self.max_numel:
            return [slice(0, batch)]
        size = max(1, self.max_numel // (2 * self.num_params))
        return [slice(i, min(i + size, batch)) for i in range(0, batch, size)]

    def new_seeds(self, batch: int) -> list[int]:
        """One RNG seed per chunk of a batch of this size, from the global generator (a seeded
        run stays reproducible). Pass the same seeds to several calls on the same batch to get
        the same dropout masks in each."""
        return torch.randint(0, 2**62, (len(self.chunk_slices(batch)),)).tolist()

    @contextlib.contextmanager
    def _seeded(self, seed: int, device: torch.device) -> Iterator[None]:
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def _chunk(
        self, inputs: Tensor, targets: Tensor, rows: slice, seed: int, dtype: torch.dtype
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Per-sample gradients and losses of the samples in ``rows``."""
        params = {n: p.detach().to(dtype) for n, p in self.params.items()}
        per_sample = vmap(
            grad(self._sample_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different"
        )
        with self._seeded(seed, inputs.device):
            return per_sample(params, inputs[rows], targets[rows])

    def _flat_by_layer(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            layer: torch.cat([grads[n].flatten(1) for n in names], dim=1)
            for layer, names in self.layers.items()
        }

    def layer_grams(
        self, inputs: Tensor, targets: Tensor, *, seeds: list[int] | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """``{layer: [B, B]}`` Gram matrices of per-sample gradients, one per layer, and the
        ``[B]`` per-sample losses they are the gradients of."""
        inputs, targets, dtype = self._check(inputs, targets)
        batch = inputs.shape[0]
        slices = self.chunk_slices(batch)
        seeds = self._check_seeds(seeds, batch)
        grams = {layer: inputs.new_empty(batch, batch, dtype=dtype) for layer in self.layers}
        losses = inputs.new_empty(batch, dtype=dtype)
        for i, rows_i in enumerate(slices):
            grads_i, losses[rows_i] = self._chunk(inputs, targets, rows_i, seeds[i], dtype)
            g_i = self._flat_by_layer(grads_i)
            for layer, block in g_i.items():
                grams[layer][rows_i, rows_i] = block @ block.T
            for j in range(i + 1, len(slices)):
                rows_j = slices[j]
                g_j = self._flat_by_layer(self._chunk(inputs, targets, rows_j, seeds[j], dtype)[0])
                for layer, block in g_i.items():
                    cross = block @ g_j[layer].T
                    grams[layer][rows_i, rows_j] = cross
                    grams[layer][rows_j, rows_i] = cross.T
        return grams, losses

    def gram(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """``[B, B]`` Gram matrix of the per-sample gradients of all parameters."""
        grams, _ = self.layer_grams(inputs, targets)
        return torch.stack(list(grams.values())).sum(dim=0)

    def weighted_sums(
        self,
        inputs: Tensor,
        targets: Tensor,
        weights: dict[str, Tensor],
        *,
        seeds: list[int] | None = None,
    ) -> dict[str, Tensor]:
        """``{parameter: sum_i weights[layer][i] * g_i}`` for every trainable parameter."""
        inputs, targets, dtype = self._check(inputs, targets)
        slices = self.chunk_slices(inputs.shape[0])
        seeds = self._check_seeds(seeds, inputs.shape[0])
        sums = {n: torch.zeros_like(p, dtype=dtype) for n, p in self.params.items()}
        for rows, seed in zip(slices, seeds, strict=True):
            grads, _ = self._chunk(inputs, targets, rows, seed, dtype)
            for layer, names in self.layers.items():
                w = weights[layer][rows].to(dtype)
                for name in names:
                    sums[name] += torch.tensordot(w, grads[name], dims=1)
        return sums

    def _check_seeds(self, seeds: list[int] | None, batch: int) -> list[int]:
        if seeds is None:
            return self.new_seeds(batch)
        if len(seeds) != len(self.chunk_slices(batch)):
            raise ValueError(
                f"expected {len(self.chunk_slices(batch))} seeds (one per chunk); got {len(seeds)}"
            )
        return seeds

    def _check(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
        if not isinstance(inputs, Tensor):
            raise TypeError(
                f"per-sample gradients need a tensor of inputs; got {type(inputs).__name__}"
            )
        if targets.shape[:1] != inputs.shape[:1]:
            raise ValueError(
                f"inputs and targets differ in batch size: {inputs.shape[0]} vs {targets.shape[0]}"
            )
        dtype = (
            torch.promote_types(inputs.dtype, torch.float32)
            if inputs.is_floating_point()
            else torch.float32
        )
        return inputs, targets, dtype
