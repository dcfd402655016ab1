"""Copying a step's small results to the host without stalling the device.

A stage's per-step numbers (a batch's losses and statistics) are a few hundred floats. Copying
them to the host with a blocking copy would make the host wait for the device every step;
:class:`HostCopy` starts a non-blocking copy into pinned memory instead and is read a step later,
when the device is long done with it. On the CPU it is a no-op. (The other direction, host to
device, is :func:`adaptive_batch.probe.to_device`.)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["HostCopy"]


class HostCopy:
    """A copy of ``tensor`` on the host (``float32`` unless ``dtype`` says otherwise), started
    now and read with :meth:`result`.

    Example:
        >>> import torch
        >>> HostCopy(torch.tensor([1.0, 2.0])).result().tolist()  # on the CPU: no copy at all
        [1.0, 2.0]
    """

    def __init__(self, tensor: Tensor, dtype: torch.dtype = torch.float32) -> None:
        tensor = tensor.detach()
        if tensor.device.type == "cpu":  # (``to`` of the same dtype still costs a dispatch)
            self._host = tensor if tensor.dtype == dtype else tensor.to(dtype)
            self._event = None
            return
        if tensor.device.type == "cuda":
            event = torch.cuda.Event()
        elif hasattr(torch, "Event"):  # other accelerators, torch >= 2.5
            event = torch.Event(device=tensor.device)
        else:  # no event to wait on: a blocking copy
            self._host, self._event = tensor.to("cpu", dtype), None
            return
        # A non-blocking copy from an accelerator lands in pinned memory (torch allocates it so);
        # the event marks when it has.
        self._host = tensor.to("cpu", dtype, non_blocking=True)
        event.record()
        self._event = event

    @property
    def ready(self) -> bool:
        """Whether the copy has landed (reading it then waits for nothing)."""
        return self._event is None or self._event.query()

    def result(self) -> Tensor:
        """The host tensor, once the copy has landed (waits for the copy only, not the step)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host
