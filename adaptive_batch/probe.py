"""HeadProbe: per-sample losses and head-gradient Gram matrices from one forward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .head_gradients import (
    LossFn,
    cross_entropy_logit_grads,
    cross_entropy_losses,
    functorch_gram,
    linear_head_gram,
    logit_grads,
)
from .probe_result import ProbeResult

__all__ = ["HeadProbe", "find_head"]

Method = Literal["auto", "gram", "func"]
Mode = Literal["eval", "train"]


def find_head(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in ``model`` (the usual classifier head)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer to use as its head. Pass "
            "head=<the module that produces the model's output> (any module works with "
            "method='func'), or head='<its name in model.named_modules()>'."
        )
    return linears[-1]


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        return model(*inputs)
    return model(inputs)


@contextlib.contextmanager
def _model_preserved(model: nn.Module, mode: Mode, device: torch.device) -> Iterator[None]:
    """Run a forward in ``mode``; restore every module's flag, and in train mode buffers and RNG."""
    flags = [(m, m.training) for m in model.modules()]
    saved_buffers: list[tuple[Tensor, Tensor]] = []
    with contextlib.ExitStack() as stack:
        if mode == "train":
            # Train-mode forwards update BatchNorm statistics and draw dropout masks.
            saved_buffers = [(b, b.clone()) for b in model.buffers()]
            devices = [device] if device.type == "cuda" else []
            stack.enter_context(torch.random.fork_rng(devices=devices))
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
    a ``B x B`` Gram matrix (:class:`ProbeResult`).

    Args:
        model: the model being trained. Its output must be the head's output.
        head: the head module or its name; default: the last ``nn.Linear`` in ``model``.
        loss: ``"cross_entropy"`` or ``loss_fn(outputs, targets) -> per-sample losses [B]``.
        method: ``"gram"`` -- closed form for an ``nn.Linear`` head with ``[B, D]`` inputs; the
            logit gradients come from the analytic cross-entropy formula or, for another loss, from
            ``torch.func``; it never builds ``B x C x D`` gradients. ``"func"`` -- any head and
            loss, per-sample gradients with ``torch.func`` in memory-bounded chunks. ``"auto"``
            (default) -- ``"gram"`` where it applies, else ``"func"``.
        mode: ``"eval"`` (default) runs the forward in eval mode: BatchNorm uses its running
            statistics, dropout is off, nothing is updated. ``"train"`` uses train-mode behaviour
            (batch statistics, dropout) and then restores buffers and the RNG state.
        max_grad_numel: ``"func"`` path memory bound: the most per-sample gradient numbers held
            at once (default ``2**26``, 256 MiB in float32).

    The forward runs on the model's device (inputs and targets are moved there) and respects an
    enclosing ``torch.autocast``; the gradient math runs in float32 (or float64 for a float64
    head). Every module's train/eval flag is restored exactly.

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
        loss: str | LossFn = "cross_entropy",
        method: Method = "auto",
        mode: Mode = "eval",
        max_grad_numel: int = 2**26,
    ) -> None:
        if isinstance(head, str):
            head = model.get_submodule(head)
        elif head is None:
            head = find_head(model)
        elif not any(m is head for m in model.modules()):
            raise ValueError(f"head {type(head).__name__} is not a submodule of the model")
        if method not in ("auto", "gram", "func"):
            raise ValueError(f"method must be 'auto', 'gram' or 'func'; got {method!r}")
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train'; got {mode!r}")
        if method == "gram" and not isinstance(head, nn.Linear):
            raise ValueError(
                f"method='gram' needs an nn.Linear head; {type(head).__name__} needs method='func'"
            )
        if loss != "cross_entropy" and not callable(loss):
            raise ValueError(f"loss must be 'cross_entropy' or a callable; got {loss!r}")
        if max_grad_numel < 1:
            raise ValueError(f"max_grad_numel must be positive; got {max_grad_numel}")
        self.model = model
        self.head = head
        self.loss = loss
        self.method = method
        self.mode = mode
        self.max_grad_numel = max_grad_numel
        self._output_checked = False

    @property
    def device(self) -> torch.device:
        for tensor in self.head.parameters():
            return tensor.device
        raise ValueError(f"the head {type(self.head).__name__} has no parameters")

    def _loss_fn(self) -> LossFn:
        return cross_entropy_losses if self.loss == "cross_entropy" else self.loss  # type: ignore[return-value]

    def __call__(self, inputs: Any, targets: Tensor) -> ProbeResult:
        """Probe one batch. ``inputs`` is passed to the model as ``model(inputs)`` (a tuple as
        positional arguments, a dict as keyword arguments)."""
        device = self.device
        inputs = _to_device(inputs, device)
        targets = targets.to(device, non_blocking=True)
        # The gradient math runs in the same mode as the forward: the func path re-runs the head.
        with _model_preserved(self.model, self.mode, device):
            features, outputs = self._forward(inputs)
            batch = features.shape[0]
            if targets.shape[:1] != (batch,):
                raise ValueError(
                    f"targets must have {batch} rows to match the batch; got {tuple(targets.shape)}"
                )
            dtype = torch.promote_types(features.dtype, torch.float32)
            with torch.autocast(device.type, enabled=False):
                features, outputs = features.to(dtype), outputs.to(dtype)
                losses = self._loss_fn()(outputs, targets)
                if losses.shape != (batch,):
                    raise ValueError(
                        f"the loss must return per-sample losses of shape [{batch}]; "
                        f"got {tuple(losses.shape)}"
                    )
                if self._use_gram(features):
                    gram = self._gram_closed_form(features, outputs, targets)
                else:
                    gram = functorch_gram(
                        self.head, features, targets, self._loss_fn(), max_numel=self.max_grad_numel
                    )
        return ProbeResult(
            losses=losses.detach(), gram=gram.detach(), features=features, logits=outputs
        )

    def _use_gram(self, features: Tensor) -> bool:
        if self.method == "func":
            return False
        if self.method == "gram" and features.dim() != 2:
            raise ValueError(f"method='gram' needs [B, D] head inputs; got {tuple(features.shape)}")
        return isinstance(self.head, nn.Linear) and features.dim() == 2

    def _gram_closed_form(self, features: Tensor, outputs: Tensor, targets: Tensor) -> Tensor:
        head = self.head
        assert isinstance(head, nn.Linear)
        if self.loss == "cross_entropy":
            delta = cross_entropy_logit_grads(outputs, targets)
        else:
            delta = logit_grads(outputs, targets, self._loss_fn())
        return linear_head_gram(
            features,
            delta,
            weight_term=head.weight.requires_grad,
            bias_term=head.bias is not None and head.bias.requires_grad,
        )

    def _forward(self, inputs: Any) -> tuple[Tensor, Tensor]:
        captured: list[tuple[Tensor, Tensor]] = []

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            captured.append((args[0], output))

        handle = self.head.register_forward_hook(hook)
        try:
            with torch.no_grad():
                model_output = _call(self.model, inputs)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(
                f"the head {type(self.head).__name__} ran {len(captured)} times in one forward "
                "pass; the probe needs a head that runs exactly once"
            )
        features, outputs = captured[0]
        if not (isinstance(features, Tensor) and isinstance(outputs, Tensor)):
            raise TypeError("the head must take a tensor and return a tensor")
        self._check_output(model_output, outputs)
        return features.detach(), outputs.detach()

    def _check_output(self, model_output: Any, head_output: Tensor) -> None:
        # Once per probe: the loss is computed on the head's output, so it must be what the
        # model returns. `is` settles the usual case without a device sync.
        if self._output_checked or model_output is head_output:
            self._output_checked = True
            return
        same = (
            isinstance(model_output, Tensor)
            and model_output.shape == head_output.shape
            and torch.equal(model_output, head_output)
        )
        if not same:
            raise ValueError(
                f"the model's output is not the output of its head {type(self.head).__name__}; "
                "the probe computes the loss on the head's output. Pass head= the module whose "
                "output the model returns."
            )
        self._output_checked = True
