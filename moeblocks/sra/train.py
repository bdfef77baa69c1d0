"""Training loop of the SRA transformer: AdamW, warmup + cosine decay, k curriculum.

Legend: B batch, S sequence length, V vocabulary, L MoE layers, E experts.

``train`` is what ``moeblocks train`` and ``moeblocks demo`` call. The batch of every
step is a function of ``(seed, step)`` and the optimizer, schedules and RNG are saved
with each checkpoint, so ``--resume`` continues bit for bit where a run stopped. Ctrl-C
finishes the current step, saves a checkpoint and then raises ``KeyboardInterrupt``; a
second Ctrl-C stops at once without saving.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F

from moeblocks.sra.checkpoint import (
    POINTER,
    atomic_write_text,
    describe_differences,
    find_checkpoint,
    load_weights,
    remove_run_files,
    save_checkpoint,
)
from moeblocks.sra.config import SRAConfig, UsageError
from moeblocks.sra.data import batch_at, check_length, load_corpus
from moeblocks.sra.evaluate import evaluate
from moeblocks.sra.model import SRATransformer

__all__ = ["TrainResult", "build_optimizer", "lr_at", "resolve_device", "train"]

LOG_EVERY = 10  # steps between log.jsonl records
DEAD_WINDOW = 50  # steps over which the progress bar counts experts that got no token


@dataclass(frozen=True)
class TrainResult:
    """Summary of a finished (or stopped) training call.

    Attributes:
        run_dir: The run folder.
        step: Completed optimizer steps.
        val_loss: Last validation cross-entropy, nats per token.
        val_ppl: ``exp(val_loss)``.
        seconds: Wall time of this call's training loop.
    """

    run_dir: Path
    step: int
    val_loss: float
    val_ppl: float
    seconds: float


def lr_at(step: int, config: SRAConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine decay to ``lr·min_lr_ratio``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: SRATransformer, config: SRAConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only.

    No decay on norms, the (tied) embedding, the cosine router's anchors and τ: the
    cosine score ignores the anchors' norm, so decaying it would only raise their
    effective learning rate.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or "embed" in name or "scorer" in name
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device.

    Raises:
        UsageError: For CUDA on a machine without it, or an unknown device string.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise UsageError(
            f"--device {device!r} is not a torch device (try cpu, cuda, auto)"
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    return dev


class _DeferredInterrupt:
    """Turns the first SIGINT into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _truncate_log(path: Path, step: int) -> None:
    # Records past the checkpoint would be written again by the resumed run.
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def train(
    config: SRAConfig | None,
    data: str | None,
    out: Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    stop_at: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> TrainResult:
    """Train an SRA model and keep checkpoints in ``out``.

    Args:
        config: The run's config. With ``resume`` it may be None (take the saved one);
            otherwise it must match the saved config except for ``steps``.
        data: Corpus spec (``pydoc``, ``synthetic`` or a path). With ``resume`` None
            takes the saved spec.
        out: Run folder.
        resume: Continue from the newest checkpoint in ``out``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        stop_at: Stop (with a checkpoint) after this many completed steps, leaving the
            LR and k schedules laid out for ``config.steps``.
        progress: Show a tqdm progress bar.
        overwrite: Delete an earlier run's files in ``out`` instead of refusing.

    Returns:
        The :class:`TrainResult`.

    Raises:
        UsageError: Bad data, a config that does not match the checkpoint, an existing
            run without ``resume``, or no checkpoint with ``resume``. Nothing is written
            to ``out`` before these checks pass.
        KeyboardInterrupt: After Ctrl-C, once the checkpoint is saved.
    """
    out = Path(out)
    ckpt = find_checkpoint(out) if out.is_dir() else None
    if resume:
        if ckpt is None:
            raise UsageError(f"--resume: {out} holds no checkpoint ({POINTER} missing)")
        if config is None:
            config = ckpt.config
        diff = describe_differences(ckpt.config, config, ignore=frozenset({"steps"}))
        if diff:
            raise UsageError(f"checkpoint in {out} is from a different config: {diff}")
        if data is not None and data != ckpt.data:
            raise UsageError(
                f"checkpoint in {out} was trained on --data {ckpt.data!r}, not {data!r}"
            )
        data = ckpt.data
        if config.steps < ckpt.step:
            raise UsageError(f"--steps {config.steps} is below the checkpoint's step {ckpt.step}")
    else:
        if config is None:
            raise UsageError("a config (preset) is needed to start a new run")
        if ckpt is not None and not overwrite:
            raise UsageError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        data = "pydoc" if data is None else data
    dev = resolve_device(device)

    # Everything that can fail on bad input happens before the first write.
    from moeblocks.sra.tokenizer import encode, load_tokenizer, train_tokenizer

    corpus = load_corpus(data)
    tok = (
        load_tokenizer(ckpt.path / "tokenizer.json")
        if resume and ckpt
        else train_tokenizer(corpus.train, config.vocab_size)
    )
    train_np, valid_np = encode(tok, corpus.train), encode(tok, corpus.valid)
    check_length(train_np, config.seq_len, "training")
    check_length(valid_np, config.seq_len, "validation")
    train_tokens, valid_tokens = torch.from_numpy(train_np), torch.from_numpy(valid_np)

    torch.manual_seed(config.seed)
    model = SRATransformer(config).to(dev)
    optimizer = build_optimizer(model, config)
    step = 0
    if resume and ckpt is not None:
        load_weights(model, ckpt, config)
        state = torch.load(ckpt.path / "state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and dev.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        step = int(state["step"])
        _truncate_log(out / "log.jsonl", step)
    else:
        if overwrite:
            remove_run_files(out)
        out.mkdir(parents=True, exist_ok=True)
    tok_json = tok.to_str()
    atomic_write_text(out / "tokenizer.json", tok_json)

    def save(at: int) -> None:
        save_checkpoint(out, at, model, optimizer, config, data, tok_json)

    last_stop = config.steps if stop_at is None else min(stop_at, config.steps)
    val = float("nan")
    t0, start = time.perf_counter(), step
    bar = _progress(config.steps, step, progress)
    L, E = len(model.moe_layers), config.num_experts
    counts_LE = torch.zeros(L, E, dtype=torch.long, device=dev)
    dead = "-"
    log = (out / "log.jsonl").open("a", encoding="utf-8")
    try:
        with _DeferredInterrupt() as interrupt:
            while step < last_stop:
                model.train()
                model.set_step(step)
                lr = lr_at(step, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x_BS, y_BS = (
                    t.to(dev)
                    for t in batch_at(
                        train_tokens, step, config.batch_size, config.seq_len, config.seed
                    )
                )
                res = model(x_BS)
                ce = F.cross_entropy(res.logits.flatten(0, 1).float(), y_BS.flatten())
                aux = res.total_aux_loss()
                (ce + aux).backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for layer, routing in enumerate(res.routings):
                    counts_LE[layer] += torch.bincount(routing.experts.flatten(), minlength=E)
                step += 1

                ce_value = ce.item()
                if L and step % DEAD_WINDOW == 0:
                    dead = f"{int((counts_LE == 0).sum())}/{L * E}"
                    counts_LE.zero_()
                record: dict[str, Any] = {
                    "step": step,
                    "loss": ce_value,
                    "aux": aux.item(),
                    "lr": lr,
                    "k": model.k,
                }
                if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                    ev = evaluate(
                        model, valid_tokens, config.batch_size, max_tokens=config.eval_tokens
                    )
                    val = ev.loss
                    record.update(val_loss=ev.loss, val_ppl=ev.ppl, dead=ev.dead_per_layer)
                if step % LOG_EVERY == 0 or "val_loss" in record or step == last_stop:
                    record["tok_per_s"] = round(
                        (step - start)
                        * config.batch_size
                        * config.seq_len
                        / (time.perf_counter() - t0)
                    )
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.update(1)
                ppl = math.exp(min(ce_value, 50.0))  # capped: exp overflows past ~709
                bar.set_postfix_str(
                    f"loss {ce_value:.3f} ppl {ppl:.1f} k {model.k} dead {dead}", refresh=False
                )
                if (config.ckpt_every and step % config.ckpt_every == 0) or step == last_stop:
                    save(step)
                if interrupt.requested and step != last_stop:
                    save(step)
                    raise KeyboardInterrupt
    finally:
        bar.close()
        log.close()
    if math.isnan(val):  # stopped early (stop_at): measure where we are
        val = evaluate(model, valid_tokens, config.batch_size, max_tokens=config.eval_tokens).loss
    return TrainResult(out, step, val, math.exp(val), time.perf_counter() - t0)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from moeblocks._optional import require

    require("tqdm", "sra", "the training progress bar")
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, unit="step")


def run_summary(out: Path) -> dict[str, Any]:
    """The log records of a run, for reports: ``{"train": [...], "eval": [...]}``."""
    path = out / "log.jsonl"
    records = (
        [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.is_file()
        else []
    )
    return {"train": records, "eval": [r for r in records if "val_loss" in r]}
