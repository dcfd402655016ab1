"""Stage 3, probe: per-sample losses and per-sample gradient statistics of a candidate batch.

:class:`HeadProbe` runs one forward pass and summarises the per-sample gradients of the head as a
``B x B`` Gram matrix: in closed form for the head types registered in
:data:`~.head_gradients.CLOSED_FORMS` (``nn.Linear``), with ``torch.func`` in memory-bounded
chunks otherwise (:class:`PerSampleGradients`). Losses are looked up by name in
:data:`~.losses.LOSSES` (``"cross_entropy"``, ``"mse"``, ``"sequence_cross_entropy"``) or given
as callables.
"""

from .head_gradients import (
    CLOSED_FORMS,
    functorch_gram,
    gradient_moments,
    linear_head_gram,
    linear_head_moments,
    register_closed_form,
)
from .head_probe import HeadProbe, call_model, check_model_output, find_head, to_device
from .losses import (
    LOSSES,
    HeadLoss,
    LossFn,
    register_loss,
    resolve_loss,
    sequence_cross_entropy,
)
from .per_sample import PerSampleGradients
from .transfer import HostCopy

__all__ = [
    "CLOSED_FORMS",
    "LOSSES",
    "HeadLoss",
    "HeadProbe",
    "HostCopy",
    "LossFn",
    "PerSampleGradients",
    "call_model",
    "check_model_output",
    "find_head",
    "functorch_gram",
    "gradient_moments",
    "linear_head_gram",
    "linear_head_moments",
    "register_closed_form",
    "register_loss",
    "resolve_loss",
    "sequence_cross_entropy",
    "to_device",
]
