"""Arbiter: a small agent network that learns the batch size from a meta-objective (seed 002).

The paper ("Hyper-Learning for Gradient-Based Batch Size Adaptation") describes an agent network
mapping a description of the training state to a batch size ``floor((s_max - s_min) *
sigmoid(l) + s_min)``, trained with gradients of a meta-objective observed over ``T`` inner steps,
without unrolled optimisation or a hypernetwork. The authors' code does not run as stored, and
the abstract does not fix the state description or the meta-objective, so both are ours:

* state: ``[log(L_avg / L_0), log10(noise scale) / 3, position of the current size between
  s_min and s_max on a log scale]``;
* meta-objective: the expected loss decrease *per sample* of one SGD step of batch size ``s``
  under a local quadratic model, ``J(s) = (lr |G|^2 - lr^2 h / 2 (|G|^2 + tr(Sigma) / s)) / s``,
  with ``|G|^2`` and ``tr(Sigma)`` estimated from the window's per-sample gradient statistics and
  the curvature ``h`` fitted so the model reproduces the loss decrease observed over the window.

Every ``T`` updates the agent takes one Adam step ascending ``J`` at the state in which it chose
the window's size, then chooses the next size. The size is held for a whole window so that the
response observed belongs to one size.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from ..contract import Feedback, Progress, check_state_keys
from ..errors import AdaptiveBatchError, renamed_arguments
from .learning_rate import LearningRate

__all__ = ["Arbiter", "arbiter_objective", "fit_curvature"]


def arbiter_objective(
    size: torch.Tensor, lr: float, sqr: float, var: float, curvature: float
) -> torch.Tensor:
    """``J(s) / (lr |G|^2)``: expected loss decrease per sample, relative to a noiseless step.

    ``J(s) = (lr * sqr - lr**2 * curvature / 2 * (sqr + var / s)) / s``.

    Example:
        >>> import torch
        >>> round(float(arbiter_objective(torch.tensor(10.0), lr=0.1, sqr=1.0, var=0.0, curvature=0.0)), 6)
        0.1
    """
    half = lr * curvature / 2
    return (1 - half * (1 + (var / sqr) / size)) / size


def fit_curvature(lr: float, sqr: float, var: float, mean_size: float, decrease: float) -> float:
    """The curvature ``h >= 0`` for which the quadratic model predicts the observed per-step
    ``decrease`` at the mean batch size: ``decrease = lr sqr - lr^2 h / 2 (sqr + var / mean_size)``.

    Example:
        >>> round(fit_curvature(lr=0.1, sqr=1.0, var=0.0, mean_size=10.0, decrease=0.05), 6)
        10.0
    """
    return max(0.0, 2 * (lr * sqr - decrease) / (lr**2 * (sqr + var / mean_size)))


class Arbiter:
    """Batch size from an agent network trained online on a meta-objective (see module docs).

    Args:
        lr: the inner optimizer's learning rate, or a callable returning the current one.
        min_batch_size, max_batch_size: ``s_min`` and ``s_max`` of the agent's output (8 and 512,
            the paper's defaults; formerly ``min_size`` and ``max_size``).
        window: ``T``, inner steps per agent update (10; not given in the paper).
        hidden: width of the agent's hidden layer (16).
        meta_lr: Adam learning rate of the agent (1e-2).
        ema_decay: factor of the running loss average in the state (0.9; formerly ``decay``).
        seed: seed of the agent's initialisation.
    """

    @renamed_arguments(min_size="min_batch_size", max_size="max_batch_size", decay="ema_decay")
    def __init__(
        self,
        lr: float | Any,
        *,
        min_batch_size: int = 8,
        max_batch_size: int = 512,
        window: int = 10,
        hidden: int = 16,
        meta_lr: float = 1e-2,
        ema_decay: float = 0.9,
        seed: int = 0,
    ) -> None:
        if not 1 <= min_batch_size < max_batch_size:
            raise AdaptiveBatchError(
                f"need 1 <= min_batch_size < max_batch_size; got {min_batch_size}, {max_batch_size}"
            )
        if window < 2:
            raise AdaptiveBatchError(
                f"window must be at least 2 (a loss trend needs two points); got {window}"
            )
        self.lr = lr
        self.current_lr = LearningRate(lr)
        self.min_batch_size = min_batch_size
        self.max_batch_size = max_batch_size
        self.window = window
        self.ema_decay = ema_decay
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.agent = nn.Sequential(
                nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 1)
            ).double()
        self.meta_optimizer = torch.optim.Adam(self.agent.parameters(), lr=meta_lr)
        self.history: list[
            tuple[float, float, float, float]
        ] = []  # (size, loss, grad_sq_norm, grad_variance)
        self.state: torch.Tensor | None = None  # where the current size was chosen
        self.current: float | None = None
        self.initial_loss: float | None = None
        self.loss_avg: float | None = None
        self.meta_updates = 0

    def size_of(self, logit: torch.Tensor) -> torch.Tensor:
        """``(s_max - s_min) * sigmoid(l) + s_min`` (before the floor)."""
        return (self.max_batch_size - self.min_batch_size) * torch.sigmoid(
            logit
        ) + self.min_batch_size

    def describe(self, batch_size: float, noise_scale: float) -> torch.Tensor:
        """The agent's input for the current training state."""
        assert self.loss_avg is not None and self.initial_loss is not None
        progress = math.log(max(self.loss_avg, 1e-12) / max(self.initial_loss, 1e-12))
        noise = (
            math.log10(min(max(noise_scale, 1e-3), 1e6)) / 3 if math.isfinite(noise_scale) else 2.0
        )
        span = math.log(self.max_batch_size / self.min_batch_size)
        position = (
            math.log(
                min(max(batch_size, self.min_batch_size), self.max_batch_size) / self.min_batch_size
            )
            / span
        )
        return torch.tensor([progress, noise, position], dtype=torch.float64)

    def next_batch_size(self, batch_size: int, feedback: Feedback, progress: Progress) -> float:
        loss = feedback.stats.get("loss", math.nan)
        sq, v = (
            feedback.stats.get("grad_sq_norm", math.nan),
            feedback.stats.get("grad_variance", math.nan),
        )
        if not all(math.isfinite(x) for x in (loss, sq, v)):
            return batch_size if self.current is None else self.current
        self.initial_loss = loss if self.initial_loss is None else self.initial_loss
        self.loss_avg = (
            loss
            if self.loss_avg is None
            else self.ema_decay * self.loss_avg + (1 - self.ema_decay) * loss
        )
        self.history.append((float(feedback.batch_size), loss, sq, v))
        if self.current is None:
            self._choose(batch_size)
            self.history.clear()  # measured at the sampler's starting size, not the agent's
        elif len(self.history) >= self.window:
            self._meta_step()
            self._choose(self.current)
            self.history.clear()
        assert self.current is not None
        return self.current

    def _window_estimates(self) -> tuple[float, float] | None:
        sqr, var = [], []
        for size, _, sq, v in self.history:
            if size >= 2:
                unbiased = v * size / (size - 1)
                var.append(unbiased)
                sqr.append(sq - unbiased / size)
        if not sqr:
            return None
        return sum(var) / len(var), sum(sqr) / len(sqr)

    def _choose(self, batch_size: float) -> None:
        estimates = self._window_estimates()
        noise = math.inf if estimates is None or estimates[1] <= 0 else estimates[0] / estimates[1]
        self.state = self.describe(batch_size, noise)
        with torch.no_grad():
            self.current = float(math.floor(self.size_of(self.agent(self.state)).item()))

    def _meta_step(self) -> None:
        estimates = self._window_estimates()
        if estimates is None or self.state is None:
            return
        var, sqr = estimates
        if sqr <= 0:
            return  # noise dominates: no reliable gradient signal this window
        losses = torch.tensor([h[1] for h in self.history], dtype=torch.float64)
        steps = torch.arange(len(losses), dtype=torch.float64)
        slope = float(
            ((steps - steps.mean()) * (losses - losses.mean())).sum()
            / (steps - steps.mean()).square().sum()
        )
        mean_size = sum(h[0] for h in self.history) / len(self.history)
        lr = self.current_lr()
        if not math.isfinite(lr):
            return  # no learning rate to fit the curvature with: skip this window
        curvature = fit_curvature(lr, sqr, var, mean_size, decrease=-slope)
        size = self.size_of(self.agent(self.state)).squeeze()
        objective = arbiter_objective(size, lr, sqr, var, curvature) * self.min_batch_size
        self.meta_optimizer.zero_grad()
        (-objective).backward()
        self.meta_optimizer.step()
        self.meta_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(
            {
                "agent": self.agent.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict(),
                "history": list(self.history),
                "state": self.state,
                "current": self.current,
                "initial_loss": self.initial_loss,
                "loss_avg": self.loss_avg,
                "meta_updates": self.meta_updates,
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state)
        state = copy.deepcopy(state)
        self.agent.load_state_dict(state["agent"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.history = list(state["history"])
        self.state = state["state"]
        self.current = state["current"]
        self.initial_loss = state["initial_loss"]
        self.loss_avg = state["loss_avg"]
        self.meta_updates = state["meta_updates"]
