"""Token cache: each split of a corpus is tokenised once per tokeniser, then memory-mapped.

Legend: N tokens in a split.

Tokenising WikiText-103 (~540 MB of text) takes minutes; training, resuming, ``eval``
and ``inspect`` all need the same token ids. :func:`encode_split` keys a cached array on
what decides its content: the corpus text (:attr:`Corpus.fingerprint`, a SHA-256 of all
splits), the split's name and the tokeniser (SHA-256 of its JSON). A cache hit is a
read-only ``numpy`` memory map, so a run never holds a second copy of the corpus in RAM.

The cache lives in ``$MOEBLOCKS_CACHE`` (default ``~/.cache/moeblocks``) under
``tokens/``; files are written atomically, so a killed process leaves no half file. The
built-in corpora are small and tokenised on the fly (no cache file): a cache is worth its
disk only for real corpora read from a path. Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from moeblocks.runtime.durable import atomic_write
from moeblocks.sra.data import BUILTIN_DATA, Corpus

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["cache_dir", "cache_path", "encode_split"]

Split = Literal["train", "valid", "test"]


def cache_dir() -> Path:
    """The token-cache folder: ``$MOEBLOCKS_CACHE/tokens`` or ``~/.cache/moeblocks/tokens``."""
    root = os.environ.get("MOEBLOCKS_CACHE") or Path.home() / ".cache" / "moeblocks"
    return Path(root) / "tokens"


def cache_path(corpus: Corpus, split: Split, tok: Tokenizer) -> Path:
    """Where the tokens of ``corpus``'s ``split`` under ``tok`` are (or will be) cached."""
    tok_sha = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()
    key = hashlib.sha256(f"{corpus.fingerprint}:{split}:{tok_sha}".encode()).hexdigest()
    return cache_dir() / f"{key[:32]}-{split}.npy"


def encode_split(
    tok: Tokenizer, corpus: Corpus, split: Split, *, cache: bool | None = None
) -> np.ndarray:
    """The token ids of one split (int32, ``[N]``), from the cache when it has them.

    Args:
        tok: The run's tokeniser.
        corpus: The corpus; its fingerprint keys the cache.
        split: ``"train"``, ``"valid"`` or ``"test"``.
        cache: Use the cache (None: for corpora read from a path, not built-in ones).

    Returns:
        A copy-on-write memory map of the cache file, or an in-memory array when
        uncached.

    Raises:
        ValueError: For an unknown ``split``.
    """
    from moeblocks.sra.tokenizer import encode

    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
    if cache is None:
        cache = corpus.name not in BUILTIN_DATA
    if not cache:
        return encode(tok, getattr(corpus, split))
    path = cache_path(corpus, split, tok)
    if not path.exists():
        ids = encode(tok, getattr(corpus, split))
        atomic_write(path, lambda f: np.save(f, ids, allow_pickle=False))
    # Copy-on-write: torch.from_numpy needs a writable array; the file is never changed.
    return np.load(path, mmap_mode="c", allow_pickle=False)
