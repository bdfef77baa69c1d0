"""Training loop of the SRA transformer: AdamW, warmup + cosine decay, k curriculum.

Legend: B batch, S sequence length, V vocabulary, L MoE layers, E experts.

``train`` is what ``moeblocks train`` and ``moeblocks demo`` call. The batch of every
step is a function of ``(seed, step)`` and the optimizer, schedules and RNG are saved
with each checkpoint, so ``--resume`` continues bit for bit where a run stopped. Ctrl-C
finishes the current step, saves a checkpoint and then raises ``KeyboardInterrupt``; a
second Ctrl-C stops at once without saving.

Expert parallelism: under ``torchrun --nproc-per-node W`` with ``expert_parallel=P``, the
experts of every MoE layer are spread over groups of P ranks
(:mod:`moeblocks.distributed`) and each of the W ranks trains on a disjoint slice of the
same ``(seed, step)`` batch, so W ranks with B / W sequences each see exactly the batch
one process sees. Rank ``r`` takes rows ``[r·B/W, (r+1)·B/W)``. Each rank's cross-entropy
is a mean over its B/W·S tokens and :func:`~moeblocks.distributed.all_reduce_gradients`
averages the W ranks' gradients, which is the gradient of the mean over all B·S tokens;
the aux losses are computed on global token statistics
(:func:`~moeblocks.distributed.reduce_aux_losses`). So a W-rank run follows the 1-rank
run up to float rounding. Rank 0 logs and writes checkpoints, which hold the full
(gathered) weights and optimizer state and resume on any world size.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moeblocks.distributed import (
    all_reduce_gradients,
    clip_grad_norm_,
    expert_parallel_layers,
    expert_parallelize,
    full_state_dict,
    make_expert_parallel_groups,
    reduce_aux_losses,
)
from moeblocks.sra.checkpoint import (
    POINTER,
    Checkpoint,
    atomic_write_text,
    describe_differences,
    find_checkpoint,
    load_weights,
    remove_run_files,
    save_checkpoint,
)
from moeblocks.sra.config import SRAConfig, UsageError
from moeblocks.sra.data import Corpus, batch_at, check_length, load_corpus
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


@dataclass(frozen=True)
class _Parallel:
    """This process's place in an expert-parallel run (W ranks, groups of P)."""

    rank: int
    world: int
    ep_size: int
    local_rank: int
    groups: Any = None  # ExpertParallelGroups, once the process group is up

    @property
    def main(self) -> bool:
        """Rank 0 logs, shows progress and writes files."""
        return self.rank == 0


def _plan_parallel(expert_parallel: int | None, config: SRAConfig) -> _Parallel | None:
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
    if config.anchor_init == "batch":
        raise UsageError(
            "anchor_init 'batch' seeds the anchors from each rank's own first batch, which "
            "would differ between ranks; use orthogonal or kaiming with --expert-parallel"
        )
    return _Parallel(int(os.environ["RANK"]), world, P, int(os.environ.get("LOCAL_RANK", "0")))


def _rank_seed(seed: int, rank: int, step: int) -> int:
    # Every rank draws its own router noise; a fixed function of (seed, rank, step).
    return (seed * 1_000_003 + rank * 10_007 + step) % 2**63


def _expert_dispatchers(model: SRATransformer) -> dict[int, Any]:
    """Map each expert-shard parameter's ``id`` to the AllToAllDispatcher of its layer."""
    return {
        id(p): layer.dispatcher
        for _, layer in expert_parallel_layers(model)
        for p in layer.experts.parameters()
    }


def _full_optimizer_state(model: SRATransformer, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state one process holding every expert would have (a collective).

    AdamW keeps moments shaped like their parameter; those of expert shards ``[E/P, ...]``
    are all-gathered over the layer's expert-parallel group into ``[E, ...]``, in rank
    order, as :func:`~moeblocks.distributed.full_state_dict` does for the weights. Dense
    parameters' state is the same on every rank (their gradients are all-reduced).
    """
    experts = _expert_dispatchers(model)
    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    full: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(params):  # the same order, and the same entries, on every rank
        entry = dict(state["state"].get(i, {}))
        if id(p) in experts and entry:
            dispatcher = experts[id(p)]
            for key, t in entry.items():
                if isinstance(t, torch.Tensor) and t.shape == p.shape:
                    pieces = [torch.empty_like(t) for _ in range(dispatcher.group_size)]
                    dist.all_gather(pieces, t.contiguous(), group=dispatcher.group)
                    entry[key] = torch.cat(pieces)
        if entry:
            full[i] = entry
    return {"state": full, "param_groups": state["param_groups"]}


def _load_optimizer_state(
    model: SRATransformer, optimizer: torch.optim.Optimizer, full: dict
) -> None:
    """Load a full optimizer state (from any world size), each rank taking its experts."""
    experts = _expert_dispatchers(model)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    local: dict[int, dict[str, Any]] = {}
    for i, entry in full["state"].items():
        entry = dict(entry)
        p = params[int(i)]
        if id(p) in experts:
            L, rank = p.shape[0], experts[id(p)].group_rank
            for key, t in entry.items():
                if isinstance(t, torch.Tensor) and t.ndim and t.shape[1:] == p.shape[1:]:
                    entry[key] = t[rank * L : (rank + 1) * L]
        local[int(i)] = entry
    optimizer.load_state_dict({"state": local, "param_groups": full["param_groups"]})


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
    expert_parallel: int | None = None,
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
        expert_parallel: P, ranks sharing one copy of the experts, for a run launched by
            ``torchrun`` (which sets ``WORLD_SIZE`` and ``RANK``). P must divide the world
            size W and the experts, and W the batch size (see the module docstring).
            None: P = W under ``torchrun``, else a single process. The process group
            (gloo on CPU, NCCL on CUDA) is created here unless it already exists, and
            destroyed at the end.

    Returns:
        The :class:`TrainResult`.

    Raises:
        UsageError: Bad data, a config that does not match the checkpoint, an existing
            run without ``resume``, no checkpoint with ``resume``, or an expert-parallel
            setup that does not fit (see ``expert_parallel``). Nothing is written to
            ``out`` before these checks pass.
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
    par = _plan_parallel(expert_parallel, config)

    # Everything that can fail on bad input happens before the first write.
    corpus = load_corpus(data)
    run = (config, data, out, ckpt if resume else None, corpus, dev)
    if par is None:
        return _train(*run, None, stop_at=stop_at, progress=progress, overwrite=overwrite)
    if dev.type == "cuda":
        dev = torch.device("cuda", par.local_rank)
        torch.cuda.set_device(dev)
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        if dist.get_world_size() != par.world or dist.get_rank() != par.rank:
            raise UsageError("the process group does not match WORLD_SIZE / RANK")
        groups = make_expert_parallel_groups(par.ep_size)
        par = _Parallel(par.rank, par.world, par.ep_size, par.local_rank, groups)
        return _train(*run, par, stop_at=stop_at, progress=progress, overwrite=overwrite)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(
    config: SRAConfig,
    data: str,
    out: Path,
    ckpt: Checkpoint | None,
    corpus: Corpus,
    dev: torch.device,
    par: _Parallel | None,
    *,
    stop_at: int | None,
    progress: bool,
    overwrite: bool,
) -> TrainResult:
    """The body of :func:`train` once the run is checked (``ckpt``: resume from it)."""
    from moeblocks.sra.tokenizer import encode, load_tokenizer, train_tokenizer

    main = par is None or par.main
    if ckpt is not None:
        tok = load_tokenizer(ckpt.path / "tokenizer.json")
    elif par is None:
        tok = train_tokenizer(corpus.train, config.vocab_size)
    else:  # trained once, on rank 0, so every rank surely has the same one
        from tokenizers import Tokenizer

        box = [train_tokenizer(corpus.train, config.vocab_size).to_str() if main else None]
        dist.broadcast_object_list(box, src=0)
        tok = Tokenizer.from_str(box[0])
    train_np, valid_np = encode(tok, corpus.train), encode(tok, corpus.valid)
    check_length(train_np, config.seq_len, "training")
    check_length(valid_np, config.seq_len, "validation")
    train_tokens, valid_tokens = torch.from_numpy(train_np), torch.from_numpy(valid_np)

    torch.manual_seed(config.seed)
    model = SRATransformer(config).to(dev)
    if ckpt is not None:
        load_weights(model, ckpt, config)  # the full weights, before any sharding
    if par is not None:
        expert_parallelize(model, par.groups.ep)
        reduce_aux_losses(model)
    optimizer = build_optimizer(model, config)  # after sharding: expert params are new
    step = 0
    if ckpt is not None:
        state = torch.load(ckpt.path / "state.pt", map_location="cpu", weights_only=True)
        step = int(state["step"])
        if par is None:
            optimizer.load_state_dict(state["optimizer"])
        else:
            _load_optimizer_state(model, optimizer, state["optimizer"])
        rngs = state.get("rng_per_rank")
        if par is not None and rngs is not None and len(rngs) == par.world:
            torch.set_rng_state(rngs[par.rank])
        elif par is not None:  # saved on another world size: a fresh stream per rank
            torch.manual_seed(_rank_seed(config.seed, par.rank, step))
        else:
            torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and dev.type == "cuda" and par is None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if main:
            _truncate_log(out / "log.jsonl", step)
    else:
        if par is not None:
            torch.manual_seed(_rank_seed(config.seed, par.rank, 0))
        if main:
            if overwrite:
                remove_run_files(out)
            out.mkdir(parents=True, exist_ok=True)
    tok_json = tok.to_str()
    if main:
        atomic_write_text(out / "tokenizer.json", tok_json)

    def save(at: int) -> None:
        if par is None:
            save_checkpoint(out, at, model, optimizer, config, data, tok_json)
            return
        weights = full_state_dict(model)  # collectives: every rank takes part
        opt_state = _full_optimizer_state(model, optimizer)
        rngs: list[Any] = [None] * par.world
        dist.all_gather_object(rngs, torch.get_rng_state())
        if main:
            save_checkpoint(
                out, at, model, optimizer, config, data, tok_json,
                weights=weights, optimizer_state=opt_state,
                extra_state={"rng_per_rank": rngs, "world_size": par.world},
            )  # fmt: skip
        dist.barrier()  # no rank goes on (or exits) before the checkpoint is in place

    world, rank = (1, 0) if par is None else (par.world, par.rank)
    rows = slice(rank * config.batch_size // world, (rank + 1) * config.batch_size // world)
    last_stop = config.steps if stop_at is None else min(stop_at, config.steps)
    val = float("nan")
    t0, start = time.perf_counter(), step
    bar = _progress(config.steps, step, progress and main)
    L, E = len(model.moe_layers), config.num_experts
    counts_LE = torch.zeros(L, E, dtype=torch.long, device=dev)
    dead = "-"
    log = (out / "log.jsonl").open("a", encoding="utf-8") if main else None
    try:
        with _DeferredInterrupt() as interrupt:
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
                res = model(x_BS)
                ce = F.cross_entropy(res.logits.flatten(0, 1).float(), y_BS.flatten())
                aux = res.total_aux_loss()
                (ce + aux).backward()
                stop_requested = interrupt.requested
                if par is None:
                    if config.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                else:
                    all_reduce_gradients(model, par.groups)
                    if config.grad_clip > 0:
                        clip_grad_norm_(model, config.grad_clip, par.groups)
                    # One all-reduce: the global mean loss (equal token counts per rank)
                    # and whether any rank got Ctrl-C, so all ranks stop at the same step.
                    shared = torch.stack(
                        [ce.detach().float(), torch.tensor(float(stop_requested), device=dev)]
                    )
                    dist.all_reduce(shared)
                    ce = shared[0] / world
                    stop_requested = bool(shared[1] > 0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for layer, routing in enumerate(res.routings):
                    counts_LE[layer] += torch.bincount(routing.experts.flatten(), minlength=E)
                step += 1

                ce_value = ce.item()
                if L and step % DEAD_WINDOW == 0:
                    if par is not None:
                        dist.all_reduce(counts_LE)
                    dead = f"{int((counts_LE == 0).sum())}/{L * E}"
                    counts_LE.zero_()
                record: dict[str, Any] = {
                    "step": step,
                    "loss": ce_value,
                    "aux": aux.item(),  # global statistics: the same on every rank
                    "lr": lr,
                    "k": model.k,
                }
                if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
                    # Every rank evaluates the whole split (its MoE layers exchange rows).
                    ev = evaluate(
                        model, valid_tokens, config.batch_size, max_tokens=config.eval_tokens
                    )
                    val = ev.loss
                    record.update(val_loss=ev.loss, val_ppl=ev.ppl, dead=ev.dead_per_layer)
                if log is not None and (
                    step % LOG_EVERY == 0 or "val_loss" in record or step == last_stop
                ):
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
                if stop_requested and step != last_stop:
                    save(step)
                    raise KeyboardInterrupt
    finally:
        bar.close()
        if log is not None:
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
