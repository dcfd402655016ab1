"""HeadProbe: per-sample losses and head-gradient Gram matrices from one forward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..contract import ProbeResult
from ..errors import AdaptiveBatchError, AdaptiveBatchTypeError
from .head_gradients import CLOSED_FORMS, closed_form_for, functorch_gram
from .losses import HeadLoss, LossFn, resolve_loss

__all__ = ["HeadProbe", "find_head"]

Method = Literal["auto", "gram", "func"]
Mode = Literal["eval", "train"]


def find_head(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in ``model`` (the usual classifier head)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise AdaptiveBatchError(
            f"{type(model).__name__} has no nn.Linear layer to use as its head. Pass "
            "head=<the module that produces the model's output> (any module works with "
            "method='func'), or head='<its name in model.named_modules()>'."
        )
    return linears[-1]


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside it (tuples, lists, dicts) on ``device``, without making
    the host wait: a CPU tensor bound for a GPU goes through pinned memory and a non-blocking
    copy."""
    if isinstance(obj, Tensor):
        if obj.device == device:
            return obj
        if device.type == "cuda" and obj.device.type == "cpu" and not obj.is_pinned():
            obj = obj.pin_memory()
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``: a tuple as positional arguments, a dict as keyword arguments."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        return model(*inputs)
    return model(inputs)


@contextlib.contextmanager
def preserved(model: nn.Module, mode: Mode, device: torch.device) -> Iterator[None]:
    """Run in ``mode``; restore every module's flag and every RNG, and in train mode buffers."""
    flags = [(m, m.training) for m in model.modules()]
    # Train-mode forwards update BatchNorm statistics; either mode may draw random numbers
    # (dropout, torch.func's per-chunk seeds), which must not move the user's generators.
    saved_buffers = [(b, b.clone()) for b in model.buffers()] if mode == "train" else []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.train(mode == "train")
        try:
            yield
        finally:
            for module, flag in flags:
                module.training = flag
            with torch.no_grad():
                for buffer, saved in saved_buffers:
                    buffer.copy_(saved)


class HeadProbe:
    """Per-sample losses and head-gradient statistics of a batch, without touching the model.

    One forward pass with no autograd graph captures the head's inputs ``a`` and outputs ``z``;
    per-sample gradients of the loss with respect to the head's parameters are then summarised as
    a ``B x B`` Gram matrix (:class:`~adaptive_batch.ProbeResult`).

    Args:
        model: the model being trained. Its output must be the head's output.
        head: the head module or its name; default: the last ``nn.Linear`` in ``model``.
        loss: ``"cross_entropy"`` (class indices or probabilities; targets equal to ``-100`` are
            ignored, as by ``torch``), ``"mse"`` (regression: ``[B]`` targets for a ``[B, 1]``
            head, or targets shaped like the outputs), ``"sequence_cross_entropy"`` (``[B, T, V]``
            logits, ``[B, T]`` tokens, ``-100`` for padding: the mean over a sequence's tokens;
            :func:`~adaptive_batch.probe.sequence_cross_entropy` for another padding id), or
            ``loss_fn(outputs, targets) -> per-sample losses [B]``.
        method: ``"gram"`` -- the closed form registered for the head's type (``nn.Linear`` with
            ``[B, D]`` or ``[B, T, D]`` inputs); it never builds ``B x C x D`` gradients. ``"func"`` -- any head
            and loss, per-sample gradients with ``torch.func`` in memory-bounded chunks.
            ``"auto"`` (default) -- the closed form where it applies, else ``"func"``.
        mode: ``"eval"`` (default) runs the forward in eval mode: BatchNorm uses its running
            statistics, dropout is off, nothing is updated. ``"train"`` uses train-mode behaviour
            (batch statistics, dropout) and then restores the buffers.
        max_grad_numel: ``"func"`` path memory bound: the most per-sample gradient numbers held
            at once (default ``2**26``, 256 MiB in float32).

    The forward runs on the model's device (inputs and targets are moved there) and respects an
    enclosing ``torch.autocast``; the gradient math runs in float32 (or float64 for a float64
    head). Parameters, buffers, every module's train/eval flag and the random number generators
    are left exactly as they were.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> result = HeadProbe(model)(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        >>> tuple(result.losses.shape), tuple(result.gram.shape)
        ((5,), (5, 5))
    """

    def __init__(
        self,
        model: nn.Module,
        head: nn.Module | str | None = None,
        *,
        loss: str | LossFn | HeadLoss = "cross_entropy",
        method: Method = "auto",
        mode: Mode = "eval",
        max_grad_numel: int = 2**26,
    ) -> None:
        if isinstance(head, str):
            head = model.get_submodule(head)
        elif head is None:
            head = find_head(model)
        elif not any(m is head for m in model.modules()):
            raise AdaptiveBatchError(f"head {type(head).__name__} is not a submodule of the model")
        if method not in ("auto", "gram", "func"):
            raise AdaptiveBatchError(f"method must be 'auto', 'gram' or 'func'; got {method!r}")
        if mode not in ("eval", "train"):
            raise AdaptiveBatchError(f"mode must be 'eval' or 'train'; got {mode!r}")
        if method == "gram" and closed_form_for(head) is None:
            raise AdaptiveBatchError(
                f"method='gram' needs a head with a closed form ({', '.join(t.__name__ for t in CLOSED_FORMS)}); "
                f"{type(head).__name__} needs method='func'"
            )
        if max_grad_numel < 1:
            raise AdaptiveBatchError(f"max_grad_numel must be positive; got {max_grad_numel}")
        self.model = model
        self.head = head
        self.loss = resolve_loss(loss)
        self.method = method
        self.mode = mode
        self.max_grad_numel = max_grad_numel

    @property
    def device(self) -> torch.device:
        for tensor in self.head.parameters():
            return tensor.device
        raise AdaptiveBatchError(f"the head {type(self.head).__name__} has no parameters")

    def __call__(self, inputs: Any, targets: Tensor) -> ProbeResult:
        """Probe one batch. ``inputs`` is passed to the model as ``model(inputs)`` (a tuple as
        positional arguments, a dict as keyword arguments)."""
        device = self.device
        inputs = to_device(inputs, device)
        if not isinstance(targets, Tensor):
            raise AdaptiveBatchTypeError(f"targets must be a tensor; got {type(targets).__name__}")
        targets = targets.to(device, non_blocking=True)
        # The gradient math runs in the same mode as the forward: the func path re-runs the head.
        with preserved(self.model, self.mode, device):
            features, outputs = self._forward(inputs)
            if targets.shape[:1] != features.shape[:1]:
                raise AdaptiveBatchError(
                    f"targets must have {features.shape[0]} rows to match the batch; got "
                    f"{tuple(targets.shape)}"
                )
            dtype = torch.promote_types(features.dtype, torch.float32)
            with torch.autocast(device.type, enabled=False):
                features, outputs = features.to(dtype), outputs.to(dtype)
                losses = self.loss.losses(outputs, targets)
                gram = self._gram(features, outputs, targets)
        return ProbeResult(
            losses=losses.detach(), gram=gram.detach(), features=features, logits=outputs
        )

    def _gram(self, features: Tensor, outputs: Tensor, targets: Tensor) -> Tensor:
        if self.method != "func":
            closed = closed_form_for(self.head)
            gram = None
            if closed is not None:
                gram = closed(self.head, features, lambda: self.loss.gradients(outputs, targets))
            if gram is not None:
                return gram
            if self.method == "gram":
                raise AdaptiveBatchError(
                    f"method='gram' needs [B, D] or [B, T, D] head inputs; got {tuple(features.shape)} "
                    "(method='func' takes any shape)"
                )
        return functorch_gram(
            self.head, features, targets, self.loss.per_sample, max_grad_numel=self.max_grad_numel
        )

    def _forward(self, inputs: Any) -> tuple[Tensor, Tensor]:
        captured: list[tuple[Any, Any]] = []

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            captured.append((args[0] if args else None, output))

        handle = self.head.register_forward_hook(hook)
        try:
            with torch.no_grad():
                model_output = call_model(self.model, inputs)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise AdaptiveBatchError(
                f"the head {type(self.head).__name__} ran {len(captured)} times in one forward "
                "pass; the probe needs a head that runs exactly once"
            )
        features, outputs = captured[0]
        if not (isinstance(features, Tensor) and isinstance(outputs, Tensor)):
            raise AdaptiveBatchTypeError("the head must take a tensor and return a tensor")
        check_model_output(model_output, outputs, self.head)
        return features.detach(), outputs.detach()


def check_model_output(model_output: Any, head_output: Tensor, head: nn.Module) -> None:
    """Refuse a model whose output is not its head's (the loss is computed on the head's output).

    The model may reshape it (``squeeze(-1)`` of a ``[B, 1]`` regression head, ``[B * T, V]``
    logits of a language model): the loss still sees the head's shape. Checked on every batch:
    identity or a view of the same memory settles it without a device sync; anything else is
    compared value by value.
    """
    if model_output is head_output:
        return
    same_numbers = (
        isinstance(model_output, Tensor)
        and model_output.numel() == head_output.numel()
        and model_output.dtype == head_output.dtype
    )
    same_layout = same_numbers and (
        (model_output.is_contiguous() and head_output.is_contiguous())
        or (
            model_output.shape == head_output.shape
            and model_output.stride() == head_output.stride()
        )
    )
    same_memory = same_layout and model_output.data_ptr() == head_output.data_ptr()
    if same_memory or (
        same_numbers and torch.equal(model_output.reshape(head_output.shape), head_output)
    ):
        return
    raise AdaptiveBatchError(
        f"the model's output is not the output of its head {type(head).__name__}; the probe "
        "computes the loss on the head's output. Pass head= the module whose output the model "
        "returns (checked on every batch)."
    )
