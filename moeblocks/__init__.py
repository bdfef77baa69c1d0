"""moeblocks: composable, typed Mixture-of-Experts building blocks for PyTorch."""

from moeblocks._version import __version__ as __version__
from moeblocks.dispatch import Dispatcher as Dispatcher
from moeblocks.dispatch import TorchDispatcher as TorchDispatcher
from moeblocks.dispatch import build_layout as build_layout
from moeblocks.dispatch import make_dispatcher as make_dispatcher
from moeblocks.experts import ExpertBank as ExpertBank
from moeblocks.experts import GELUExperts as GELUExperts
from moeblocks.experts import SwiGLUExperts as SwiGLUExperts
from moeblocks.grouped import grouped_mm as grouped_mm
from moeblocks.layer import MoELayer as MoELayer
from moeblocks.losses import AuxLoss as AuxLoss
from moeblocks.losses import BandpassLoss as BandpassLoss
from moeblocks.losses import CVSquaredLoss as CVSquaredLoss
from moeblocks.losses import DispersionLoss as DispersionLoss
from moeblocks.losses import LoadBalanceLoss as LoadBalanceLoss
from moeblocks.losses import TokenStatLoss as TokenStatLoss
from moeblocks.losses import TokenStats as TokenStats
from moeblocks.losses import ZLoss as ZLoss
from moeblocks.routers import CosineScorer as CosineScorer
from moeblocks.routers import LinearScorer as LinearScorer
from moeblocks.routers import Router as Router
from moeblocks.routers import Scorer as Scorer
from moeblocks.routing import Layout as Layout
from moeblocks.routing import MoEOutput as MoEOutput
from moeblocks.routing import Routing as Routing
from moeblocks.schedules import ConstantK as ConstantK
from moeblocks.schedules import KSchedule as KSchedule
from moeblocks.schedules import StepK as StepK

__all__ = [
    "AuxLoss",
    "BandpassLoss",
    "CVSquaredLoss",
    "ConstantK",
    "CosineScorer",
    "Dispatcher",
    "DispersionLoss",
    "ExpertBank",
    "GELUExperts",
    "KSchedule",
    "Layout",
    "LinearScorer",
    "LoadBalanceLoss",
    "MoELayer",
    "MoEOutput",
    "Router",
    "Routing",
    "Scorer",
    "StepK",
    "SwiGLUExperts",
    "TokenStatLoss",
    "TokenStats",
    "TorchDispatcher",
    "ZLoss",
    "__version__",
    "build_layout",
    "grouped_mm",
    "make_dispatcher",
]
