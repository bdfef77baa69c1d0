"""Hugging Face bridge: convert sparse-MoE blocks, swap them into models, capture routing.

Needs the ``hf`` extra only where a function touches transformers itself; conversion
reads the blocks' weights by attribute and imports nothing.
"""

from moeblocks.hf.convert import SUPPORTED as SUPPORTED
from moeblocks.hf.convert import Family as Family
from moeblocks.hf.convert import family_of as family_of
from moeblocks.hf.convert import from_hf as from_hf
from moeblocks.hf.convert import is_moe_block as is_moe_block
from moeblocks.hf.convert import to_hf as to_hf

__all__ = ["SUPPORTED", "Family", "family_of", "from_hf", "is_moe_block", "to_hf"]
