"""moeblocks: composable, typed Mixture-of-Experts building blocks for PyTorch."""

from moeblocks._version import __version__ as __version__
from moeblocks.activations import GLU as GLU
from moeblocks.activations import ClampedGLU as ClampedGLU
from moeblocks.activations import ClampedSwiGLU as ClampedSwiGLU
from moeblocks.activations import GatedActivation as GatedActivation
from moeblocks.adapters import AuxLosses as AuxLosses
from moeblocks.adapters import TensorMoE as TensorMoE
from moeblocks.adapters import collect_aux_losses as collect_aux_losses
from moeblocks.balancing import BiasBalancer as BiasBalancer
from moeblocks.balancing import step_balancers as step_balancers
from moeblocks.capacity import Capacity as Capacity
from moeblocks.dispatch import Dispatcher as Dispatcher
from moeblocks.dispatch import TorchDispatcher as TorchDispatcher
from moeblocks.dispatch import build_layout as build_layout
from moeblocks.dispatchers import make_dispatcher as make_dispatcher
from moeblocks.experts import ExpertBank as ExpertBank
from moeblocks.experts import ExpertInit as ExpertInit
from moeblocks.experts import GELUExperts as GELUExperts
from moeblocks.experts import MLPExperts as MLPExperts
from moeblocks.experts import NormedExperts as NormedExperts
from moeblocks.experts import ScaledExperts as ScaledExperts
from moeblocks.experts import SwiGLUExperts as SwiGLUExperts
from moeblocks.gating import DynamicSelection as DynamicSelection
from moeblocks.gating import ExpertChoice as ExpertChoice
from moeblocks.gating import GroupLimitedTopK as GroupLimitedTopK
from moeblocks.gating import Selection as Selection
from moeblocks.gating import TopK as TopK
from moeblocks.gating import TopP as TopP
from moeblocks.gating import WeightPolicy as WeightPolicy
from moeblocks.grouped import grouped_mm as grouped_mm
from moeblocks.initialization import init_weights as init_weights
from moeblocks.initialization import materialize as materialize
from moeblocks.layer import MoELayer as MoELayer
from moeblocks.losses import AuxLoss as AuxLoss
from moeblocks.losses import BandpassLoss as BandpassLoss
from moeblocks.losses import CVSquaredLoss as CVSquaredLoss
from moeblocks.losses import DispersionLoss as DispersionLoss
from moeblocks.losses import LoadBalanceLoss as LoadBalanceLoss
from moeblocks.losses import SequenceBalanceLoss as SequenceBalanceLoss
from moeblocks.losses import TokenStatLoss as TokenStatLoss
from moeblocks.losses import TokenStats as TokenStats
from moeblocks.losses import ZLoss as ZLoss
from moeblocks.norms import RMSNorm as RMSNorm
from moeblocks.routers import CosineScorer as CosineScorer
from moeblocks.routers import InspectableRouter as InspectableRouter
from moeblocks.routers import LinearScorer as LinearScorer
from moeblocks.routers import Router as Router
from moeblocks.routers import RouterProtocol as RouterProtocol
from moeblocks.routers import Scorer as Scorer
from moeblocks.routing import Layout as Layout
from moeblocks.routing import MoEOutput as MoEOutput
from moeblocks.routing import Routing as Routing
from moeblocks.schedules import ConstantK as ConstantK
from moeblocks.schedules import KSchedule as KSchedule
from moeblocks.schedules import StepK as StepK
from moeblocks.schedules import step_schedules as step_schedules
from moeblocks.shared import SharedExperts as SharedExperts

__all__ = [
    "GLU",
    "AuxLoss",
    "AuxLosses",
    "BandpassLoss",
    "BiasBalancer",
    "CVSquaredLoss",
    "Capacity",
    "ClampedGLU",
    "ClampedSwiGLU",
    "ConstantK",
    "CosineScorer",
    "Dispatcher",
    "DispersionLoss",
    "DynamicSelection",
    "ExpertBank",
    "ExpertChoice",
    "ExpertInit",
    "GELUExperts",
    "GatedActivation",
    "GroupLimitedTopK",
    "InspectableRouter",
    "KSchedule",
    "Layout",
    "LinearScorer",
    "LoadBalanceLoss",
    "MLPExperts",
    "MoELayer",
    "MoEOutput",
    "NormedExperts",
    "RMSNorm",
    "Router",
    "RouterProtocol",
    "Routing",
    "ScaledExperts",
    "Scorer",
    "Selection",
    "SequenceBalanceLoss",
    "SharedExperts",
    "StepK",
    "SwiGLUExperts",
    "TensorMoE",
    "TokenStatLoss",
    "TokenStats",
    "TopK",
    "TopP",
    "TorchDispatcher",
    "WeightPolicy",
    "ZLoss",
    "__version__",
    "build_layout",
    "collect_aux_losses",
    "grouped_mm",
    "init_weights",
    "make_dispatcher",
    "materialize",
    "step_balancers",
    "step_schedules",
]
