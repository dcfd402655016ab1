"""Per-sample gradients of a module's parameters, grouped by layer, in memory-bounded chunks.

``torch.func`` computes them (``vmap(grad(...))`` over ``functional_call``). Everything is built
from chunks of samples whose gradients fit a budget of numbers; a Gram block needs two chunks at
once, so chunks are recomputed rather than all held. Each chunk runs under its own RNG seed, so a
recomputed chunk sees the same dropout masks as the first time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..errors import AdaptiveBatchError, AdaptiveBatchTypeError, renamed_arguments

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
        max_grad_numel: the most per-sample gradient numbers held at once. Chunks are sized so
            that the two a Gram block needs, and what ``torch.func`` allocates while computing
            one, stay within it (measured: ``adaptive-batch bench probe``).

    Raises:
        AdaptiveBatchError: for a BatchNorm layer in training mode (it mixes the samples of a
            batch, so per-sample gradients do not exist), or a module without trainable
            parameters.
    """

    @renamed_arguments(max_numel="max_grad_numel")
    def __init__(self, module: nn.Module, loss_fn: LossFn, *, max_grad_numel: int = 2**26) -> None:
        for name, sub in module.named_modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training:
                raise AdaptiveBatchError(
                    f"{name or type(sub).__name__} is a BatchNorm layer in training mode: it mixes "
                    "the samples of a batch, so per-sample gradients do not exist. Put it in eval "
                    "mode, or use GroupNorm / LayerNorm."
                )
        if max_grad_numel < 1:
            raise AdaptiveBatchError(f"max_grad_numel must be positive; got {max_grad_numel}")
        self.module = module
        self.loss_fn = loss_fn
        self.max_grad_numel = max_grad_numel
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not self.params:
            raise AdaptiveBatchError(f"{type(module).__name__} has no trainable parameters")
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

    def chunk_slices(self, batch: int, results: int | None = None) -> list[slice]:
        """Row slices of the batch: one when all its gradients fit the budget, else chunks of
        half of what the budget leaves beside the ``B x B`` results (a Gram block holds two
        chunks). ``results`` counts the ``B x B`` matrices held (default: one per layer)."""
        count = len(self.layers) if results is None else results
        room = max(self.max_grad_numel - (count + 1) * batch * batch, 0)
        if batch * self.num_params <= room:
            return [slice(0, batch)]
        size = max(1, room // (2 * self.num_params))
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
        """Per-sample gradients (``{parameter: [rows, ...]}``) and losses of the rows."""
        params = {n: p.detach().to(dtype) for n, p in self.params.items()}
        per_sample = vmap(
            grad(self._sample_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different"
        )
        with self._seeded(seed, inputs.device):
            return per_sample(params, inputs[rows], targets[rows])

    def _accumulate(
        self,
        out: dict[str, Tensor],
        a: dict[str, Tensor],
        b: dict[str, Tensor],
        rows: tuple[slice, slice],
    ) -> None:
        """Add the chunks' gradient products into ``out`` (one matrix per layer, or one for all
        under the key ``""``), in place: flattened views, no copy of a chunk is ever made."""
        rows_a, rows_b = rows
        for layer, names in self.layers.items():
            block: Tensor | None = None
            for n in names:
                x, y = a[n].flatten(1), b[n].flatten(1)
                block = x @ y.T if block is None else block.addmm_(x, y.T)
            assert block is not None
            target = out[layer] if layer in out else out[""]
            target[rows_a, rows_b] += block
            if rows_a != rows_b:
                target[rows_b, rows_a] += block.T

    def _grams(
        self, inputs: Tensor, targets: Tensor, seeds: list[int] | None, keys: list[str]
    ) -> tuple[dict[str, Tensor], Tensor]:
        inputs, targets, dtype = self._check(inputs, targets)
        batch = inputs.shape[0]
        slices = self.chunk_slices(batch, len(keys))
        seeds = self._check_seeds(seeds, batch, len(keys))
        out = {key: inputs.new_zeros(batch, batch, dtype=dtype) for key in keys}
        losses = inputs.new_empty(batch, dtype=dtype)
        for i, rows_i in enumerate(slices):
            g_i, losses[rows_i] = self._chunk(inputs, targets, rows_i, seeds[i], dtype)
            self._accumulate(out, g_i, g_i, (rows_i, rows_i))
            for j in range(i + 1, len(slices)):
                g_j = self._chunk(inputs, targets, slices[j], seeds[j], dtype)[0]
                self._accumulate(out, g_i, g_j, (rows_i, slices[j]))
                del g_j
            del g_i
        return out, losses

    def layer_grams(
        self, inputs: Tensor, targets: Tensor, *, seeds: list[int] | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """``{layer: [B, B]}`` Gram matrices of per-sample gradients, one per layer, and the
        ``[B]`` per-sample losses they are the gradients of."""
        return self._grams(inputs, targets, seeds, list(self.layers))

    def gram(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """``[B, B]`` Gram matrix of the per-sample gradients of all parameters."""
        return self._grams(inputs, targets, None, [""])[0][""]

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

    def _check_seeds(
        self, seeds: list[int] | None, batch: int, results: int | None = None
    ) -> list[int]:
        count = len(self.chunk_slices(batch, results))
        if seeds is None:
            return torch.randint(0, 2**62, (count,)).tolist()
        if len(seeds) != count:
            raise AdaptiveBatchError(f"expected {count} seeds (one per chunk); got {len(seeds)}")
        return seeds

    def _check(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
        if not isinstance(inputs, Tensor):
            raise AdaptiveBatchTypeError(
                f"per-sample gradients need a tensor of inputs; got {type(inputs).__name__}"
            )
        if targets.shape[:1] != inputs.shape[:1]:
            raise AdaptiveBatchError(
                f"inputs and targets differ in batch size: {inputs.shape[0]} vs {targets.shape[0]}"
            )
        dtype = (
            torch.promote_types(inputs.dtype, torch.float32)
            if inputs.is_floating_point()
            else torch.float32
        )
        return inputs, targets, dtype
