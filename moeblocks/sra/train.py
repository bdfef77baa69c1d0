"""Training loop of the SRA transformer: AdamW, warmup + cosine decay, k curriculum.

Legend: B batch, S sequence length, V vocabulary, L MoE layers, E experts.

``train`` is what ``moeblocks train`` and ``moeblocks demo`` call. The batch of every
step is a function of ``(seed, step)`` and the optimizer, schedules and RNG are saved
with each checkpoint, so ``--resume`` continues bit for bit where a run stopped.

Nothing a run has saved is lost to a fault (see :mod:`moeblocks.sra.checkpoint` and the
"What survives what" table of the docs): checkpoints are verified before older ones are
deleted, and a resume takes the newest one that verifies. Ctrl-C, SIGTERM and SIGUSR1
finish the current step, save a checkpoint and raise
:class:`~moeblocks.sra.guards.Interrupted` (a ``KeyboardInterrupt``); a second signal
stops at once without saving. A step with a non-finite loss or gradient norm is skipped
(:class:`~moeblocks.sra.guards.NonFiniteGuard`); too many in a row raise
:class:`~moeblocks.sra.guards.DivergedError`.

Several processes: under ``torchrun --nproc-per-node W`` the model goes through
:func:`~moeblocks.distributed.parallelize`: with ``expert_parallel=P`` the experts of every
MoE layer are spread over groups of P ranks, then FSDP2 (``parallel="fsdp"``, the
default) shards the rest, or DDP (``parallel="ddp"``) replicates it. Each of the W ranks
trains on a disjoint slice of the same ``(seed, step)`` batch, so W ranks with B / W
sequences each see exactly the batch one process sees. Rank ``r`` takes rows
``[r·B/W, (r+1)·B/W)``. Each rank's cross-entropy is a mean over its B/W·S tokens and the
engine averages the W ranks' gradients, which is the gradient of the mean over all B·S
tokens; the aux losses are computed on global token statistics. So a W-rank run follows
the 1-rank run up to float rounding. Rank 0 logs; checkpoints are written with
``torch.distributed.checkpoint``, every rank its shards, and resume on any world size.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moeblocks.distributed import (
    ParallelConfig,
    ParallelModel,
    load_full_optimizer_state,
    load_sharded,
    local_shard,
    parallelize,
    save_sharded,
)
from moeblocks.progress import Progress, start_progress
from moeblocks.routers import CosineScorer
from moeblocks.sra.checkpoint import (
    SHARDS,
    Checkpoint,
    check_corpus,
    checkpoint_dirs,
    describe_differences,
    find_checkpoint,
    is_sharded,
    load_state,
    load_weights,
    note_skipped,
    save_checkpoint,
    shard_folder,
    with_data,
)
from moeblocks.sra.config import SRAConfig, UsageError
from moeblocks.sra.data import Corpus, batch_at, check_length, data_spec, load_corpus
from moeblocks.sra.durable import atomic_write_text
from moeblocks.sra.evaluate import evaluate
from moeblocks.sra.guards import DivergedError, Interrupted, NonFiniteGuard, StopSignals
from moeblocks.sra.model import SRATransformer
from moeblocks.sra.rundir import check_out, claim_run
from moeblocks.threads import ThreadTuner

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
    """Linear warmup over ``warmup · steps`` steps, then cosine decay to ``lr · min_lr_ratio``.

    The official recipe decays to 0 (``min_lr_ratio=0``).
    """
    warmup = config.warmup_steps
    if step < warmup:
        return config.lr * (step + 1) / warmup
    span = max(1, config.steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: SRATransformer, config: SRAConfig) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) with weight decay on weight matrices only.

    No decay on norms, biases, the cosine router's anchors and τ (the cosine score
    ignores the anchors' norm, so decaying it would only raise their effective learning
    rate), nor on the tied embedding unless ``config.decay_embedding`` (the official
    recipe decays it). A linear router's weight matrix decays, as in the official code.
    """
    cosine = {id(p) for m in model.modules() if isinstance(m, CosineScorer)
              for p in m.parameters()}  # fmt: skip
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        bias = leaf.startswith(("b_", "bias"))  # stacked expert biases are [E, F] and [E, D]
        embedding = "embed" in name and not config.decay_embedding
        skip = p.ndim < 2 or bias or embedding or id(p) in cosine
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


@dataclass(frozen=True)
class _Parallel:
    """This process's place in a distributed run (W ranks, expert groups of P)."""

    rank: int
    world: int
    ep_size: int
    local_rank: int
    engine: str = "fsdp"  # "fsdp" or "ddp" (moeblocks.distributed.ParallelConfig.engine)

    @property
    def main(self) -> bool:
        """Rank 0 logs, shows progress and writes files."""
        return self.rank == 0


def _plan_parallel(
    expert_parallel: int | None, config: SRAConfig, engine: str = "fsdp"
) -> _Parallel | None:
    """Read the ``torchrun`` environment and check it against the config (no communication).

    Returns:
        None for a single-process run, else the rank's plan.

    Raises:
        UsageError: For ``expert_parallel`` > 1 outside ``torchrun``, a world size it does
            not divide, or a config that cannot be split over the ranks.
    """
    env_world = os.environ.get("WORLD_SIZE")
    world = int(env_world) if env_world else 1
    P = world if expert_parallel is None else expert_parallel
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise UsageError(f"--expert-parallel must be an int >= 1, got {expert_parallel!r}")
    if engine not in ("fsdp", "ddp"):
        raise UsageError(f"--parallel must be fsdp or ddp, got {engine!r}")
    if P > 1 and (env_world is None or "RANK" not in os.environ):
        raise UsageError(
            f"--expert-parallel {P} needs one process per rank: launch with "
            f"torchrun --nproc-per-node {P} (WORLD_SIZE/RANK are not set)"
        )
    if world % P:
        raise UsageError(f"--expert-parallel {P} must divide the torchrun world size {world}")
    if world == 1:
        return None
    if config.ffn == "dense":
        raise UsageError("--expert-parallel needs an MoE model, got --ffn dense")
    if config.num_experts % P:
        raise UsageError(
            f"--expert-parallel {P} must divide the number of experts {config.num_experts}"
        )
    if config.batch_size % world:
        raise UsageError(
            f"the batch size {config.batch_size} must be divisible by the world size {world} "
            "(each rank trains on an equal slice of the batch)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return _Parallel(int(os.environ["RANK"]), world, P, local_rank, engine)


def _autocast(config: SRAConfig, dev: torch.device) -> torch.autocast:
    """The forward's autocast: bf16 with ``precision="bf16"``, else a no-op.

    As in the official runs, weights, optimizer state and the loss stay float32.
    """
    return torch.autocast(dev.type, torch.bfloat16, enabled=config.precision == "bf16")


@torch.no_grad()
def _seed_anchors(
    model: SRATransformer, train_tokens: torch.Tensor, config: SRAConfig, dev: torch.device
) -> None:
    """Seed batch-initialised anchors (``anchor_init="batch"``) before the first step.

    Every rank runs the whole batch of step 0 (not its slice) in training mode from the
    same random state, so all ranks seed the same anchors, as one process would; the
    random state of training is restored afterwards.
    """
    if not any(getattr(m, "needs_seed", False) for m in model.modules()):
        return
    x_BS, _ = batch_at(train_tokens, 0, config.batch_size, config.seq_len, config.seed)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(config.seed)
        model.train()
        with _autocast(config, dev):
            model(x_BS.to(dev))


def _rank_seed(seed: int, rank: int, step: int) -> int:
    # Every rank draws its own router noise; a fixed function of (seed, rank, step).
    return (seed * 1_000_003 + rank * 10_007 + step) % 2**63


# Config fields a resume may change: they do not alter what the run has trained.
_RESUME_MAY_CHANGE = frozenset({"steps", "keep_checkpoints", "max_skipped_steps"})


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
    expert_parallel: int | None = None,
    encoding: str | None = None,
    tune_threads: bool = False,
    parallel: str = "fsdp",
) -> TrainResult:
    """Train an SRA model and keep checkpoints in ``out``.

    Args:
        config: The run's config. With ``resume`` it may be None (take the saved one);
            otherwise it must match the saved config except for ``steps``,
            ``keep_checkpoints`` and ``max_skipped_steps``.
        data: Corpus spec (``pydoc``, ``synthetic`` or a path, recorded absolute). With
            ``resume``, None takes the saved spec, which is followed only when it is
            built in or lies inside ``out``; a given spec must hold the very text the
            run trained on (same SHA-256), wherever it lies.
        out: Run folder: new, empty, or a run folder (with its marker file).
        resume: Continue from the newest checkpoint in ``out`` that verifies.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        stop_at: Stop (with a checkpoint) after this many completed steps, leaving the
            LR and k schedules laid out for ``config.steps``.
        progress: Show a tqdm progress bar.
        overwrite: Delete an earlier run's files in ``out`` instead of refusing.
        expert_parallel: P, ranks sharing one copy of the experts, for a run launched by
            ``torchrun`` (which sets ``WORLD_SIZE`` and ``RANK``). P must divide the world
            size W and the experts, and W the batch size (see the module docstring).
            None: P = W under ``torchrun``, else a single process. The process group
            (gloo on CPU, NCCL on CUDA) is created here unless it already exists, and
            destroyed at the end.
        encoding: Text encoding of data files (default UTF-8; with ``resume``, the
            saved one).
        parallel: The engine of a ``torchrun`` run: ``fsdp`` (FSDP2, parameters,
            gradients and optimizer state sharded) or ``ddp`` (replicated); see
            :func:`moeblocks.distributed.parallelize`. Ignored in a single process.
        tune_threads: Re-check the CPU thread count every few seconds as other
            processes come and go (:class:`moeblocks.threads.ThreadTuner`); for counts
            picked from the load, not for ones the user fixed.

    Returns:
        The :class:`TrainResult`.

    Raises:
        UsageError: A path ``out`` cannot be (a file, not writable, a folder of other
            files), bad data, a config or data that does not match the checkpoint, an
            existing run without ``resume``, no checkpoint that verifies with
            ``resume``, or an expert-parallel setup that does not fit (see
            ``expert_parallel``). Nothing is written to ``out`` before these checks pass.
        Interrupted: After SIGINT, SIGTERM or SIGUSR1, once the checkpoint is saved.
        DivergedError: After ``config.max_skipped_steps`` non-finite steps in a row; the
            checkpoints saved before stay.
    """
    out = Path(out)
    check_out(out, resume=resume)
    ckpt: Checkpoint | None = None
    if resume:
        ckpt = find_checkpoint(out) if out.is_dir() else None
        if ckpt is None:
            raise UsageError(f"--resume: {out} holds no checkpoint")
        if config is None:
            config = ckpt.config
        diff = describe_differences(ckpt.config, config, ignore=_RESUME_MAY_CHANGE)
        if diff:
            raise UsageError(f"checkpoint in {out} is from a different config: {diff}")
        if config.steps < ckpt.step:
            raise UsageError(f"--steps {config.steps} is below the checkpoint's step {ckpt.step}")
        ckpt = with_data(ckpt, out, data, encoding)
        spec, encoding = ckpt.data, ckpt.encoding
    else:
        if config is None:
            raise UsageError("a config (preset) is needed to start a new run")
        if checkpoint_dirs(out) and not overwrite:
            raise UsageError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        spec, encoding = data_spec("pydoc" if data is None else data), encoding or "utf-8"
    dev = resolve_device(device)
    par = _plan_parallel(expert_parallel, config, parallel)

    # Everything that can fail on bad input happens before the first write.
    corpus = load_corpus(spec, encoding)
    if ckpt is not None:
        check_corpus(corpus, ckpt)
        if par is None or par.main:
            note_skipped(ckpt)
    run = (config, out, ckpt, corpus, dev)
    if par is None:
        return _train(*run, None, stop_at=stop_at, progress=progress, tune_threads=tune_threads)
    if dev.type == "cuda":
        dev = torch.device("cuda", par.local_rank)
        torch.cuda.set_device(dev)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        if dist.get_world_size() != par.world or dist.get_rank() != par.rank:
            raise UsageError("the process group does not match WORLD_SIZE / RANK")
        return _train(*run, par, stop_at=stop_at, progress=progress, tune_threads=tune_threads)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(
    config: SRAConfig,
    out: Path,
    ckpt: Checkpoint | None,
    corpus: Corpus,
    dev: torch.device,
    par: _Parallel | None,
    *,
    stop_at: int | None,
    progress: bool,
    tune_threads: bool = False,
) -> TrainResult:
    """Tokenise (checking the split lengths), then claim the run folder and fit."""
    from moeblocks.sra.tokencache import encode_split
    from moeblocks.sra.tokenizer import load_tokenizer, train_tokenizer

    main = par is None or par.main
    if ckpt is not None:
        tok = load_tokenizer(
            ckpt.path / "tokenizer.json",
            sha256=ckpt.tokenizer_sha256,
            vocab_size=config.vocab_size,
        )
    elif par is None:
        tok = train_tokenizer(corpus.train, config.vocab_size)
    else:  # trained once, on rank 0, so every rank surely has the same one
        from tokenizers import Tokenizer

        box = [train_tokenizer(corpus.train, config.vocab_size).to_str() if main else None]
        dist.broadcast_object_list(box, src=0)
        tok = Tokenizer.from_str(box[0])
    # Cached per corpus and tokeniser (for corpora read from a path): a resumed run and
    # eval/inspect read the same ids without tokenising again.
    train_np, valid_np = (encode_split(tok, corpus, split) for split in ("train", "valid"))
    check_length(train_np, config.seq_len, "training")
    check_length(valid_np, config.seq_len, "validation")
    tokens = (torch.from_numpy(train_np), torch.from_numpy(valid_np))
    if not main:  # rank 0 alone writes into the run folder
        return _fit(config, out, ckpt, corpus, dev, par, tok.to_str(), *tokens,
                    stop_at=stop_at, progress=progress, tune_threads=tune_threads)  # fmt: skip
    with claim_run(out, resume_step=None if ckpt is None else ckpt.step):
        return _fit(config, out, ckpt, corpus, dev, par, tok.to_str(), *tokens,
                    stop_at=stop_at, progress=progress, tune_threads=tune_threads)  # fmt: skip


def _fit(
    config: SRAConfig,
    out: Path,
    ckpt: Checkpoint | None,
    corpus: Corpus,
    dev: torch.device,
    par: _Parallel | None,
    tok_json: str,
    train_tokens: torch.Tensor,
    valid_tokens: torch.Tensor,
    *,
    stop_at: int | None,
    progress: bool,
    tune_threads: bool = False,
) -> TrainResult:
    """Build (or restore) the model and optimizer and run the training loop."""
    main = par is None or par.main
    torch.manual_seed(config.seed)
    model = SRATransformer(config).to(dev)
    sharded = ckpt is not None and is_sharded(ckpt)
    if ckpt is not None and not sharded:
        load_weights(model, ckpt, config)  # the full weights, before any sharding
    if ckpt is None:
        # Before sharding, on the whole step-0 batch: every rank seeds what one process
        # seeds (and FSDP2 would drop writes into gathered parameters).
        _seed_anchors(model, train_tokens, config, dev)
    pm: ParallelModel | None = None
    if par is not None:
        pm = parallelize(model, ParallelConfig(engine=par.engine, ep_size=par.ep_size))
    run = model if pm is None else pm.module  # DDP's wrapper; under FSDP2 the model
    mesh = None if pm is None else pm.expert_mesh
    optimizer = build_optimizer(model, config)  # after sharding: the parameters are new
    step = 0
    if ckpt is not None:
        state = load_state(ckpt)
        step = int(state["step"])
        if sharded:  # weights and optimizer state, each rank its pieces (any world size)
            load_sharded(ckpt.path / SHARDS, model, optimizer, expert_mesh=mesh)
        elif par is None:
            optimizer.load_state_dict(state["optimizer"])
        else:
            load_full_optimizer_state(model, optimizer, state["optimizer"], expert_mesh=mesh)
        rngs = state.get("rng_per_rank")
        if par is not None and rngs is not None and len(rngs) == par.world:
            torch.set_rng_state(rngs[par.rank])
        elif par is not None:  # saved on another world size: a fresh stream per rank
            torch.manual_seed(_rank_seed(config.seed, par.rank, step))
        else:
            torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and dev.type == "cuda" and par is None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    elif par is not None:
        torch.manual_seed(_rank_seed(config.seed, par.rank, 0))
    if main:
        atomic_write_text(out / "tokenizer.json", tok_json)
    last_saved = None if ckpt is None else ckpt.step

    def save(at: int) -> None:
        nonlocal last_saved
        if par is None:
            _check_finite(model.state_dict(), at)
            save_checkpoint(out, at, model, optimizer, config, corpus, tok_json,
                            keep=config.keep_checkpoints)  # fmt: skip
            last_saved = at
            return
        _check_finite(model.state_dict(), at, collective=True)
        rngs: list[Any] = [None] * par.world
        dist.all_gather_object(rngs, torch.get_rng_state())
        folder = [str(shard_folder(out, at)) if main else None]
        dist.broadcast_object_list(folder, src=0)
        save_sharded(folder[0], model, optimizer, expert_mesh=mesh)  # every rank its shards
        if main:
            save_checkpoint(
                out, at, model, optimizer, config, corpus, tok_json,
                keep=config.keep_checkpoints, sharded=Path(folder[0]),
                extra_state={"rng_per_rank": rngs, "world_size": par.world},
            )  # fmt: skip
        dist.barrier()  # no rank goes on (or exits) before the checkpoint is in place
        last_saved = at

    world, rank = (1, 0) if par is None else (par.world, par.rank)
    rows = slice(rank * config.batch_size // world, (rank + 1) * config.batch_size // world)
    last_stop = config.steps if stop_at is None else min(stop_at, config.steps)
    val = float("nan")
    t0, start = time.perf_counter(), step
    bar = _progress(config.steps, step, progress and main)
    L, E = len(model.moe_layers), config.num_experts
    counts_LE = torch.zeros(L, E, dtype=torch.long, device=dev)
    # Since the last log record: routed slots per expert and summed router entropy.
    log_counts_LE = torch.zeros(L, E, dtype=torch.long, device=dev)
    log_entropy_L = torch.zeros(L, dtype=torch.float64, device=dev)
    log_steps = 0
    dead = "-"
    guard = NonFiniteGuard(config.max_skipped_steps)
    tuner = ThreadTuner() if tune_threads and dev.type == "cpu" else None
    save_due = False  # a periodic checkpoint waits for the end of a skipped streak
    log = (out / "log.jsonl").open("a", encoding="utf-8") if main else None
    try:
        with StopSignals() as signals:
            while step < last_stop:
                model.train()
                model.set_step(step)
                lr = lr_at(step, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x_BS, y_BS = (
                    t[rows].to(dev)  # this rank's slice of the global batch
                    for t in batch_at(
                        train_tokens, step, config.batch_size, config.seq_len, config.seed
                    )
                )
                with _autocast(config, dev):
                    res = run(x_BS)
                ce = F.cross_entropy(res.logits.flatten(0, 1).float(), y_BS.flatten())
                aux = res.total_aux_loss()
                (ce + aux).backward()
                stop_signum = signals.signum
                max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
                if par is None:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                else:
                    assert pm is not None  # made with par
                    pm.sync_gradients()  # what the engine leaves (see its docstring)
                    norm = pm.clip_grad_norm_(max_norm)
                    # One all-reduce: the global mean loss (equal token counts per rank)
                    # and whether any rank got a stop signal, so all stop at the same step.
                    shared = torch.stack(
                        [ce.detach().float(), torch.tensor(float(stop_signum or 0), device=dev)]
                    )
                    dist.all_reduce(shared)
                    ce = shared[0] / world
                    if shared[1] > 0 and stop_signum is None:  # another rank was signalled
                        stop_signum = signal.SIGTERM
                # One host sync for the three numbers; the same on every rank.
                ce_value, aux_value, norm_value = torch.stack(
                    [ce.detach().float(), aux.detach().float(), norm.detach().float()]
                ).tolist()
                try:
                    skipped = guard.check(step + 1, ce_value, aux_value, norm_value)
                except DivergedError as err:
                    _write(log, {"step": step + 1, "skipped": str(err), "lr": lr})
                    where = (
                        f"the newest checkpoint, step {last_saved}, is kept in {out}"
                        if last_saved is not None
                        else "no checkpoint had been saved"
                    )
                    raise DivergedError(
                        f"{err}; stopped without saving, {where} (resume with a lower lr, "
                        "or a higher max_skipped_steps)"
                    ) from None
                if skipped is None:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if tuner is not None:
                    tuner.step()
                with torch.no_grad():  # accumulated on the device: no host sync per step
                    for layer, routing in enumerate(res.routings):
                        slots_E = torch.bincount(routing.experts.flatten(), minlength=E)
                        counts_LE[layer] += slots_E
                        log_counts_LE[layer] += slots_E
                        if skipped is None:  # a skipped step's probabilities may be NaN
                            p_TE = routing.probs.float()
                            h_T = -(p_TE * p_TE.clamp(min=1e-30).log()).sum(-1)
                            log_entropy_L[layer] += h_T.mean()
                log_steps += int(skipped is None)
                step += 1

                if L and step % DEAD_WINDOW == 0:
                    if par is not None:
                        dist.all_reduce(counts_LE)
                    dead = f"{int((counts_LE == 0).sum())}/{L * E}"
                    counts_LE.zero_()
                record: dict[str, Any] = {
                    "step": step,
                    "loss": ce_value,
                    "aux": aux_value,  # global statistics: the same on every rank
                    "lr": lr,
                    "k": model.k,
                }
                if skipped is not None:  # not applied; JSON has no NaN
                    record.update(loss=None, aux=None, skipped=skipped)
                    if main:
                        bar.write(f"step {step}: skipped, {skipped}")
                if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                    # Every rank evaluates the whole split (its MoE layers exchange rows).
                    ev = evaluate(
                        model, valid_tokens, config.batch_size, max_tokens=config.eval_tokens
                    )
                    val = ev.loss
                    record.update(val_loss=ev.loss, val_ppl=ev.ppl, dead=ev.dead_per_layer)
                if (
                    step % LOG_EVERY == 0
                    or "val_loss" in record
                    or "skipped" in record
                    or (step == last_stop)
                ):
                    record["tok_per_s"] = round(
                        (step - start)
                        * config.batch_size
                        * config.seq_len
                        / (time.perf_counter() - t0)
                    )
                    if L:
                        if par is not None:  # every rank logs at the same steps
                            dist.all_reduce(log_counts_LE)
                            dist.all_reduce(log_entropy_L)
                            log_entropy_L /= world
                        # Per layer, per expert: slots routed since the previous record;
                        # per layer: mean per-token router entropy (nats) over those steps.
                        record["expert_counts"] = log_counts_LE.tolist()
                        record["router_entropy"] = (
                            (log_entropy_L / log_steps).tolist() if log_steps else None
                        )
                        log_counts_LE.zero_()
                        log_entropy_L.zero_()
                        log_steps = 0
                    _write(log, record)
                ppl = math.exp(min(ce_value, 50.0))  # capped: exp overflows past ~709
                bar.set_postfix_str(
                    f"loss {ce_value:.3f} ppl {ppl:.1f} k {model.k} dead {dead}", refresh=False
                )
                bar.update(1)  # after the postfix: a plain progress line shows this step's
                save_due = save_due or bool(config.ckpt_every and step % config.ckpt_every == 0)
                if step == last_stop or (save_due and guard.streak == 0):
                    save(step)
                    save_due = False
                if stop_signum is not None and step != last_stop:
                    if last_saved != step:
                        save(step)  # the weights are those of the last applied step
                    raise Interrupted(stop_signum)
    finally:
        bar.close()
        if log is not None:
            log.close()
    if math.isnan(val):  # stopped early (stop_at): measure where we are
        val = evaluate(model, valid_tokens, config.batch_size, max_tokens=config.eval_tokens).loss
    return TrainResult(out, step, val, math.exp(val), time.perf_counter() - t0)


def _write(log: Any, record: dict[str, Any]) -> None:
    if log is not None:
        log.write(json.dumps(record) + "\n")
        log.flush()


def _check_finite(weights: dict[str, torch.Tensor], step: int, *, collective: bool = False) -> None:
    """Raise :class:`DivergedError` rather than checkpoint weights that are NaN or infinite.

    With ``collective``, ``weights`` is a sharded model's state dict: each rank checks
    its own pieces (a DTensor's local shard) and one all-reduce gives every rank the
    same verdict, so all of them stop or save together.
    """
    local = {n: local_shard(t) for n, t in weights.items()}
    floats = {n: t for n, t in local.items() if t.is_floating_point()}
    finite = [torch.isfinite(t).all() for t in floats.values()]
    ok = torch.stack(finite).tolist() if finite else []  # one sync for all tensors
    bad = [n for n, good in zip(floats, ok, strict=True) if not good]
    diverged = bool(bad)
    if collective:
        device = next(iter(floats.values())).device if floats else torch.device("cpu")
        flag = torch.tensor([float(diverged)], device=device)  # NCCL needs the GPU's
        dist.all_reduce(flag)
        diverged = bool(flag.item())
    if diverged:
        where = ", ".join(bad[:3]) + "..." if bad else "on another rank"
        raise DivergedError(
            f"the weights after step {step} are not finite ({where}); "
            "not saved, the checkpoints saved before are kept"
        )


def _progress(total: int, initial: int, enabled: bool) -> Progress:
    return start_progress(total, "train", enabled, unit="step", initial=initial)


def run_summary(out: Path) -> dict[str, Any]:
    """The log records of a run, for reports.

    Returns:
        ``{"train": [...], "eval": [...], "skipped": [...]}``: the records of applied
        steps, those with a validation pass, and those of skipped (non-finite) steps.
    """
    path = out / "log.jsonl"
    records = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:  # a line torn by a crash
            continue
    applied = [r for r in records if "skipped" not in r]
    return {
        "train": applied,
        "eval": [r for r in applied if "val_loss" in r],
        "skipped": [r for r in records if "skipped" in r],
    }
