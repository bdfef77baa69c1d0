"""Fault injection: a training run never loses a verified checkpoint.

Each test breaks a run in one way and checks what survives:

- ``kill -9`` of a resumed run at seeded points of its save loop (a seeded sample of the
  Python lines the saves run: those of the library's save code, and those of any code,
  safetensors' and torch.save's included) and at seeded wall-clock moments (which also
  land inside system calls). After each kill: at least
  ``keep_checkpoints`` checkpoints verify, each is bit for bit the uninterrupted run's
  checkpoint of its step, every ``step-N`` folder verifies (a half-written one never
  looks complete), and a resume finishes bit for bit where the uninterrupted run did;
- flipped, truncated and deleted bytes of every checkpoint file: the error names the
  file, a resume takes the older checkpoint and says what it skipped;
- SIGTERM / SIGUSR1 mid-run: a checkpoint is saved, the CLI exits with 128 + signal;
- NaN / inf injected into the loss or the gradient mid-run: the step is skipped and
  logged, a streak stops the run and leaves the good checkpoints as they were;
- run folder and data problems: clear errors before any work, nothing foreign touched.

The seeds are fixed lists: CI runs the same cases every time. Tiny models on one
intra-op thread (see ``one_thread`` in conftest.py); the kill tests fork the test process
(cheap: no new interpreter), so they need POSIX.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import select
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moeblocks.cli import main
from moeblocks.runtime import durable as durable_module
from moeblocks.sra import SRAConfig, UsageError
from moeblocks.sra import checkpoint as checkpoint_module
from moeblocks.sra import train as train_module
from moeblocks.sra.checkpoint import (
    FILES,
    MANIFEST,
    CheckpointError,
    checkpoint_dirs,
    find_checkpoint,
    verify_checkpoint,
)
from moeblocks.sra.data import load_corpus, synthetic_text
from moeblocks.sra.evaluate import load_run, run_corpus
from moeblocks.sra.guards import DivergedError, Interrupted
from moeblocks.sra.model import SRATransformer
from moeblocks.sra.rundir import MARKER
from moeblocks.sra.train import train

fcntl = pytest.importorskip("fcntl")  # POSIX, as os.fork

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="fault injection forks (POSIX)"),
]

STEPS = 8
KILL_SEED = 16  # the number; any fixed seed gives a fixed list of cases
TRACE_KILLS = 24  # kill points sampled from all Python lines run by the save loop
OWN_KILLS = 28  # ... from the lines of the library's own save code
TIMED_KILLS = 12  # kills at seeded wall-clock moments
CHILD_TIMEOUT_S = 120  # a forked run that takes longer has hung: fail, do not wait


def micro(**changes: object) -> SRAConfig:
    base = SRAConfig(
        vocab_size=300, seq_len=16, d_model=32, n_layers=2, n_heads=2, num_experts=8,
        d_expert=16, k_start=1, k_final=2, k_switch=0.5, steps=STEPS, batch_size=4,
        warmup=2 / STEPS,
        eval_every=0, eval_tokens=256, ckpt_every=1, dispatcher="torch",
        band_floor=0.0005 * 32, band_ceiling=0.004 * 32,
    )  # fmt: skip
    return base.replace(**changes)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights_digest(path: Path) -> str:
    """A digest of a weights file's tensors, bit for bit.

    Not of the file: safetensors may keep either name of the tied embedding, so equal
    weights can be written as different bytes. So: the sorted tensor digests, no names.
    """
    from safetensors.torch import load_file

    digests = sorted(
        hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        + str(tuple(t.shape))
        for t in load_file(path).values()
    )
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def verified(run: Path) -> dict[int, str]:
    """``{step: weights digest}`` of every checkpoint that verifies."""
    good = {}
    for step, path in checkpoint_dirs(run):
        try:
            verify_checkpoint(path)
        except CheckpointError:
            continue
        good[step] = weights_digest(path / "model.safetensors")
    return good


def stale(run: Path) -> list[str]:
    """Leftovers of killed processes: temporary and half-deleted folders, temp files."""
    names = (
        [p.name for p in (run / "checkpoints").iterdir()] if (run / "checkpoints").is_dir() else []
    )
    names += [p.name for p in run.iterdir()]
    return [n for n in names if n.startswith((".tmp-", ".del-")) or n.endswith(".tmp")]


def log_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(synthetic_text(600, seed=7), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data_file: str) -> dict[int, str]:
    """The uninterrupted run: SHA-256 of its weights after every step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(micro(keep_checkpoints=STEPS), data_file, out, progress=False)
    weights = verified(out)
    assert sorted(weights) == list(range(1, STEPS + 1))
    return weights


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory, data_file: str) -> Path:
    """A run stopped after step 2: checkpoints 1 and 2 (keep 2), copied by each test."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(micro(), data_file, out, stop_at=2, progress=False)
    assert sorted(verified(out)) == [1, 2]
    return out


def copy_run(base: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base, run)
    return run


def finish_and_compare(run: Path, data_file: str, reference: dict[int, str]) -> None:
    """Resume to the end: the final weights are the uninterrupted run's, no leftovers."""
    result = train(None, data_file, run, resume=True, progress=False)
    assert result.step == STEPS
    assert verified(run)[STEPS] == reference[STEPS]
    assert stale(run) == []


# --- kill -9 ------------------------------------------------------------------------


def in_child(body: Callable[[], None]) -> int:
    """Run ``body`` in a forked copy of this process; return its pid."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            body()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def wait(pid: int, kill_after: float | None = None) -> int:
    """Wait for a child (SIGKILL it after ``kill_after`` s); return its wait status."""
    start = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        elapsed = time.monotonic() - start
        if kill_after is not None and elapsed >= kill_after:
            os.kill(pid, signal.SIGKILL)
            kill_after = None
        if elapsed > CHILD_TIMEOUT_S:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"forked run {pid} hung")
        time.sleep(0.002)


# The library's own save code: a kill between any two of its statements tests the order
# of writes, fsyncs, renames and deletions; the other frames (safetensors, torch.save)
# add kills in the middle of writing a file.
OWN_FILES = frozenset(module.__file__ for module in (checkpoint_module, durable_module))


def resume_with_kill_point(
    run: Path, data_file: str, kill_at: int | None, count: Path, *, own: bool
) -> None:
    """Resume ``run`` to the end, SIGKILL-ing itself at the ``kill_at``-th traced line.

    Lines are counted below ``save_checkpoint``, over all saves of the run: in every
    Python frame, or with ``own`` only in the library's (:data:`OWN_FILES`). A run that
    gets to its end writes the count to ``count`` (and, with ``kill_at``, is killed).
    """
    lines = 0

    def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
        nonlocal lines
        if event == "call" and own and frame.f_code.co_filename not in OWN_FILES:
            return None  # no line events from this frame (calls below it are still seen)
        if event == "line":
            lines += 1
            if lines == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return tracer

    real = train_module.save_checkpoint

    def traced(*args, **kwargs):  # type: ignore[no-untyped-def]
        sys.settrace(tracer)
        try:
            return real(*args, **kwargs)
        finally:
            sys.settrace(None)

    train_module.save_checkpoint = traced
    train(None, data_file, run, resume=True, progress=False)
    count.write_text(str(lines))
    if kill_at is not None:  # the count varies a little (first-call caches): the end
        os.kill(os.getpid(), signal.SIGKILL)


def check_after_kill(run: Path, data_file: str, reference: dict[int, str]) -> None:
    good = verified(run)
    dirs = [step for step, _ in checkpoint_dirs(run)]
    assert sorted(good) == sorted(dirs), "a step-N folder that does not verify appeared"
    assert len(good) >= 2, f"fewer than keep_checkpoints=2 verified checkpoints: {good}"
    for step, digest in good.items():
        assert digest == reference[step], f"checkpoint {step} differs from the reference"
    ckpt = find_checkpoint(run)
    assert ckpt is not None
    assert ckpt.step == max(good)
    finish_and_compare(run, data_file, reference)


@pytest.fixture(scope="module")
def save_loop(
    base_run: Path, data_file: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, float]:
    """Traced lines of the save loop (steps 3..8), all and own, and an untraced run's time."""
    root = tmp_path_factory.mktemp("count")
    lines = {}
    for own in (False, True):
        run, count = copy_run(base_run, root / f"traced-{own}"), root / f"count-{own}"
        body = functools.partial(resume_with_kill_point, run, data_file, None, count, own=own)
        child = in_child(body)
        assert os.waitstatus_to_exitcode(wait(child)) == 0
        lines["own" if own else "all"] = int(count.read_text())
    run = copy_run(base_run, root / "untraced")
    start = time.monotonic()
    status = wait(in_child(lambda: train(None, data_file, run, resume=True, progress=False)))
    assert os.waitstatus_to_exitcode(status) == 0
    return {**lines, "seconds": time.monotonic() - start}


def seeded_fractions(seed: int, n: int, ends: bool) -> list[object]:
    """``n`` fixed fractions in [0, 1] (0 and 1 among them with ``ends``), as test params."""
    rng = random.Random(seed)
    fractions = sorted([0.0, 1.0][: 2 * ends] + [rng.random() for _ in range(n - 2 * ends)])
    return [pytest.param(f, id=f"{i:02d}-{f:.3f}") for i, f in enumerate(fractions)]


KILL_POINTS = [
    pytest.param(False, *p.values, id=f"any-{p.id}")
    for p in seeded_fractions(KILL_SEED, TRACE_KILLS, ends=True)
] + [
    pytest.param(True, *p.values, id=f"own-{p.id}")
    for p in seeded_fractions(KILL_SEED + 2, OWN_KILLS, ends=True)
]


# Fractions of the save loop, not line numbers, so the cases do not depend on how many
# lines a save takes; 0 and 1 pin its first and last line.
@pytest.mark.parametrize(("own", "fraction"), KILL_POINTS)
def test_kill_9_at_a_line_of_the_save_loop(
    own: bool,
    fraction: float,
    base_run: Path,
    data_file: str,
    reference: dict[int, str],
    save_loop: dict[str, float],
    tmp_path: Path,
) -> None:
    total = int(save_loop["own" if own else "all"])
    kill_at = 1 + round(fraction * (total - 1))
    run, reached_end = copy_run(base_run, tmp_path), tmp_path / "reached-end"
    status = wait(
        in_child(lambda: resume_with_kill_point(run, data_file, kill_at, reached_end, own=own))
    )
    assert os.WIFSIGNALED(status), status
    assert os.WTERMSIG(status) == signal.SIGKILL
    assert fraction > 0.95 or not reached_end.exists(), "killed only after the save loop"
    check_after_kill(run, data_file, reference)


@pytest.mark.parametrize("moment", seeded_fractions(KILL_SEED + 1, TIMED_KILLS, ends=False))
def test_kill_9_at_a_moment_of_the_run(
    moment: float,
    base_run: Path,
    data_file: str,
    reference: dict[int, str],
    save_loop: dict[str, float],
    tmp_path: Path,
) -> None:
    # The kill lands wherever the run is then, inside a write or fsync too. Where
    # exactly varies with the machine; what must hold does not.
    seconds = save_loop["seconds"]
    run = copy_run(base_run, tmp_path)
    pid = in_child(lambda: train(None, data_file, run, resume=True, progress=False))
    wait(pid, kill_after=moment * seconds)
    check_after_kill(run, data_file, reference)


# --- damaged files ------------------------------------------------------------------

DAMAGE = ("flip-first", "flip-middle", "flip-last", "truncate-half", "truncate-0", "delete")
CKPT_FILES = (*FILES, MANIFEST)


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "delete":
        path.unlink()
        return
    if how.startswith("flip"):
        at = {"flip-first": 0, "flip-last": len(data) - 1}.get(
            how, random.Random(f"{path.name}{len(data)}").randrange(len(data))
        )
        data[at] ^= 0xFF
    else:
        data = data[: len(data) // 2] if how == "truncate-half" else bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", CKPT_FILES)
def test_damaged_file_is_named(name: str, how: str, base_run: Path, tmp_path: Path) -> None:
    run = copy_run(base_run, tmp_path)
    newest = run / "checkpoints" / "step-0000002"
    damage(newest / name, how)
    with pytest.raises(CheckpointError, match=str(newest / name).replace(".", r"\.")):
        verify_checkpoint(newest)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_run(newest)  # a checkpoint folder given directly must verify
    ckpt = find_checkpoint(run)  # a run folder: the older checkpoint, the newer skipped
    assert ckpt is not None
    assert ckpt.step == 1
    assert len(ckpt.skipped) == 1
    assert ckpt.skipped[0].startswith("step-0000002: ")
    assert name in ckpt.skipped[0]


def _flip_hex_digit(digest: str) -> str:
    return ("1" if digest[0] == "0" else "0") + digest[1:]


@pytest.mark.parametrize("entry", ["own", *FILES])
def test_manifest_damage_that_stays_valid_json_is_named(
    entry: str, base_run: Path, tmp_path: Path
) -> None:
    # Every byte-level damage above breaks the manifest's JSON; this one keeps it valid:
    # one hex digit of a recorded SHA-256 (the manifest's own digest, or a file's).
    run = copy_run(base_run, tmp_path)
    newest = run / "checkpoints" / "step-0000002"
    manifest = json.loads((newest / MANIFEST).read_text())
    record = manifest if entry == "own" else manifest["files"][entry]
    record["sha256"] = _flip_hex_digit(record["sha256"])
    (newest / MANIFEST).write_text(json.dumps(manifest, indent=2))
    # The manifest no longer matches its own digest: it is named, not the file it lists
    # (whose bytes are intact).
    damaged = f"{newest / MANIFEST} is damaged"
    with pytest.raises(CheckpointError, match=damaged.replace(".", r"\.")):
        verify_checkpoint(newest)
    ckpt = find_checkpoint(run)
    assert ckpt is not None
    assert ckpt.step == 1
    assert ckpt.skipped == (f"step-0000002: checkpoint {newest} does not verify: {damaged}",)


@pytest.mark.parametrize("name", CKPT_FILES)
def test_resume_skips_a_damaged_checkpoint(
    name: str,
    base_run: Path,
    data_file: str,
    reference: dict[int, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = copy_run(base_run, tmp_path)
    damage(run / "checkpoints" / "step-0000002" / name, "flip-middle")
    (run / "log.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # torn line
    train(None, data_file, run, resume=True, stop_at=2, progress=False)
    err = capsys.readouterr().err
    assert (
        f"skipped checkpoint step-0000002: checkpoint {run / 'checkpoints' / 'step-0000002'}" in err
    )
    assert name in err
    assert "using checkpoint" in err
    assert log_steps(run) == [1, 2]  # cut back to step 1, torn line dropped, step 2 again
    assert verified(run) == {1: reference[1], 2: reference[2]}  # the damaged one replaced
    finish_and_compare(run, data_file, reference)


def test_garbage_in_optimizer_state_resumes_from_the_good_checkpoint(
    base_run: Path, data_file: str, reference: dict[int, str], tmp_path: Path
) -> None:
    # The report: 4 KiB of garbage in state.pt used to resume, train to NaN and
    # delete the only good checkpoint.
    run = copy_run(base_run, tmp_path)
    state = run / "checkpoints" / "step-0000002" / "state.pt"
    data = bytearray(state.read_bytes())
    data[1000:5096] = random.Random(KILL_SEED).randbytes(4096)
    state.write_bytes(bytes(data))
    ckpt = find_checkpoint(run)
    assert ckpt is not None
    assert ckpt.step == 1
    finish_and_compare(run, data_file, reference)


def test_no_checkpoint_verifies_names_every_file(
    base_run: Path, data_file: str, tmp_path: Path
) -> None:
    run = copy_run(base_run, tmp_path)
    damage(run / "checkpoints" / "step-0000001" / "state.pt", "truncate-half")
    damage(run / "checkpoints" / "step-0000002" / "model.safetensors", "flip-middle")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies") as info:
        train(None, data_file, run, resume=True, progress=False)
    assert "step-0000001/state.pt is truncated" in str(info.value)
    assert "step-0000002/model.safetensors is damaged" in str(info.value)
    with pytest.raises(UsageError, match="already holds a run"):  # not deleted by a new run
        train(micro(), data_file, run, progress=False)
    assert main(["eval", str(run), "--data", data_file]) == 2


def test_keep_checkpoints(data_file: str, tmp_path: Path) -> None:
    train(micro(keep_checkpoints=3), data_file, tmp_path / "three", progress=False)
    assert sorted(verified(tmp_path / "three")) == [6, 7, 8]
    train(micro(keep_checkpoints=1), data_file, tmp_path / "one", progress=False)
    assert sorted(verified(tmp_path / "one")) == [8]
    pointer = json.loads((tmp_path / "one" / "checkpoint.json").read_text())
    assert pointer == {"step": 8, "path": "checkpoints/step-0000008"}


# --- signals ------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_then_resume_is_exact(
    signum: int,
    data_file: str,
    reference: dict[int, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_batch_at = train_module.batch_at

    def batch_at_with_signal(tokens, step, *args):  # type: ignore[no-untyped-def]
        if step == 4:  # the signal arrives while step 4 (the fifth) is running
            os.kill(os.getpid(), signum)
        return real_batch_at(tokens, step, *args)

    monkeypatch.setattr(train_module, "batch_at", batch_at_with_signal)
    run = tmp_path / "run"
    with pytest.raises(Interrupted) as info:
        train(micro(ckpt_every=0), data_file, run, progress=False)
    assert info.value.signum == signum
    assert verified(run) == {5: reference[5]}  # the running step finished, then was saved
    monkeypatch.setattr(train_module, "batch_at", real_batch_at)
    finish_and_compare(run, data_file, reference)


def test_a_second_signal_stops_at_once_without_saving(
    base_run: Path, data_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_batch_at = train_module.batch_at

    def batch_at_with_two_signals(tokens, step, *args):  # type: ignore[no-untyped-def]
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # raises here, mid-step
        return real_batch_at(tokens, step, *args)

    monkeypatch.setattr(train_module, "batch_at", batch_at_with_two_signals)
    run = copy_run(base_run, tmp_path)
    with pytest.raises(Interrupted):
        train(None, data_file, run, resume=True, progress=False)
    assert sorted(verified(run)) == [3, 4]  # saved every step up to 4, nothing after
    assert stale(run) == []


def test_sigterm_from_outside_exits_143_with_a_checkpoint(data_file: str, tmp_path: Path) -> None:
    # The `moeblocks train` command in a forked process, sent SIGTERM by this one once
    # its handlers are installed (the child says so through a pipe) and a moment later.
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--data", data_file, "--steps", "400", "--quiet"]
    ready_r, ready_w = os.pipe()

    class SaysReady(train_module.StopSignals):  # type: ignore[name-defined,misc]
        def __enter__(self):  # type: ignore[no-untyped-def]
            entered = super().__enter__()
            os.write(ready_w, b"!")
            return entered

    def child() -> None:
        train_module.StopSignals = SaysReady  # type: ignore[misc]
        os._exit(main(args))

    pid = in_child(child)
    os.close(ready_w)
    ready, _, _ = select.select([ready_r], [], [], CHILD_TIMEOUT_S)
    assert ready, "the training loop never started"
    os.close(ready_r)
    time.sleep(0.2)  # somewhere in the first steps
    os.kill(pid, signal.SIGTERM)
    assert os.waitstatus_to_exitcode(wait(pid)) == 128 + signal.SIGTERM
    ckpt = find_checkpoint(run)
    assert ckpt is not None
    assert 0 < ckpt.step < 400


# --- non-finite loss and gradient ------------------------------------------------------


class _InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (the loss stays finite)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        return grad * float("inf")


def poisoned_model(loss_steps: set[int], grad_steps: set[int] = frozenset()) -> type:  # type: ignore[assignment]
    """An SRATransformer whose training forward is poisoned at the given 0-based steps."""

    class Poisoned(SRATransformer):
        def set_step(self, step: int) -> None:
            super().set_step(step)
            self.at = step

        def forward(self, idx, k=None, mask=None):  # type: ignore[no-untyped-def]
            out = super().forward(idx, k, mask)
            at = getattr(self, "at", None) if self.training else None
            if at in loss_steps:
                return dataclasses.replace(out, logits=out.logits * float("nan"))
            if at in grad_steps:
                return dataclasses.replace(out, logits=_InfGrad.apply(out.logits))
            return out

    return Poisoned


def test_non_finite_steps_are_skipped_and_logged(
    data_file: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(train_module, "SRATransformer", poisoned_model({3}, {5}))
    run = tmp_path / "run"
    train(micro(ckpt_every=0), data_file, run, progress=False)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped"] for r in records if "skipped" in r}
    assert sorted(skipped) == [4, 6]
    assert skipped[4].startswith("non-finite loss nan")
    assert skipped[6].startswith("non-finite gradient norm")  # the loss was finite
    assert "step 4: skipped, non-finite loss nan" in capsys.readouterr().err
    state = torch.load(run / "checkpoints" / "step-0000008" / "state.pt", weights_only=True)
    assert all(s["step"] == STEPS - 2 for s in state["optimizer"]["state"].values())
    model, _, _ = load_run(run, data=data_file)
    assert all(p.isfinite().all() for p in model.parameters())


def test_divergence_stops_and_keeps_the_good_checkpoints(
    base_run: Path,
    data_file: str,
    reference: dict[int, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = copy_run(base_run, tmp_path)
    monkeypatch.setattr(train_module, "SRATransformer", poisoned_model(set(range(4, STEPS))))
    with pytest.raises(
        DivergedError, match=r"steps 5-7 in a row had a non-finite loss nan"
    ) as info:
        train(None, data_file, run, resume=True, progress=False)  # saves every step
    assert "the newest checkpoint, step 4, is kept" in str(info.value)
    good = {3: reference[3], 4: reference[4]}
    assert verified(run) == good  # steps 3 and 4 trained well; nothing saved after
    assert log_steps(run)[-3:] == [5, 6, 7]
    # The CLI: status 3, the checkpoints untouched again.
    assert main(["train", "--out", str(run), "--resume", "--data", data_file, "--quiet"]) == 3
    assert verified(run) == good


def test_non_finite_weights_are_not_saved(
    base_run: Path, data_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A finite loss and gradient whose update still breaks the weights.
    real = train_module.build_optimizer

    def breaking_optimizer(model, config):  # type: ignore[no-untyped-def]
        opt = real(model, config)
        step, calls = opt.step, []

        def broken_step(*args, **kwargs):  # type: ignore[no-untyped-def]
            step(*args, **kwargs)
            calls.append(1)
            if len(calls) == 2:  # resumed at 2: the second update is step 4
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("inf")

        opt.step = broken_step
        return opt

    monkeypatch.setattr(train_module, "build_optimizer", breaking_optimizer)
    run = copy_run(base_run, tmp_path)
    with pytest.raises(DivergedError, match="weights after step 4 are not finite"):
        train(None, data_file, run, resume=True, progress=False)
    assert sorted(verified(run)) == [2, 3]


# --- run folder -----------------------------------------------------------------------


def refuse_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any work past the argument checks fail loudly."""

    def no(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("work started before the path check")

    monkeypatch.setattr(train_module, "load_corpus", no)


def test_out_path_problems_are_clear_errors_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse_work(monkeypatch)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        train(micro(), "synthetic", a_file, progress=False)
    with pytest.raises(UsageError, match=r"cannot be created: .* is a file"):
        train(micro(), "synthetic", a_file / "run", progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "log.jsonl").write_text("someone else's\n")
    for overwrite in (False, True):
        with pytest.raises(UsageError, match="is not empty and is not a moeblocks run folder"):
            train(micro(), "synthetic", foreign, progress=False, overwrite=overwrite)
    assert (foreign / "log.jsonl").read_text() == "someone else's\n"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() == 0:  # root writes anywhere: pretend the permission bits hold
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, m: Path(p) != locked and real_access(p, m))
        with pytest.raises(UsageError, match="is not writable"):
            train(micro(), "synthetic", locked, progress=False)
        with pytest.raises(UsageError, match=r"cannot be created: .* is not writable"):
            train(micro(), "synthetic", locked / "run", progress=False)
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_cli_out_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["train", "--out", str(tmp_path / "file"), "--data", "synthetic", "--quiet"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_fresh_run_in_a_run_folder_starts_a_new_log(
    data_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The report: a fresh run appended to the old log (steps 10, 20, 10, 12).
    run = tmp_path / "run"
    real_batch_at = train_module.batch_at

    def killed_at_step_5(tokens, step, *args):  # type: ignore[no-untyped-def]
        if step == 5:
            raise SystemExit("killed before the first checkpoint")
        return real_batch_at(tokens, step, *args)

    monkeypatch.setattr(train_module, "batch_at", killed_at_step_5)
    with pytest.raises(SystemExit):
        train(micro(ckpt_every=0, eval_every=2), data_file, run, progress=False)
    assert log_steps(run) == [2, 4]
    assert checkpoint_dirs(run) == []
    monkeypatch.setattr(train_module, "batch_at", real_batch_at)
    train(micro(ckpt_every=0, eval_every=3), data_file, run, progress=False)
    assert log_steps(run) == [3, 6, 8]


def test_stale_temporaries_are_removed_on_start(
    base_run: Path, data_file: str, reference: dict[int, str], tmp_path: Path
) -> None:
    run = copy_run(base_run, tmp_path)
    for name in (".tmp-step-0000003-abc", ".del-step-0000000"):
        (run / "checkpoints" / name).mkdir()
        (run / "checkpoints" / name / "model.safetensors").write_bytes(b"half")
    (run / ".log.jsonl.x1y2.tmp").write_text("half")
    assert len(stale(run)) == 3
    finish_and_compare(run, data_file, reference)  # asserts no leftovers


def test_a_run_folder_in_use_is_refused(base_run: Path, data_file: str, tmp_path: Path) -> None:
    run = copy_run(base_run, tmp_path)
    with open(run / MARKER, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # another trainer
        with pytest.raises(UsageError, match="in use by another training process"):
            train(None, data_file, run, resume=True, progress=False)
    assert sorted(verified(run)) == [1, 2]


# --- data -----------------------------------------------------------------------------


def test_undecodable_data_names_file_and_offset(tmp_path: Path) -> None:
    text = synthetic_text(300, seed=3)
    latin = tmp_path / "latin.txt"
    latin.write_bytes((text[:500] + "café " + text[500:]).encode("latin-1"))
    with pytest.raises(UsageError, match=rf"{latin} is not valid utf-8 at byte 503 \(e9"):
        load_corpus(str(latin))
    corpus = load_corpus(str(latin), encoding="latin-1")
    assert "café" in corpus.train
    assert corpus.encoding == "iso8859-1"
    binary = tmp_path / "data.bin"
    binary.write_bytes(text[:100].encode() + b"\0\x01\x02" + text[100:].encode())
    with pytest.raises(UsageError, match=rf"{binary} has a NUL byte at byte 100"):
        load_corpus(str(binary))
    with pytest.raises(UsageError, match="not a known text encoding"):
        load_corpus(str(latin), encoding="klingon")


def test_encoding_is_recorded_and_reused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    data = run.parent / "latin.txt"
    data.write_bytes(("é " + synthetic_text(600, seed=7)).encode("latin-1"))
    train(micro(steps=2), str(data), run, encoding="latin-1", progress=False)
    train(micro(steps=3), str(data), run, resume=True, progress=False)  # no --encoding again
    _, _, ckpt = load_run(run, data=str(data))
    assert ckpt.encoding == "iso8859-1"
    assert run_corpus(ckpt).train.startswith("é ")


def test_data_paths_are_absolute_and_checked_by_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here, there = tmp_path / "here", tmp_path / "there"
    for folder, seed in ((here, 7), (there, 8)):
        folder.mkdir()
        (folder / "corpus.txt").write_text(synthetic_text(600, seed=seed), encoding="utf-8")
    monkeypatch.chdir(here)
    train(micro(steps=2), "corpus.txt", tmp_path / "run", progress=False)  # relative --data
    monkeypatch.chdir(there)  # another folder, another file of the same name
    ckpt = find_checkpoint(tmp_path / "run")
    assert ckpt is not None
    assert ckpt.data == str(here / "corpus.txt")
    with pytest.raises(UsageError, match=r"is not the text checkpoint .* was trained on"):
        run_corpus(load_run(tmp_path / "run", data="corpus.txt")[2])
    with pytest.raises(UsageError, match="is not the text"):
        train(None, "corpus.txt", tmp_path / "run", resume=True, progress=False)
    _, _, ckpt = load_run(tmp_path / "run", data=str(here / "corpus.txt"))
    assert run_corpus(ckpt).name == str(here / "corpus.txt")
    # The data moved: any path with the same text is accepted, and recorded.
    moved = there / "moved.txt"
    shutil.copy(here / "corpus.txt", moved)
    train(micro(steps=3), str(moved), tmp_path / "run", resume=True, progress=False)
    assert find_checkpoint(tmp_path / "run").data == str(moved)  # type: ignore[union-attr]


def test_data_inside_the_run_folder_needs_no_data_argument(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "corpus.txt").write_text(synthetic_text(600, seed=7), encoding="utf-8")
    (run / MARKER).write_text("{}")  # corpus.txt alone would make it a foreign folder
    train(micro(steps=2), str(run / "corpus.txt"), run, progress=False)
    _, _, ckpt = load_run(run)
    assert run_corpus(ckpt).name == str(run / "corpus.txt")


def remanifest(ckpt_dir: Path) -> None:
    """Rewrite a checkpoint's manifest to match its files, as a forger would."""
    from moeblocks.sra.checkpoint import _digest

    manifest = json.loads((ckpt_dir / MANIFEST).read_text())
    for name in FILES:
        manifest["files"][name] = {
            "bytes": (ckpt_dir / name).stat().st_size,
            "sha256": sha(ckpt_dir / name),
        }
    manifest["sha256"] = _digest(manifest["files"])
    (ckpt_dir / MANIFEST).write_text(json.dumps(manifest))


def test_a_checkpoint_cannot_point_outside_its_run(
    base_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The report: a config.json naming any local file as data, printed by inspect.
    run = copy_run(base_run, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("the password is swordfish\n" * 200)
    newest = run / "checkpoints" / "step-0000002"
    meta = json.loads((newest / "config.json").read_text())
    meta["data"] = str(secret)
    meta["data_sha256"] = load_corpus(str(secret)).fingerprint
    (newest / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"config\.json is (damaged|truncated|too long)"):
        verify_checkpoint(newest)  # edited without its manifest: caught there
    remanifest(newest)  # a consistent forgery: caught by the path rule
    with pytest.raises(UsageError, match=f"outside {run}; .* pass --data {secret}"):
        load_run(run)
    assert main(["inspect", str(run), "--no-k-sweep", "--max-tokens", "64"]) == 2
    err = capsys.readouterr()
    assert "swordfish" not in err.out + err.err
    assert "outside" in err.err


def test_a_tokenizer_from_another_run_is_refused(
    base_run: Path, data_file: str, tmp_path: Path
) -> None:
    from moeblocks.sra.tokenizer import train_tokenizer

    run = copy_run(base_run, tmp_path)
    newest = run / "checkpoints" / "step-0000002"
    other = train_tokenizer(synthetic_text(300, seed=99) + "ünïcödé", 300)
    (newest / "tokenizer.json").write_text(other.to_str())
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is (damaged|truncated|too long)"):
        verify_checkpoint(newest)
    remanifest(newest)
    with pytest.raises(UsageError, match="is not the tokeniser this run was trained with"):
        train(None, data_file, run, resume=True, progress=False)
    with pytest.raises(UsageError, match="is not the tokeniser this run was trained with"):
        load_run(newest, data=data_file)


def test_the_docs_table_names_real_tests() -> None:
    # Each row of "What survives what" (docs/sra-faults.md) is backed by a named test.
    import re

    root = Path(__file__).parents[1]
    page = (root / "docs" / "sra-faults.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(test_\w+)`", page))
    assert len(named) >= 15
    tests = "".join(
        (root / "tests" / f).read_text()
        for f in (
            "test_sra_faults.py",
            "test_sra_train.py",
            "test_multirank_faults.py",
            "test_bad_inputs.py",
        )
    )
    assert [n for n in sorted(named) if f"def {n}(" not in tests] == []
