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

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moeblocks._checks import warn_non_finite
from moeblocks.balancing import balancers, step_balancers
from moeblocks.distributed import (
    ParallelConfig,
    ParallelModel,
    load_full_optimizer_state,
    load_sharded,
    local_shard,
    parallelize,
    save_sharded,
)
from moeblocks.distributed.comm import collective_timeout, mark, timeout_error
from moeblocks.routers import CosineScorer
from moeblocks.runtime.device import resolve_device
from moeblocks.runtime.durable import atomic_write_text
from moeblocks.runtime.errors import UsageError
from moeblocks.runtime.progress import Progress, start_progress
from moeblocks.runtime.threads import ThreadTuner
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
from moeblocks.sra.config import SRAConfig, fields_where
from moeblocks.sra.data import Corpus, batch_at, check_length, data_spec, load_corpus
from moeblocks.sra.evaluate import evaluate
from moeblocks.sra.guards import DivergedError, Interrupted, NonFiniteGuard, StopSignals
from moeblocks.sra.model import SRATransformer
from moeblocks.sra.routing_presets import check_ffn
from moeblocks.sra.rundir import check_out, claim_run

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
    if config.ffn == "deepseek_v3":
        # GroupReducedLoss reduces token-statistic losses only; a per-sequence loss would
        # need its own rule, and the bias update alone would change the recipe.
        raise UsageError(
            "ffn=deepseek_v3 trains in one process only: its sequence-wise balance loss "
            "has no cross-rank reduction in moeblocks.distributed yet"
        )
    if config.ffn == "llama4" and P > 1:
        # MoELayer weights the *inputs* by the rows' slots in its own routing; the
        # all-to-all dispatcher hands it the rows this rank received, in another order.
        raise UsageError(
            "ffn=llama4 weights expert inputs, which the expert-parallel dispatcher does "
            f"not support: use --expert-parallel 1 (got {P})"
        )
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
            processes come and go (:class:`moeblocks.runtime.threads.ThreadTuner`); for counts
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
    config, ckpt, spec, encoding = _resolve(config, data, out, resume, overwrite, encoding)
    dev = resolve_device(device)
    check_ffn(config)
    par = _plan_parallel(expert_parallel, config, parallel)

    # Everything that can fail on bad input happens before the first write.
    corpus = load_corpus(spec, encoding)
    if ckpt is not None:
        check_corpus(corpus, ckpt)
        if par is None or par.main:
            note_skipped(ckpt)
    setup = _Setup(config, out, ckpt, corpus, dev, stop_at, progress, tune_threads)
    if par is None:
        return _train(setup, _OneProcess())
    with _process_group(par, dev) as rank_dev:
        return _train(dataclasses.replace(setup, dev=rank_dev), _Sharded(par))


def _resolve(
    config: SRAConfig | None,
    data: str | None,
    out: Path,
    resume: bool,
    overwrite: bool,
    encoding: str | None,
) -> tuple[SRAConfig, Checkpoint | None, str, str]:
    """The run's config, the checkpoint to resume, and its data spec and encoding."""
    if not resume:
        if config is None:
            raise UsageError("a config (preset) is needed to start a new run")
        if checkpoint_dirs(out) and not overwrite:
            raise UsageError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        return config, None, data_spec("pydoc" if data is None else data), encoding or "utf-8"
    ckpt = find_checkpoint(out) if out.is_dir() else None
    if ckpt is None:
        raise UsageError(f"--resume: {out} holds no checkpoint")
    if config is None:
        config = ckpt.config
    may_change = fields_where("may_change_on_resume")
    diff = describe_differences(ckpt.config, config, ignore=may_change)
    if diff:
        raise UsageError(f"checkpoint in {out} is from a different config: {diff}")
    if config.steps < ckpt.step:
        raise UsageError(f"--steps {config.steps} is below the checkpoint's step {ckpt.step}")
    ckpt = with_data(ckpt, out, data, encoding)
    return config, ckpt, ckpt.data, ckpt.encoding


@contextmanager
def _process_group(par: _Parallel, dev: torch.device) -> Iterator[torch.device]:
    """This rank's device inside the process group (created here unless it exists)."""
    if dev.type == "cuda":
        dev = torch.device("cuda", par.local_rank)
        torch.cuda.set_device(dev)
    owns_group = not dist.is_initialized()
    if owns_group:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=collective_timeout())
    try:
        if dist.get_world_size() != par.world or dist.get_rank() != par.rank:
            raise UsageError("the process group does not match WORLD_SIZE / RANK")
        yield dev
    except RuntimeError as err:
        named = timeout_error(err)  # gloo's timeout names no rank; the marks do
        if named is None:
            raise
        raise named from err
    finally:
        if owns_group:
            dist.destroy_process_group()


@dataclass(frozen=True)
class _Setup:
    """What a training call settled before its first write."""

    config: SRAConfig
    out: Path
    ckpt: Checkpoint | None
    corpus: Corpus
    dev: torch.device
    stop_at: int | None
    progress: bool
    tune_threads: bool


@dataclass
class _Context:
    """The small run context every step reads: built once by :func:`_fit`.

    Attributes:
        setup: The call's settled inputs.
        engine: The one-process or the sharded path.
        model: The model (under FSDP2, sharded in place).
        forward: What a step calls: the model, or DDP's wrapper of it.
        optimizer: AdamW over the (possibly sharded) parameters.
        tok_json: The tokeniser, saved with every checkpoint.
        train_tokens: The training split's ids.
        valid_tokens: The validation split's ids.
        last_saved: Step of the newest checkpoint (None: none yet).
    """

    setup: _Setup
    engine: _Engine
    model: SRATransformer
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    tok_json: str
    train_tokens: torch.Tensor
    valid_tokens: torch.Tensor
    last_saved: int | None

    @property
    def config(self) -> SRAConfig:
        """The run's config."""
        return self.setup.config


@runtime_checkable
class _Engine(Protocol):
    """The one-process and the sharded paths of training, behind one interface."""

    rank: int
    world: int
    main: bool  # rank 0 logs, shows progress and writes files
    mesh: Any  # the expert-parallel mesh once wrapped (None: no expert parallelism)

    def tokenizer(self, train_text: str, vocab_size: int) -> Any:
        """A new run's tokeniser, the same on every rank."""
        ...

    def wrap(self, model: SRATransformer) -> nn.Module:
        """Parallelise ``model`` (or not); returns what the forward calls."""
        ...

    def restore(self, ckpt: Checkpoint, ctx: _Context, state: dict[str, Any]) -> None:
        """Load the optimizer state and the random state of a checkpoint."""
        ...

    def fresh_rng(self, seed: int) -> None:
        """The random state of a new run's first step."""
        ...

    def clip_and_share(
        self, ctx: _Context, ce: torch.Tensor, signum: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """Clip the gradients; return the global loss, the norm and any rank's stop signal."""
        ...

    def sum_(self, t: torch.Tensor) -> None:
        """Sum ``t`` over the ranks, in place."""
        ...

    def save(self, ctx: _Context, at: int) -> None:
        """Write a verified checkpoint of step ``at``."""
        ...


class _OneProcess:
    """Training in this process alone."""

    rank, world, main, mesh = 0, 1, True, None

    def tokenizer(self, train_text: str, vocab_size: int) -> Any:
        from moeblocks.sra.tokenizer import train_tokenizer

        return train_tokenizer(train_text, vocab_size)

    def wrap(self, model: SRATransformer) -> nn.Module:
        return model

    def restore(self, ckpt: Checkpoint, ctx: _Context, state: dict[str, Any]) -> None:
        if not is_sharded(ckpt):
            ctx.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and ctx.setup.dev.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def fresh_rng(self, seed: int) -> None:
        pass  # the stream torch.manual_seed(config.seed) started before the model

    def clip_and_share(
        self, ctx: _Context, ce: torch.Tensor, signum: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        max_norm = ctx.config.grad_clip if ctx.config.grad_clip > 0 else math.inf
        return ce, torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), max_norm), signum

    def sum_(self, t: torch.Tensor) -> None:
        pass

    def save(self, ctx: _Context, at: int) -> None:
        s = ctx.setup
        _check_finite(ctx.model.state_dict(), at)
        save_checkpoint(s.out, at, ctx.model, ctx.optimizer, s.config, s.corpus, ctx.tok_json,
                        keep=s.config.keep_checkpoints)  # fmt: skip


class _Sharded:
    """Training on W ranks under ``torchrun`` (see the module docstring)."""

    def __init__(self, par: _Parallel) -> None:
        self.par = par
        self.rank, self.world, self.main = par.rank, par.world, par.main
        self.pm: ParallelModel | None = None

    def tokenizer(self, train_text: str, vocab_size: int) -> Any:
        from tokenizers import Tokenizer

        from moeblocks.sra.tokenizer import train_tokenizer

        # Trained once, on rank 0, so every rank surely has the same one.
        box = [train_tokenizer(train_text, vocab_size).to_str() if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return Tokenizer.from_str(box[0])

    def wrap(self, model: SRATransformer) -> nn.Module:
        cfg = ParallelConfig(engine=self.par.engine, ep_size=self.par.ep_size)
        self.pm = parallelize(model, cfg)
        return self.pm.module  # DDP's wrapper; under FSDP2 the model

    @property
    def mesh(self) -> Any:
        return None if self.pm is None else self.pm.expert_mesh

    def restore(self, ckpt: Checkpoint, ctx: _Context, state: dict[str, Any]) -> None:
        if not is_sharded(ckpt):
            load_full_optimizer_state(
                ctx.model, ctx.optimizer, state["optimizer"], expert_mesh=self.mesh
            )
        rngs = state.get("rng_per_rank")
        if rngs is not None and len(rngs) == self.world:
            torch.set_rng_state(rngs[self.rank])
        else:  # saved on another world size: a fresh stream per rank
            torch.manual_seed(_rank_seed(ctx.config.seed, self.rank, int(state["step"])))

    def fresh_rng(self, seed: int) -> None:
        torch.manual_seed(_rank_seed(seed, self.rank, 0))

    def clip_and_share(
        self, ctx: _Context, ce: torch.Tensor, signum: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        assert self.pm is not None  # made by wrap
        max_norm = ctx.config.grad_clip if ctx.config.grad_clip > 0 else math.inf
        self.pm.sync_gradients()  # what the engine leaves (see its docstring)
        norm = self.pm.clip_grad_norm_(max_norm)
        # One all-reduce: the global mean loss (equal token counts per rank) and whether
        # any rank got a stop signal, so all stop at the same step.
        flag = torch.tensor(float(signum or 0), device=ctx.setup.dev)
        shared = torch.stack([ce.detach().float(), flag])
        dist.all_reduce(shared)
        if shared[1] > 0 and signum is None:  # another rank was signalled
            signum = signal.SIGTERM
        return shared[0] / self.world, norm, signum

    def sum_(self, t: torch.Tensor) -> None:
        dist.all_reduce(t)

    def save(self, ctx: _Context, at: int) -> None:
        s = ctx.setup
        _check_finite(ctx.model.state_dict(), at, collective=True)
        rngs: list[Any] = [None] * self.world
        dist.all_gather_object(rngs, torch.get_rng_state())
        folder = [str(shard_folder(s.out, at)) if self.main else None]
        dist.broadcast_object_list(folder, src=0)
        save_sharded(folder[0], ctx.model, ctx.optimizer, expert_mesh=self.mesh)  # own shards
        if self.main:
            save_checkpoint(
                s.out, at, ctx.model, ctx.optimizer, s.config, s.corpus, ctx.tok_json,
                keep=s.config.keep_checkpoints, sharded=Path(folder[0]),
                extra_state={"rng_per_rank": rngs, "world_size": self.world},
            )  # fmt: skip
        dist.barrier()  # no rank goes on (or exits) before the checkpoint is in place


def _train(setup: _Setup, engine: _Engine) -> TrainResult:
    """Tokenise (checking the split lengths), then claim the run folder and fit."""
    from moeblocks.sra.tokencache import encode_split
    from moeblocks.sra.tokenizer import load_tokenizer

    config, ckpt = setup.config, setup.ckpt
    if ckpt is not None:
        tok = load_tokenizer(
            ckpt.path / "tokenizer.json",
            sha256=ckpt.tokenizer_sha256,
            vocab_size=config.vocab_size,
        )
    else:
        tok = engine.tokenizer(setup.corpus.train, config.vocab_size)
    # Cached per corpus and tokeniser (for corpora read from a path): a resumed run and
    # eval/inspect read the same ids without tokenising again.
    train_np, valid_np = (encode_split(tok, setup.corpus, split) for split in ("train", "valid"))
    check_length(train_np, config.seq_len, "training")
    check_length(valid_np, config.seq_len, "validation")
    tokens = (torch.from_numpy(train_np), torch.from_numpy(valid_np))
    if not engine.main:  # rank 0 alone writes into the run folder
        return _fit(setup, engine, tok.to_str(), *tokens)
    with claim_run(setup.out, resume_step=None if ckpt is None else ckpt.step):
        return _fit(setup, engine, tok.to_str(), *tokens)


def _fit(
    setup: _Setup,
    engine: _Engine,
    tok_json: str,
    train_tokens: torch.Tensor,
    valid_tokens: torch.Tensor,
) -> TrainResult:
    """Build (or restore) the model and optimizer and run the training loop."""
    config, ckpt, dev = setup.config, setup.ckpt, setup.dev
    torch.manual_seed(config.seed)
    model = SRATransformer(config).to(dev)
    if ckpt is not None and not is_sharded(ckpt):
        load_weights(model, ckpt, config)  # the full weights, before any sharding
    if ckpt is None:
        # Before sharding, on the whole step-0 batch: every rank seeds what one process
        # seeds (and FSDP2 would drop writes into gathered parameters).
        _seed_anchors(model, train_tokens, config, dev)
    forward = engine.wrap(model)
    optimizer = build_optimizer(model, config)  # after sharding: the parameters are new
    last = None if ckpt is None else ckpt.step
    ctx = _Context(setup, engine, model, forward, optimizer, tok_json, train_tokens,
                   valid_tokens, last)  # fmt: skip
    step = 0
    if ckpt is not None:
        state = load_state(ckpt)
        step = int(state["step"])
        if is_sharded(ckpt):  # weights and optimizer state, each rank its pieces
            load_sharded(ckpt.path / SHARDS, model, optimizer, expert_mesh=engine.mesh)
        engine.restore(ckpt, ctx, state)
    else:
        engine.fresh_rng(config.seed)
    if engine.main:
        atomic_write_text(setup.out / "tokenizer.json", tok_json)
    return _loop(ctx, step)


@dataclass(frozen=True)
class _Step:
    """What one training step measured (host numbers: one sync per step)."""

    lr: float
    ce: float
    aux: float
    norm: float
    routings: tuple[Any, ...]
    aux_losses: tuple[Any, ...]  # per MoE block, read only when a step is skipped
    signum: int | None  # a stop signal this step saw (on any rank)


def _train_step(ctx: _Context, step: int, signals: Any) -> _Step:
    """Forward and backward of one step on this rank's slice of the batch; clip, no update."""
    config, dev, engine = ctx.config, ctx.setup.dev, ctx.engine
    ctx.model.train()
    ctx.model.set_step(step)
    lr = lr_at(step, config)
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    B = config.batch_size
    rows = slice(engine.rank * B // engine.world, (engine.rank + 1) * B // engine.world)
    x_BS, y_BS = (
        t[rows].to(dev)  # this rank's slice of the global batch
        for t in batch_at(ctx.train_tokens, step, B, config.seq_len, config.seed)
    )
    with _autocast(config, dev):
        res = ctx.forward(x_BS)
    ce = F.cross_entropy(res.logits.flatten(0, 1).float(), y_BS.flatten())
    aux = res.total_aux_loss()
    (ce + aux).backward()
    ce, norm, signum = engine.clip_and_share(ctx, ce, signals.signum)
    # One host sync for the three numbers; the same on every rank.
    ce_value, aux_value, norm_value = torch.stack(
        [ce.detach().float(), aux.detach().float(), norm.detach().float()]
    ).tolist()
    return _Step(
        lr, ce_value, aux_value, norm_value, tuple(res.routings), tuple(res.aux_losses), signum
    )


class _RoutingStats:
    """Routed slots and router entropy, accumulated on the device between reads."""

    def __init__(self, L: int, E: int, dev: torch.device) -> None:
        self.L, self.E = L, E
        self.counts_LE = torch.zeros(L, E, dtype=torch.long, device=dev)  # dead window
        # Since the last log record: routed slots per expert and summed router entropy.
        self.log_counts_LE = torch.zeros(L, E, dtype=torch.long, device=dev)
        self.log_entropy_L = torch.zeros(L, dtype=torch.float64, device=dev)
        # Routed copies a capacity limit dropped, and all routed copies, over every layer.
        self.log_dropped_2 = torch.zeros(2, dtype=torch.long, device=dev)
        self.log_steps = 0
        self.dead = "-"

    @torch.no_grad()
    def add(self, routings: Sequence[Any], applied: bool) -> None:
        """Count one step's routing (no host sync)."""
        for layer, routing in enumerate(routings):
            slots_E = torch.bincount(routing.experts.flatten(), minlength=self.E)
            self.counts_LE[layer] += slots_E
            self.log_counts_LE[layer] += slots_E
            self.log_dropped_2[0] += routing.num_dropped
            self.log_dropped_2[1] += routing.experts.numel()
            if applied:  # a skipped step's probabilities may be NaN
                p_TE = routing.probs.float()
                # Sigmoid scores (DeepSeek-V3, Llama 4) do not sum to 1: the entropy of
                # the distribution they define (a no-op for a softmax, up to rounding).
                p_TE = p_TE / p_TE.sum(-1, keepdim=True).clamp(min=1e-30)
                h_T = -(p_TE * p_TE.clamp(min=1e-30).log()).sum(-1)
                self.log_entropy_L[layer] += h_T.mean()
        self.log_steps += int(applied)

    def window(self, step: int, engine: _Engine) -> None:
        """Every DEAD_WINDOW steps: how many experts got no slot in the window."""
        if self.L and step % DEAD_WINDOW == 0:
            engine.sum_(self.counts_LE)
            self.dead = f"{int((self.counts_LE == 0).sum())}/{self.L * self.E}"
            self.counts_LE.zero_()

    def log_fields(self, engine: _Engine) -> dict[str, Any]:
        """Per-layer slots, entropy and the dropped fraction since the last record.

        Slots per layer and expert, mean router entropy per layer, and the fraction of
        routed copies (all layers) that a capacity limit dropped: 0 without one.
        """
        if not self.L:
            return {}
        engine.sum_(self.log_counts_LE)  # every rank logs at the same steps
        engine.sum_(self.log_entropy_L)
        engine.sum_(self.log_dropped_2)
        self.log_entropy_L /= engine.world
        steps = self.log_steps
        dropped, slots = self.log_dropped_2.tolist()
        fields = {
            "expert_counts": self.log_counts_LE.tolist(),
            "router_entropy": (self.log_entropy_L / steps).tolist() if steps else None,
            "dropped": dropped / slots if slots else 0.0,
        }
        self.log_counts_LE.zero_()
        self.log_entropy_L.zero_()
        self.log_dropped_2.zero_()
        self.log_steps = 0
        return fields


def _skip_or_apply(
    ctx: _Context, st: _Step, step: int, guard: NonFiniteGuard, log: Any
) -> str | None:
    """Apply the step's update unless the guard skips it; why it was skipped, or None."""
    try:
        skipped = guard.check(step + 1, st.ce, st.aux, st.norm)
    except DivergedError as err:
        _write(log, {"step": step + 1, "skipped": str(err), "lr": st.lr})
        where = (
            f"the newest checkpoint, step {ctx.last_saved}, is kept in {ctx.setup.out}"
            if ctx.last_saved is not None
            else "no checkpoint had been saved"
        )
        raise DivergedError(
            f"{err}; stopped without saving, {where} (resume with a lower lr, "
            "or a higher max_skipped_steps)"
        ) from None
    if skipped is not None and not math.isfinite(st.aux):
        for i, losses in enumerate(st.aux_losses):  # a sync, on this rare path only
            warn_non_finite(losses, f"MoE block {i} (model.moe_layers[{i}])")
    if skipped is None:
        ctx.optimizer.step()
        # Aux-loss-free balancing (DeepSeek-V3): one bias update per applied step, from
        # the loads its forward counted (summed over ranks: parallelize sets the group).
        step_balancers(ctx.model)
    else:  # the loads of a step that was not applied move no bias
        for balancer in balancers(ctx.model):
            balancer.load.zero_()
    ctx.optimizer.zero_grad(set_to_none=True)
    return skipped


def _record(ctx: _Context, st: _Step, step: int, skipped: str | None) -> dict[str, Any]:
    """The log record of a finished step, with a validation pass when one is due."""
    config = ctx.config
    record: dict[str, Any] = {
        "step": step,
        "loss": st.ce,
        "aux": st.aux,  # global statistics: the same on every rank
        "lr": st.lr,
        "k": ctx.model.k,
    }
    if skipped is not None:  # not applied; JSON has no NaN
        record.update(loss=None, aux=None, skipped=skipped)
    if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
        # Every rank evaluates the whole split (its MoE layers exchange rows).
        ev = evaluate(ctx.model, ctx.valid_tokens, config.batch_size, max_tokens=config.eval_tokens)
        record.update(
            val_loss=ev.loss, val_ppl=ev.ppl, dead=ev.dead_per_layer, val_dropped=ev.dropped
        )
    return record


def _save(ctx: _Context, at: int) -> None:
    mark(f"the save of step {at}", 2 * at + 1)
    ctx.engine.save(ctx, at)
    ctx.last_saved = at


def _loop(ctx: _Context, step: int) -> TrainResult:
    """Run the steps from ``step`` to the end (or ``stop_at``), logging and saving."""
    config, setup, engine = ctx.config, ctx.setup, ctx.engine
    last_stop = config.steps if setup.stop_at is None else min(setup.stop_at, config.steps)
    val = float("nan")
    t0, start = time.perf_counter(), step
    bar = _progress(config.steps, step, setup.progress and engine.main)
    stats = _RoutingStats(len(ctx.model.moe_layers), config.num_experts, setup.dev)
    guard = NonFiniteGuard(config.max_skipped_steps)
    tuner = ThreadTuner() if setup.tune_threads and setup.dev.type == "cpu" else None
    save_due = False  # a periodic checkpoint waits for the end of a skipped streak
    log = (setup.out / "log.jsonl").open("a", encoding="utf-8") if engine.main else None
    try:
        with StopSignals() as signals:
            while step < last_stop:
                mark(f"step {step + 1}", 2 * (step + 1))  # the save of step N marks 2N + 1
                st = _train_step(ctx, step, signals)
                skipped = _skip_or_apply(ctx, st, step, guard, log)
                if tuner is not None:
                    tuner.step()
                stats.add(st.routings, skipped is None)
                step += 1
                stats.window(step, engine)
                record = _record(ctx, st, step, skipped)
                if skipped is not None and engine.main:
                    bar.write(f"step {step}: skipped, {skipped}")
                val = record.get("val_loss", val)
                notable = "val_loss" in record or "skipped" in record
                if step % LOG_EVERY == 0 or step == last_stop or notable:
                    tokens = (step - start) * config.batch_size * config.seq_len
                    record["tok_per_s"] = round(tokens / (time.perf_counter() - t0))
                    record.update(stats.log_fields(engine))
                    _write(log, record)
                ppl = math.exp(min(st.ce, 50.0))  # capped: exp overflows past ~709
                bar.set_postfix_str(
                    f"loss {st.ce:.3f} ppl {ppl:.1f} k {ctx.model.k} dead {stats.dead}",
                    refresh=False,
                )
                bar.update(1)  # after the postfix: a plain progress line shows this step's
                save_due = save_due or bool(config.ckpt_every and step % config.ckpt_every == 0)
                if step == last_stop or (save_due and guard.streak == 0):
                    _save(ctx, step)
                    save_due = False
                if st.signum is not None and step != last_stop:
                    if ctx.last_saved != step:
                        _save(ctx, step)  # the weights are those of the last applied step
                    raise Interrupted(st.signum)
    finally:
        bar.close()
        if log is not None:
            log.close()
    if math.isnan(val):  # stopped early (stop_at): measure where we are
        val = evaluate(
            ctx.model, ctx.valid_tokens, config.batch_size, max_tokens=config.eval_tokens
        ).loss
    return TrainResult(setup.out, step, val, math.exp(val), time.perf_counter() - t0)


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
