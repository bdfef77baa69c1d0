"""Routing inspection for any moeblocks model: metrics, probes, traces, interventions.

Collect the routing records of a model over an evaluation set with
:func:`collect_routing`, then compute metrics per layer from ``RoutingSet.layers``.
Plots and the model-agnostic report writer live in :mod:`moeblocks.inspect.plots` and
:mod:`moeblocks.inspect.report` (they need the ``plots`` extra and are not imported here).
Nothing here imports a model: an SRA run's inspection is :mod:`moeblocks.sra.inspection`,
a Hugging Face checkpoint's :mod:`moeblocks.hf.report`.
"""

from moeblocks.inspect.anchors import AnchorTrace as AnchorTrace
from moeblocks.inspect.anchors import anchor_similarity as anchor_similarity
from moeblocks.inspect.anchors import anchor_traces as anchor_traces
from moeblocks.inspect.anchors import format_trace as format_trace
from moeblocks.inspect.anchors import layer_temperatures as layer_temperatures
from moeblocks.inspect.collect import RoutingSet as RoutingSet
from moeblocks.inspect.collect import capture_routings as capture_routings
from moeblocks.inspect.collect import collect_routing as collect_routing
from moeblocks.inspect.collect import concat_routings as concat_routings
from moeblocks.inspect.collect import sra_forward as sra_forward
from moeblocks.inspect.interventions import EditedRouter as EditedRouter
from moeblocks.inspect.interventions import ScaledExperts as ScaledExperts
from moeblocks.inspect.interventions import intervene as intervene
from moeblocks.inspect.interventions import knockout as knockout
from moeblocks.inspect.interventions import token_mask as token_mask
from moeblocks.inspect.metrics import Coherence as Coherence
from moeblocks.inspect.metrics import LayerSummary as LayerSummary
from moeblocks.inspect.metrics import class_counts as class_counts
from moeblocks.inspect.metrics import dead_experts as dead_experts
from moeblocks.inspect.metrics import expert_counts as expert_counts
from moeblocks.inspect.metrics import expert_token_counts as expert_token_counts
from moeblocks.inspect.metrics import mean_k as mean_k
from moeblocks.inspect.metrics import npmi as npmi
from moeblocks.inspect.metrics import purity as purity
from moeblocks.inspect.metrics import router_saturation as router_saturation
from moeblocks.inspect.metrics import routing_entropy as routing_entropy
from moeblocks.inspect.metrics import subtoken_coherence as subtoken_coherence
from moeblocks.inspect.metrics import summarise_layer as summarise_layer
from moeblocks.inspect.metrics import top_tokens as top_tokens
from moeblocks.inspect.metrics import topk_jaccard as topk_jaccard
from moeblocks.inspect.metrics import usage_entropy as usage_entropy
from moeblocks.inspect.metrics import utilisation as utilisation
from moeblocks.inspect.metrics import vocabulary_entropy as vocabulary_entropy
from moeblocks.inspect.probe import BUILTIN_PROBES as BUILTIN_PROBES
from moeblocks.inspect.probe import ConditionTest as ConditionTest
from moeblocks.inspect.probe import OverlapTest as OverlapTest
from moeblocks.inspect.probe import ProbeItem as ProbeItem
from moeblocks.inspect.probe import condition_permutation_test as condition_permutation_test
from moeblocks.inspect.probe import load_probes as load_probes
from moeblocks.inspect.probe import locate_word as locate_word
from moeblocks.inspect.probe import overlap_permutation_test as overlap_permutation_test
from moeblocks.inspect.probe import run_condition_probe as run_condition_probe
from moeblocks.inspect.probe import run_overlap_probe as run_overlap_probe

__all__ = [
    "BUILTIN_PROBES",
    "AnchorTrace",
    "Coherence",
    "ConditionTest",
    "EditedRouter",
    "LayerSummary",
    "OverlapTest",
    "ProbeItem",
    "RoutingSet",
    "ScaledExperts",
    "anchor_similarity",
    "anchor_traces",
    "capture_routings",
    "class_counts",
    "collect_routing",
    "concat_routings",
    "condition_permutation_test",
    "dead_experts",
    "expert_counts",
    "expert_token_counts",
    "format_trace",
    "intervene",
    "knockout",
    "layer_temperatures",
    "load_probes",
    "locate_word",
    "mean_k",
    "npmi",
    "overlap_permutation_test",
    "purity",
    "router_saturation",
    "routing_entropy",
    "run_condition_probe",
    "run_overlap_probe",
    "sra_forward",
    "subtoken_coherence",
    "summarise_layer",
    "token_mask",
    "top_tokens",
    "topk_jaccard",
    "usage_entropy",
    "utilisation",
    "vocabulary_entropy",
]
