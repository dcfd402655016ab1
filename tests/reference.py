"""Slow references the fast code is checked against: plain per-sample Python loops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def per_sample_head_grads(
    model: nn.Module, head: nn.Module, inputs: Tensor, targets: Tensor, loss_fn=None
) -> tuple[Tensor, Tensor]:
    """``[B, P]`` per-sample gradients of the head's trainable parameters and ``[B]`` losses,
    one ``autograd.grad`` call per sample, with the model in eval mode."""
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y, reduction="none"))
    params = [p for p in head.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    grads, losses = [], []
    try:
        for i in range(inputs.shape[0]):
            loss = loss_fn(model(inputs[i : i + 1]), targets[i : i + 1]).sum()
            grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
            losses.append(loss.detach())
    finally:
        model.train(was_training)
    return torch.stack(grads), torch.stack(losses)
