"""The reference Semantic Resonance Architecture (SRA) transformer, built from moeblocks.

``model`` holds the network, ``routing_presets`` the FFN choices (SRA's routers, the
dense baseline, the routing of published MoE families at equal active size), ``data``
the offline corpora, ``train`` the training loop,
``evaluate`` perplexity / dead experts / k-sweep, ``report`` the demo's markdown report.
Heavy optional dependencies (tokenizers, safetensors, tqdm, matplotlib) are imported
inside the functions that need them; install them with ``pip install 'moeblocks[sra,plots]'``.
"""

from moeblocks.sra.config import PRESETS as PRESETS
from moeblocks.sra.config import SRAConfig as SRAConfig
from moeblocks.sra.config import UsageError as UsageError
from moeblocks.sra.config import preset as preset
from moeblocks.sra.model import SRAOutput as SRAOutput
from moeblocks.sra.model import SRATransformer as SRATransformer

__all__ = ["PRESETS", "SRAConfig", "SRAOutput", "SRATransformer", "UsageError", "preset"]
