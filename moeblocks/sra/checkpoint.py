"""Verified, atomic checkpoints of an SRA run.

A run folder looks like this::

    runs/NAME/
      moeblocks-run.json       marker: this folder is a moeblocks run (see rundir)
      tokenizer.json           the tokeniser, trained once on the training split
      log.jsonl                one JSON record per logged step / evaluation
      checkpoint.json          names the newest verified checkpoint (for people and tools)
      checkpoints/step-0000600/
        model.safetensors      weights (tied embeddings stored once)
        config.json            config, data spec and its SHA-256, tokeniser SHA-256, step
        tokenizer.json         the same tokeniser, so a checkpoint stands alone
        state.pt               optimizer state, step, RNG state
        manifest.json          size and SHA-256 of each file above

A distributed run (``torchrun``) writes its weights and optimizer state with
``torch.distributed.checkpoint`` (DCP) instead of ``model.safetensors``: every rank writes
its own shards into ``dcp/`` (:func:`moeblocks.distributed.save_sharded`), rank 0 the
other files, and ``state.pt`` holds no optimizer state but each rank's RNG state. DCP
reads the shards back at any world size, one process included (``eval``, ``inspect`` and
a resume on one process use :func:`load_weights`, which reads both forms)::

      checkpoints/step-0000600/
        dcp/.metadata, dcp/__0_0.distcp, ...   weights and optimizer state, sharded
        config.json, tokenizer.json, state.pt, manifest.json (every file, dcp/ included)

How a save survives a crash at any moment:

1. every file is written into ``checkpoints/.tmp-step-N-*`` (DCP shards first into a
   ``.tmp-`` folder of their own, moved in whole), ``fsync``-ed and hashed;
   ``manifest.json`` records the hashes; the folder itself is ``fsync``-ed;
2. the folder is renamed whole to ``step-N`` (atomic) and its parent ``fsync``-ed;
3. the new checkpoint is read back and verified against its manifest;
4. only then does ``checkpoint.json`` name it, and are older checkpoints beyond the
   newest ``keep`` verified ones deleted (renamed to ``.del-*`` first, so a half-deleted
   folder never looks like a checkpoint).

A killed save leaves a ``.tmp-*`` or ``.del-*`` folder, removed when the next run starts
(:func:`moeblocks.sra.rundir.remove_stale`). Loading verifies every file against the
manifest; :func:`find_checkpoint` takes the newest checkpoint that verifies and records
which newer ones it skipped and why.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moeblocks._version import __version__
from moeblocks.distributed.checkpoint import fault_point
from moeblocks.runtime.durable import atomic_write_text, fsync_dir, fsync_file, sha256_file
from moeblocks.runtime.errors import CheckpointError, UsageError
from moeblocks.sra.config import SRAConfig, fields_where
from moeblocks.sra.data import BUILTIN_DATA, Corpus, data_spec

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "atomic_write_text",
    "check_corpus",
    "checkpoint_dirs",
    "find_checkpoint",
    "load_state",
    "load_weights",
    "note_skipped",
    "save_checkpoint",
    "shard_folder",
    "verify_checkpoint",
    "with_data",
]

POINTER = "checkpoint.json"
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "config.json", "tokenizer.json", "state.pt")
SHARDS = "dcp"  # the DCP folder of a distributed run's checkpoint, in place of FILES[0]
MANIFEST_FORMAT = 1
_PREFIX = "step-"


@dataclass(frozen=True)
class Checkpoint:
    """Where a verified checkpoint lives and what it was trained with.

    Attributes:
        path: The checkpoint folder.
        step: Completed optimizer steps.
        config: The run's config.
        data: The data spec the run trained on (``pydoc``, ``synthetic`` or an absolute
            path).
        encoding: The text encoding of the data files.
        data_sha256: SHA-256 of the corpus text (``Corpus.fingerprint``), None for
            checkpoints that predate it.
        tokenizer_sha256: SHA-256 of ``tokenizer.json``.
        skipped: Newer checkpoints passed over because they did not verify, each as
            ``"step-N: reason"``.
    """

    path: Path
    step: int
    config: SRAConfig
    data: str
    encoding: str = "utf-8"
    data_sha256: str | None = None
    tokenizer_sha256: str | None = None
    skipped: tuple[str, ...] = ()


# --- saving -------------------------------------------------------------------------


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: SRAConfig,
    corpus: Corpus,
    tokenizer_json: str,
    *,
    keep: int = 2,
    weights: Mapping[str, Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    extra_state: Mapping[str, Any] | None = None,
    sharded: Path | None = None,
) -> Path:
    """Write, verify and publish the checkpoint of ``step``; then prune old ones.

    Args:
        run_dir: The run folder.
        step: Completed optimizer steps.
        model: The model (its weights are saved unless ``weights`` is given).
        optimizer: Its optimizer (state saved unless ``optimizer_state`` is given).
        config: The run's config.
        corpus: The corpus trained on (its spec, encoding and fingerprint are recorded).
        tokenizer_json: The tokeniser, serialised.
        keep: Verified checkpoints to keep, this one included (>= 1).
        weights: The state dict to save instead of ``model``'s (an expert-parallel
            model's full state dict); tensors that share storage are stored once.
        optimizer_state: Saved instead of ``optimizer.state_dict()``.
        extra_state: More entries for ``state.pt`` (e.g. every rank's RNG state).
        sharded: A folder from :func:`shard_folder` into which every rank has written
            the weights and optimizer state with DCP; moved into the checkpoint as
            ``dcp/`` (``model``, ``weights``, ``optimizer`` and ``optimizer_state`` are
            then not read).

    Returns:
        The new checkpoint folder.

    Raises:
        CheckpointError: When the checkpoint cannot be written or does not verify once
            written. The checkpoints saved before are left as they were.
    """
    if keep < 1:
        raise UsageError(f"keep must be >= 1, got {keep}")
    from moeblocks._optional import require

    require("safetensors", "sra", "SRA checkpoints")
    meta = {
        "config": config.to_dict(),
        "data": corpus.name,
        "encoding": corpus.encoding,
        "data_sha256": corpus.fingerprint,
        "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest(),
        "step": step,
        "moeblocks": __version__,
    }
    payload = _Payload(step, meta, tokenizer_json, model, optimizer, weights,
                       optimizer_state, extra_state, sharded)  # fmt: skip
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"{_PREFIX}{step:07d}"
    # Written unless a verified step-N holds it already (saved again right after a resume).
    if _problem(final) is not None:
        try:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            _write_folder(final, step, payload.fill)
        except OSError as err:
            raise CheckpointError(f"could not write checkpoint {final}: {err}") from err
    verify_checkpoint(final)
    atomic_write_text(run_dir / POINTER, json.dumps({"step": step, "path": _rel(final)}))
    _prune(ckpt_root, step, keep)
    return final


@dataclass(frozen=True)
class _Payload:
    """What one checkpoint folder holds (see :func:`save_checkpoint` for each part)."""

    step: int
    meta: dict[str, Any]
    tokenizer_json: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    weights: Mapping[str, Tensor] | None
    optimizer_state: dict[str, Any] | None
    extra_state: Mapping[str, Any] | None
    sharded: Path | None

    def fill(self, folder: Path) -> None:
        """Write every file of the checkpoint into ``folder`` (not yet durable)."""
        from safetensors.torch import save_model

        step = self.step
        if self.sharded is not None:
            fsync_dir(self.sharded)  # each rank fsync-ed its own files (DCP sync_files)
            os.replace(self.sharded, folder / SHARDS)
        elif self.weights is None:
            save_model(self.model, str(folder / "model.safetensors"), metadata={"step": str(step)})
        else:
            _save_weights(self.weights, folder / "model.safetensors", {"step": str(step)})
        (folder / "config.json").write_text(json.dumps(self.meta, indent=2), encoding="utf-8")
        (folder / "tokenizer.json").write_text(self.tokenizer_json, encoding="utf-8")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()  # type: ignore[assignment]
        state: dict[str, Any] = {"step": step, "rng": rng, **(self.extra_state or {})}
        if self.sharded is None:
            state["optimizer"] = (
                self.optimizer.state_dict() if self.optimizer_state is None
                else self.optimizer_state
            )  # fmt: skip
        torch.save(state, folder / "state.pt")


def _write_folder(final: Path, step: int, fill: Callable[[Path], None]) -> None:
    """Fill a temporary folder, make it durable with its manifest, rename it to ``final``."""
    ckpt_root = final.parent
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".tmp-{final.name}-"))
    try:
        tmp.chmod(0o755)
        fill(tmp)
        files = {}
        for name in _files_of(tmp):
            fsync_file(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
        manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files,
                    "sha256": _digest(files)}  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        fsync_file(tmp / MANIFEST)
        fsync_dir(tmp)
        if final.exists():  # a damaged checkpoint of the same step: replace it
            _discard(final)
        fault_point("publish")  # fault tests kill here: all written, nothing published
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _files_of(folder: Path) -> list[str]:
    """The files a checkpoint folder holds, relative (``dcp/...`` for DCP shards)."""
    shards = folder / SHARDS
    names = [n for n in FILES if not (n == FILES[0] and shards.is_dir())]
    if shards.is_dir():
        names += sorted(f"{SHARDS}/{p.name}" for p in shards.iterdir() if p.is_file())
    return names


def shard_folder(run_dir: Path, step: int) -> Path:
    """A new empty folder for the DCP shards of ``step``'s checkpoint (on rank 0).

    It lies in ``checkpoints/`` as a ``.tmp-`` folder, so a save cut short leaves
    nothing that looks like a checkpoint and the next run removes it; every rank writes
    into it (on a file system they share), then :func:`save_checkpoint` moves it in.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{_PREFIX}{step:07d}-{SHARDS}-"))
    folder.chmod(0o755)
    return folder


def _save_weights(weights: Mapping[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_model`` for a state dict: tied tensors stored once.

    Of the names that share one tensor (the tied embedding) the first is kept and the
    others are recorded in the metadata, as ``save_model`` does; ``load_model`` (see
    :func:`load_weights`) restores the ties from the model.
    """
    from safetensors.torch import save_file

    kept: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    tensors: dict[str, Tensor] = {}
    for name, t in weights.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key in kept:  # empty tensors may all report data_ptr 0
            metadata[name] = kept[key]
        else:
            kept[key] = name
            tensors[name] = t.detach().contiguous()
    save_file(tensors, str(path), metadata=metadata)


def _prune(ckpt_root: Path, newest: int, keep: int) -> None:
    """Keep the newest ``keep`` verified checkpoints up to step ``newest``; delete older.

    Checkpoints newer than ``newest`` (damaged ones a resume skipped) are left alone:
    the run replaces each when it reaches its step.
    """
    kept = 0
    for step, path in checkpoint_dirs(ckpt_root.parent):
        if step > newest:
            continue
        if step == newest or (kept < keep and _problem(path) is None):  # newest: just verified
            kept += 1
        else:
            _discard(path)


def _discard(path: Path) -> None:
    # Renamed first (atomic), so a deletion cut short leaves no half checkpoint behind.
    aside = path.with_name(f".del-{path.name}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _rel(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


# --- verifying ----------------------------------------------------------------------


def _digest(files: Any) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode("utf-8")).hexdigest()


def _problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` does not verify, naming the file; None if it does."""
    manifest = path / MANIFEST
    if not path.is_dir():
        return f"{path} is missing"
    try:
        raw = manifest.read_bytes()
    except FileNotFoundError:
        return f"{manifest} is missing (the folder is not a complete checkpoint)"
    except OSError as err:
        return f"{manifest} is unreadable: {err.strerror}"
    try:
        m = json.loads(raw.decode("utf-8"))
        files = m["files"]
        intact = (
            m["sha256"] == _digest(files)
            and _known_layout(list(files))
            and all(
                isinstance(f["bytes"], int) and isinstance(f["sha256"], str) for f in files.values()
            )
        )
    except (ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        return f"{manifest} is damaged"
    for name in sorted(files):
        file, want = path / name, files[name]
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            return f"{file} is missing"
        if size != want["bytes"]:
            what = "truncated" if size < want["bytes"] else "too long"
            return f"{file} is {what}: {size} bytes, {MANIFEST} says {want['bytes']}"
        try:
            got = sha256_file(file)
        except OSError as err:
            return f"{file} is unreadable: {err.strerror}"
        if got != want["sha256"]:
            return f"{file} is damaged: its SHA-256 {got[:16]}... differs from {MANIFEST}'s"
    return None


def _known_layout(names: list[str]) -> bool:
    """FILES, or FILES with DCP shards (``dcp/.metadata`` and files) for the weights."""
    if sorted(names) == sorted(FILES):
        return True
    shards = [n for n in names if n.startswith(f"{SHARDS}/")]
    rest = sorted(n for n in names if n not in shards)
    plain = all("/" not in n[len(SHARDS) + 1 :] and n[len(SHARDS) + 1 :] not in ("", ".", "..")
                for n in shards)  # fmt: skip
    return rest == sorted(FILES[1:]) and f"{SHARDS}/.metadata" in shards and plain


def verify_checkpoint(path: Path) -> None:
    """Check every file of a checkpoint folder against its manifest (size and SHA-256).

    Raises:
        CheckpointError: Naming the first file that is missing, truncated or damaged.
    """
    problem = _problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} does not verify: {problem}")


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoints/step-N`` folder, newest first (unverified)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        digits = p.name.removeprefix(_PREFIX)
        if p.name.startswith(_PREFIX) and digits.isdigit() and p.is_dir():
            found.append((int(digits), p))
    return sorted(found, reverse=True)


def _read(path: Path, skipped: tuple[str, ...] = ()) -> Checkpoint:
    verify_checkpoint(path)
    config_file = path / "config.json"
    try:
        meta: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
        return Checkpoint(
            path=path,
            step=int(meta["step"]),
            config=SRAConfig.from_dict(meta["config"]),
            data=str(meta["data"]),
            encoding=str(meta.get("encoding", "utf-8")),
            data_sha256=meta.get("data_sha256"),
            tokenizer_sha256=meta.get("tokenizer_sha256"),
            skipped=skipped,
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{config_file} is unreadable: {err}") from err


def find_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint of a run that verifies, or None when the run has none.

    Accepts a run folder or a checkpoint folder itself (which must verify). Newer
    checkpoints that do not verify are listed in the result's ``skipped``.

    Raises:
        CheckpointError: When checkpoints exist but none verifies (each reason named),
            or a checkpoint folder given directly does not verify.
    """
    if (run_dir / MANIFEST).is_file() or (run_dir / FILES[0]).is_file():
        return _read(run_dir)
    skipped: list[str] = []
    for _, path in checkpoint_dirs(run_dir):
        try:
            return _read(path, tuple(skipped))
        except CheckpointError as err:
            skipped.append(f"{path.name}: {err}")
    if skipped:
        raise CheckpointError(
            f"no checkpoint in {run_dir} verifies; " + "; ".join(reversed(skipped))
        )
    return None


def note_skipped(ckpt: Checkpoint) -> None:
    """Tell the user (stderr) which newer checkpoints were skipped, and why."""
    for line in ckpt.skipped:
        print(f"moeblocks: skipped checkpoint {line}", file=sys.stderr)
    if ckpt.skipped:
        print(f"moeblocks: using checkpoint {ckpt.path} (step {ckpt.step})", file=sys.stderr)


# --- loading ------------------------------------------------------------------------


def load_weights(model: nn.Module, ckpt: Checkpoint, config: SRAConfig) -> None:
    """Load a checkpoint's weights into ``model``, built from ``config``.

    Raises:
        UsageError: When the checkpoint was trained with a different model config.
        CheckpointError: When a loaded tensor holds NaN or inf (named): a run never
            saves such weights, so the file was written by something else.
    """
    from moeblocks._optional import require

    require("safetensors", "sra", "SRA checkpoints")
    diffs = [d for d in ckpt.config.differences(config) if d not in fields_where("training_only")]
    if diffs:
        what = _describe(ckpt.config, config, diffs)
        raise UsageError(f"checkpoint {ckpt.path} is from a different config: {what}")
    if is_sharded(ckpt):
        _load_sharded_weights(model, ckpt)
    else:
        _load_safetensors(model, ckpt)
    _refuse_non_finite(model, ckpt)


def _load_safetensors(model: nn.Module, ckpt: Checkpoint) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(
            model,
            str(ckpt.path / "model.safetensors"),
            strict=True,
            device=str(next(model.parameters()).device),
        )
    except (RuntimeError, OSError, SafetensorError) as err:
        raise UsageError(
            f"checkpoint {ckpt.path} does not fit this model: {str(err).splitlines()[0]}"
        ) from err


def _refuse_non_finite(model: nn.Module, ckpt: Checkpoint) -> None:
    """Raise :class:`CheckpointError` naming the loaded tensors that hold NaN or inf."""
    floats = {n: t for n, t in model.state_dict().items() if t.is_floating_point()}
    ok = torch.stack([torch.isfinite(t).all() for t in floats.values()]).tolist() if floats else []
    bad = [n for n, good in zip(floats, ok, strict=True) if not good]
    if bad:
        raise CheckpointError(
            f"checkpoint {ckpt.path} holds NaN or inf weights ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); a run never saves those, refusing to load"
        )


def is_sharded(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint holds DCP shards (a distributed run's) instead of safetensors."""
    return (ckpt.path / SHARDS / ".metadata").is_file()


def _load_sharded_weights(model: nn.Module, ckpt: Checkpoint) -> None:
    """Read every shard of a DCP checkpoint into a plain (unsharded) model."""
    from torch.distributed.checkpoint.api import CheckpointException

    from moeblocks.distributed.checkpoint import load_sharded

    try:
        load_sharded(ckpt.path / SHARDS, model)
    except (RuntimeError, OSError, ValueError, CheckpointException) as err:
        raise UsageError(
            f"checkpoint {ckpt.path} does not fit this model: {str(err).splitlines()[0]}"
        ) from err


def load_state(ckpt: Checkpoint) -> dict[str, Any]:
    """The checkpoint's ``state.pt``: optimizer state, step and RNG state.

    Raises:
        CheckpointError: When the file does not load or holds a different step.
    """
    path = ckpt.path / "state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds on bad bytes
        raise CheckpointError(f"{path} does not load: {str(err).splitlines()[0]}") from err
    if not isinstance(state, dict) or state.get("step") != ckpt.step:
        raise CheckpointError(f"{path} is not the state of step {ckpt.step}")
    return state


def with_data(
    ckpt: Checkpoint, root: Path, data: str | None = None, encoding: str | None = None
) -> Checkpoint:
    """The checkpoint with the data source to read: ``data`` when given, else its own.

    A data path read from a checkpoint is used only when it lies inside ``root`` (the
    run or checkpoint folder the user named): anyone can write a ``config.json`` that
    names a file elsewhere. Outside paths must come from the command line (``--data``),
    and the text is then checked against the saved fingerprint (:func:`check_corpus`).

    Raises:
        UsageError: For a saved data path outside ``root`` and no ``data``.
    """
    encoding = encoding or ckpt.encoding
    if data is not None:
        return dataclasses.replace(ckpt, data=data_spec(data), encoding=encoding)
    if ckpt.data not in BUILTIN_DATA:
        saved = Path(ckpt.data)
        inside = saved.is_absolute() and Path(os.path.realpath(saved)).is_relative_to(
            os.path.realpath(root)
        )
        if not inside:
            raise UsageError(
                f"checkpoint {ckpt.path} was trained on --data {ckpt.data}, outside {root}; "
                f"a path read from a checkpoint is only followed inside its run folder, "
                f"so pass --data {ckpt.data} to read it"
            )
    return dataclasses.replace(ckpt, encoding=encoding)


def check_corpus(corpus: Corpus, ckpt: Checkpoint) -> None:
    """Raise :class:`UsageError` when ``corpus`` is not the text ``ckpt`` was trained on."""
    if ckpt.data_sha256 is None or corpus.fingerprint == ckpt.data_sha256:
        return
    raise UsageError(
        f"--data {corpus.name} ({corpus.encoding}) is not the text checkpoint {ckpt.path} "
        f"was trained on: SHA-256 {corpus.fingerprint[:16]}... != {ckpt.data_sha256[:16]}... "
        "saved in its config.json"
    )


def _describe(saved: SRAConfig, wanted: SRAConfig, fields: list[str]) -> str:
    return ", ".join(f"{f} {getattr(saved, f)!r} (saved) != {getattr(wanted, f)!r}" for f in fields)


def describe_differences(
    saved: SRAConfig, wanted: SRAConfig, ignore: frozenset[str] = frozenset()
) -> str:
    """``""`` when the configs agree outside ``ignore``, else a one-line description."""
    return _describe(saved, wanted, [d for d in saved.differences(wanted) if d not in ignore])
