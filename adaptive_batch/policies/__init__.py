"""Selection and sizing rules: the decision half of adaptive batching.

Every name here is a plain object over tensors and numbers: rules import neither the model nor
``torch.utils.data``, only :mod:`adaptive_batch.contract`. See ``docs/policies.md``.
"""

from .arbiter import Arbiter
from .base import (
    EpochPlanRule,
    InBatchRule,
    KeepAll,
    LayerSelectionRule,
    Policy,
    SelectionRule,
    SizingRule,
    Stateless,
    in_batch_rule_of,
    layer_rule_of,
    plan_rule_of,
    probe_scope_of,
    selection_rule_of,
    sizing_rule_of,
)
from .cabs import CABS
from .constant import Constant
from .damp import AdaDamp, GeoDamp, PadaDamp
from .dba import DBA, DBASelection, DBASizing
from .edba import EDBA, EDBASelection, EDBASizing
from .gns import GradientNoiseScale
from .in_batch import InBatchSmallLoss
from .infobatch import InfoBatch
from .random_subset import RandomSubset
from .selective_backprop import SelectiveBackprop, StaleSelectiveBackprop
from .small_loss import SmallLoss, SmallLossPlan, SmallLossSelection

__all__ = [
    "CABS",
    "DBA",
    "EDBA",
    "AdaDamp",
    "Arbiter",
    "Constant",
    "DBASelection",
    "DBASizing",
    "EDBASelection",
    "EDBASizing",
    "EpochPlanRule",
    "GeoDamp",
    "GradientNoiseScale",
    "InBatchRule",
    "InBatchSmallLoss",
    "InfoBatch",
    "KeepAll",
    "LayerSelectionRule",
    "PadaDamp",
    "Policy",
    "RandomSubset",
    "SelectionRule",
    "SelectiveBackprop",
    "SizingRule",
    "SmallLoss",
    "SmallLossPlan",
    "SmallLossSelection",
    "StaleSelectiveBackprop",
    "Stateless",
    "in_batch_rule_of",
    "layer_rule_of",
    "plan_rule_of",
    "probe_scope_of",
    "selection_rule_of",
    "sizing_rule_of",
]
