"""Triton kernels for moving routed tokens, registered as PyTorch ops.

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows (N plus
padding), D model dim.

Importable as ``moeblocks.kernels``; importing it imports Triton and registers
``torch.ops.moeblocks.{build_index, permute, unpermute, unpermute_backward, slot_dot}``.
Tensors in, tensors out: nothing here imports the rest of moeblocks. The kernels run on
CUDA tensors, or on CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1``
is set before this package is first imported. :mod:`.reference` holds the plain-PyTorch equivalents.
"""

from . import autograd as _autograd  # noqa: F401  (registers the backward passes)
from . import reference as reference
from .index import SlotIndex as SlotIndex
from .index import build_index as build_index
from .index import num_rows_bound as num_rows_bound
from .permute import permute as permute
from .slot_dot import slot_dot as slot_dot
from .unpermute import unpermute as unpermute
from .unpermute_backward import unpermute_backward as unpermute_backward

__all__ = [
    "SlotIndex",
    "build_index",
    "num_rows_bound",
    "permute",
    "reference",
    "slot_dot",
    "unpermute",
    "unpermute_backward",
]
