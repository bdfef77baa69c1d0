"""Hugging Face bridge: convert sparse-MoE blocks, swap them into models, capture routing.

Needs the ``hf`` extra only where a function touches transformers itself; conversion,
swapping and capture read the blocks by attribute and class name and import nothing.
"""

from moeblocks.hf.capture import RoutingRecorder as RoutingRecorder
from moeblocks.hf.capture import capture_routing as capture_routing
from moeblocks.hf.capture import hf_load_balance_loss as hf_load_balance_loss
from moeblocks.hf.convert import SUPPORTED as SUPPORTED
from moeblocks.hf.convert import Family as Family
from moeblocks.hf.convert import family_of as family_of
from moeblocks.hf.convert import from_hf as from_hf
from moeblocks.hf.convert import is_moe_block as is_moe_block
from moeblocks.hf.convert import to_hf as to_hf
from moeblocks.hf.families import FAMILIES as FAMILIES
from moeblocks.hf.families import REFUSED as REFUSED
from moeblocks.hf.families import Refusal as Refusal
from moeblocks.hf.swap import HFInlineMoE as HFInlineMoE
from moeblocks.hf.swap import HFMoEBlock as HFMoEBlock
from moeblocks.hf.swap import swap_moe_blocks as swap_moe_blocks
from moeblocks.hf.swap import unswap_moe_blocks as unswap_moe_blocks

__all__ = [
    "FAMILIES",
    "REFUSED",
    "SUPPORTED",
    "Family",
    "HFInlineMoE",
    "HFMoEBlock",
    "Refusal",
    "RoutingRecorder",
    "capture_routing",
    "family_of",
    "from_hf",
    "hf_load_balance_loss",
    "is_moe_block",
    "swap_moe_blocks",
    "to_hf",
    "unswap_moe_blocks",
]
