"""Faults of a 2-rank run (``torchrun``, gloo on CPU): kills, a damaged shard, SIGTERM, a hang.

Legend: W = 2 ranks.

Every run is the tiny preset on the synthetic corpus for 6 steps with a checkpoint every
2 (the DCP form: each rank writes its own shard file). Kills are placed at named points
inside the sharded save by ``MOEBLOCKS_FAULT`` (:func:`moeblocks.distributed.checkpoint.
fault_point`), at the second save (step 4), so the step-2 checkpoint is the one to
resume from; where a kill cuts a shard file, the fraction kept comes from a seeded
generator (``SEED``). The cases:

- ``kill -9`` of rank 1 in the middle of writing its shard file, and of rank 0 just
  before it writes DCP's ``.metadata`` (every shard written, nothing that loads): the
  other rank exits within 60 s, and a 2-rank resume ends with weights and optimizer
  state bitwise equal to the uninterrupted run's;
- one flipped byte in a shard file of the newest checkpoint: the resume names the file
  and continues from the older checkpoint;
- SIGTERM to the launcher: every rank finishes its step and saves (both shard files);
- a rank stuck inside the save: the other rank's collective fails after
  ``MOEBLOCKS_COLLECTIVE_TIMEOUT_S`` with a message naming rank 1, instead of hanging
  (and, on two bare gloo ranks, the message reads each rank's last mark).

The runs are launched from this process with ``python -m torch.distributed.run``; each
takes ~30-60 s on a busy 2-core machine, so they are marked slow (CI still runs them).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeblocks.cli import main
from moeblocks.sra.checkpoint import find_checkpoint, verify_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SEED = 31  # where a kill cuts a shard file
STEPS = 6
TRAIN = [
    "train", "--preset", "tiny", "--data", "synthetic", "--quiet", "--steps", str(STEPS),
    "--set", "ckpt_every=2", "--set", "eval_every=0", "--set", "vocab_size=260",
]  # fmt: skip
LAUNCH_TIMEOUT_S = 600  # a hang guard, not a speed test: a busy 2-core machine is slow
EXIT_WITHIN_S = 60  # the bound on how long a rank outlives a killed peer


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MOEBLOCKS_FAULT"):
        monkeypatch.delenv(name, raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """``torchrun --nproc-per-node 2 -m moeblocks.cli train ...`` on loopback."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "moeblocks.cli", *TRAIN, "--out", str(out), *args,
    ]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **env}
    return subprocess.Popen(
        cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, float]:
    """Wait for a launch: its exit code, output and the wall time it exited at."""
    try:
        log = proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, log, time.time()


def _run(out: Path, *args: str) -> None:
    rc, log, _ = _finish(_launch(out, *args))
    assert rc == 0, log[-3000:]


def _final_state(run: Path) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Step, weights and optimizer state of a run's newest checkpoint, read on one process."""
    from moeblocks.distributed import load_sharded
    from moeblocks.sra.model import SRATransformer
    from moeblocks.sra.train import build_optimizer

    ckpt = find_checkpoint(run)
    assert ckpt is not None
    model = SRATransformer(ckpt.config)
    optimizer = build_optimizer(model, ckpt.config)
    load_sharded(ckpt.path / "dcp", model, optimizer)
    return ckpt.step, model.state_dict(), optimizer.state_dict()["state"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("multirank") / "reference"
    _run(out)
    return out


def _cut() -> str:
    return f"{random.Random(SEED).uniform(0.1, 0.9):.3f}"


KILLS = {
    # rank 1, in its write of the step-4 shard file, which keeps a seeded fraction
    "rank 1 mid-shard": f"dcp-write@1#2:{_cut()}",
    # rank 0, every shard of step 4 written, before DCP's .metadata
    "rank 0 before metadata": "dcp-finish@0#2",
}


@pytest.mark.parametrize("kill", list(KILLS), ids=list(KILLS))
def test_kill_9_inside_the_sharded_save_then_resume_is_exact(
    kill: str, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    rc, log, exited = _finish(_launch(out, MOEBLOCKS_FAULT=KILLS[kill]))
    assert rc != 0, log[-3000:]
    assert "exitcode  : -9" in log, log[-3000:]  # the kill, not some other failure
    # The kill came right after the newest write into the unfinished shard folder.
    leftovers = list((out / "checkpoints").glob(".tmp-step-0000004-dcp-*/*"))
    assert leftovers, sorted(p.name for p in (out / "checkpoints").iterdir())
    killed_at = max(p.stat().st_mtime for p in leftovers)
    assert exited - killed_at < EXIT_WITHIN_S
    ckpt = find_checkpoint(out)
    assert ckpt is not None
    assert ckpt.step == 2
    _run(out, "--resume")
    (step, weights, moments), (ref_step, ref_weights, ref_moments) = (
        _final_state(out),
        _final_state(reference),
    )
    assert step == ref_step == STEPS
    # Same ranks, same batches, same order of every float op: bit for bit.
    for name, value in ref_weights.items():
        assert torch.equal(weights[name], value), name
    for index, entries in ref_moments.items():
        for key, value in entries.items():
            assert torch.equal(moments[index][key], value), (index, key)


def test_flipped_byte_in_a_shard_is_named_and_the_older_checkpoint_used(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shard = out / "checkpoints" / f"step-{STEPS:07d}" / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    at = random.Random(SEED).randrange(len(data))
    data[at] ^= 0x01
    shard.write_bytes(bytes(data))
    # The resume runs on one process: the checkpoints are world-size free, and which
    # checkpoint verifies is decided before any rank would load.
    assert main([*TRAIN, "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"step-{STEPS:07d}/dcp/__1_0.distcp is damaged" in err, err
    assert "(step 4)" in err, err
    ckpt = find_checkpoint(out)
    assert ckpt is not None
    assert ckpt.step == STEPS
    assert ckpt.skipped == ()  # the damaged one was replaced by the resumed run's


def test_sigterm_to_the_launcher_saves_on_every_rank(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _launch(out, "--steps", "200", "--set", "ckpt_every=3")
    deadline = time.time() + LAUNCH_TIMEOUT_S
    while not (out / "checkpoints" / "step-0000003").is_dir():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint at step 3"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    rc, log, exited = _finish(proc)
    assert rc != 0  # torchrun reports the signal it got
    assert exited - sent < EXIT_WITHIN_S
    ckpt = find_checkpoint(out)
    assert ckpt is not None
    assert ckpt.step > 3, log[-3000:]  # saved on the signal, not the periodic one
    verify_checkpoint(ckpt.path)
    shards = sorted(p.name for p in (ckpt.path / "dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    state = torch.load(ckpt.path / "state.pt", weights_only=True)
    assert len(state["rng_per_rank"]) == 2


def test_a_stuck_rank_is_named_after_the_collective_timeout(tmp_path: Path) -> None:
    out = tmp_path / "run"
    start = time.time()
    env = {"MOEBLOCKS_FAULT": "dcp-write@1:hang", "MOEBLOCKS_COLLECTIVE_TIMEOUT_S": "5"}
    rc, log, exited = _finish(_launch(out, **env))
    assert rc != 0
    assert "CollectiveTimeoutError: rank 0: a collective waited longer than 5 s" in log, log[-3000:]
    assert "for rank 1 (rank 1 last at 'the save of step 2'" in log, log[-3000:]
    assert exited - start < LAUNCH_TIMEOUT_S


def test_the_rank_behind_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two gloo ranks in fresh interpreters: rank 1 last marked step 3, rank 0 step 4;
    # rank 0's collective then waits for rank 1, which never joins it.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gloo import run_ranks  # tests/ is on the path of pytest, not of the ranks

    monkeypatch.setenv("MOEBLOCKS_COLLECTIVE_TIMEOUT_S", "2")
    code = """
import time
from moeblocks.distributed.comm import collective_timeout, mark, timeout_error
group = dist.new_group([0, 1], timeout=collective_timeout())
mark(f"step {4 - rank}", 2 * (4 - rank))
dist.barrier()  # both marks are in the store
if rank == 1:
    time.sleep(8)  # never joins rank 0's all-reduce
else:
    try:
        dist.all_reduce(torch.ones(1), group=group)
        message = "no timeout"
    except RuntimeError as err:
        named = timeout_error(err)
        message = "not a timeout: " + str(err) if named is None else str(named)
    open(sys.argv[1], "w").write(message)
"""
    out = run_ranks(code, tmp_path, timeout=LAUNCH_TIMEOUT_S)
    message = out[0].read_text()
    assert message == (
        "rank 0: a collective waited longer than 2 s (MOEBLOCKS_COLLECTIVE_TIMEOUT_S) for "
        "rank 1 (rank 1 last at 'step 3'; this rank at 'step 4')"
    ), message


def test_collective_timeout_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from moeblocks.distributed.comm import TIMEOUT_ENV, collective_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout().total_seconds() == 600
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert collective_timeout().total_seconds() == 2.5
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=rf"{TIMEOUT_ENV} must be a number of seconds > 0"):
            collective_timeout()


def test_fault_spec_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from moeblocks.distributed.checkpoint import FAULT_ENV, fault_point

    for bad in ("nowhere@0", "publish@x", "publish@0#2nd", "dcp-write@0:1.5", "publish@0:boom"):
        monkeypatch.setenv(FAULT_ENV, bad)
        with pytest.raises(ValueError, match=r"POINT@RANK\[#N\]\[:ACTION\]"):
            fault_point("publish")
    monkeypatch.setenv(FAULT_ENV, "publish@1")  # another rank: nothing happens here
    fault_point("publish")
