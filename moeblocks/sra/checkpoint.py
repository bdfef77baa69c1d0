"""Atomic checkpoints of an SRA run.

A run folder looks like this::

    runs/NAME/
      tokenizer.json           the tokeniser, trained once on the training split
      log.jsonl                one JSON record per logged step / evaluation
      checkpoint.json          pointer to the newest complete checkpoint
      checkpoints/step-0000600/
        model.safetensors      weights (tied embeddings stored once)
        config.json            config, data spec, step, moeblocks version
        tokenizer.json         the same tokeniser, so a checkpoint stands alone
        state.pt               optimizer state, step, RNG state

An expert-parallel run (``torchrun`` with ``--expert-parallel``) writes the same files
from rank 0: the weights and the optimizer state are gathered into the form one process
holding every expert would have (:func:`moeblocks.distributed.full_state_dict`), so its
checkpoints resume on any world size; ``state.pt`` adds each rank's RNG state.

Every file is written to a temporary name and moved into place with ``os.replace``; a
checkpoint folder is filled under a temporary name and renamed whole, and only then does
``checkpoint.json`` point at it. A crash at any moment leaves the previous checkpoint
intact and no half-written one that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moeblocks._version import __version__
from moeblocks.sra.config import SRAConfig, UsageError

__all__ = [
    "Checkpoint",
    "atomic_write_text",
    "find_checkpoint",
    "load_weights",
    "remove_run_files",
    "save_checkpoint",
]

POINTER = "checkpoint.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; a run folder is shareable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Checkpoint:
    """Where a saved checkpoint lives and what it was trained with.

    Attributes:
        path: The checkpoint folder.
        step: Completed optimizer steps.
        config: The run's config.
        data: The data spec the run trained on.
    """

    path: Path
    step: int
    config: SRAConfig
    data: str


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: SRAConfig,
    data: str,
    tokenizer_json: str,
    *,
    weights: Mapping[str, Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    extra_state: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint for ``step`` and point ``checkpoint.json`` at it.

    Older checkpoint folders are removed once the pointer has moved on.

    Args:
        run_dir: The run folder.
        step: Completed optimizer steps.
        model: The model (its weights are saved unless ``weights`` is given).
        optimizer: Its optimizer (state saved unless ``optimizer_state`` is given).
        config: The run's config.
        data: The data spec.
        tokenizer_json: The tokeniser, serialised.
        weights: The state dict to save instead of ``model``'s (an expert-parallel
            model's full state dict); tensors that share storage are stored once.
        optimizer_state: Saved instead of ``optimizer.state_dict()``.
        extra_state: More entries for ``state.pt`` (e.g. every rank's RNG state).

    Returns:
        The new checkpoint folder.
    """
    from moeblocks._optional import require

    require("safetensors", "sra", "SRA checkpoints")
    from safetensors.torch import save_model

    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".tmp-step-{step:07d}-"))
    try:
        tmp.chmod(0o755)
        if weights is None:
            save_model(model, str(tmp / "model.safetensors"), metadata={"step": str(step)})
        else:
            _save_weights(weights, tmp / "model.safetensors", {"step": str(step)})
        meta = {"config": config.to_dict(), "data": data, "step": step, "moeblocks": __version__}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()  # type: ignore[assignment]
        opt = optimizer.state_dict() if optimizer_state is None else optimizer_state
        torch.save(
            {"step": step, "optimizer": opt, "rng": rng, **(extra_state or {})}, tmp / "state.pt"
        )
        if final.exists():
            # Same step saved again (e.g. interrupted right after a resume): move the old
            # one aside first; its content is the state of the same step.
            aside = ckpt_root / f".old-{final.name}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(
        run_dir / POINTER, json.dumps({"step": step, "path": f"checkpoints/{final.name}"})
    )
    for old in ckpt_root.iterdir():
        if old.is_dir() and old != final and not old.name.startswith(".tmp-"):
            shutil.rmtree(old, ignore_errors=True)
    return final


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


def find_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint of a run, or None when the run has none.

    Accepts a run folder or a checkpoint folder itself.

    Raises:
        UsageError: When the pointer or the checkpoint's config is unreadable.
    """
    if (run_dir / "config.json").is_file() and (run_dir / "model.safetensors").is_file():
        path = run_dir
    else:
        pointer = run_dir / POINTER
        if not pointer.is_file():
            return None
        try:
            path = run_dir / json.loads(pointer.read_text(encoding="utf-8"))["path"]
        except (ValueError, KeyError) as err:
            raise UsageError(f"{pointer} is not a checkpoint pointer: {err}") from err
    try:
        meta: dict[str, Any] = json.loads((path / "config.json").read_text(encoding="utf-8"))
        return Checkpoint(
            path, int(meta["step"]), SRAConfig.from_dict(meta["config"]), meta["data"]
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"checkpoint {path} is unreadable: {err}") from err


def load_weights(model: nn.Module, ckpt: Checkpoint, config: SRAConfig) -> None:
    """Load a checkpoint's weights into ``model``, built from ``config``.

    Raises:
        UsageError: When the checkpoint was trained with a different model config.
    """
    from moeblocks._optional import require

    require("safetensors", "sra", "SRA checkpoints")
    from safetensors.torch import load_model

    diffs = [d for d in ckpt.config.differences(config) if d not in _TRAINING_ONLY]
    if diffs:
        what = _describe(ckpt.config, config, diffs)
        raise UsageError(f"checkpoint {ckpt.path} is from a different config: {what}")
    try:
        load_model(
            model,
            str(ckpt.path / "model.safetensors"),
            strict=True,
            device=str(next(model.parameters()).device),
        )
    except (RuntimeError, OSError) as err:
        raise UsageError(
            f"checkpoint {ckpt.path} does not fit this model: {str(err).splitlines()[0]}"
        ) from err


# Fields that do not change the shape or meaning of the weights.
_TRAINING_ONLY = frozenset(
    {
        "steps",
        "batch_size",
        "lr",
        "min_lr_ratio",
        "warmup",
        "weight_decay",
        "grad_clip",
        "eval_every",
        "eval_tokens",
        "ckpt_every",
        "seed",
        "balance",
        "balance_weight",
        "band_floor",
        "band_ceiling",
        "z_loss_weight",
        "dispersion_weight",
        "router_noise",
        "dispatcher",
        "k_switch",
    }
)


def _describe(saved: SRAConfig, wanted: SRAConfig, fields: list[str]) -> str:
    return ", ".join(f"{f} {getattr(saved, f)!r} (saved) != {getattr(wanted, f)!r}" for f in fields)


def describe_differences(
    saved: SRAConfig, wanted: SRAConfig, ignore: frozenset[str] = frozenset()
) -> str:
    """``""`` when the configs agree outside ``ignore``, else a one-line description."""
    return _describe(saved, wanted, [d for d in saved.differences(wanted) if d not in ignore])


# Everything a run writes into its folder; removed by `remove_run_files` (demo reruns).
RUN_FILES = (
    "checkpoint.json",
    "tokenizer.json",
    "log.jsonl",
    "report.md",
    "loss.png",
    "experts.png",
)


def remove_run_files(run_dir: Path) -> None:
    """Delete what an earlier run wrote into ``run_dir`` (and nothing else)."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
