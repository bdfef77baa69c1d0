"""`moeblocks train` under torchrun with expert parallelism matches the 1-rank run.

Legend: W ranks, B global batch, S sequence length.

Runs of the tiny preset for 3 steps on the synthetic corpus: one process in this test,
and 2 ranks launched with ``python -m torch.distributed.run`` on loopback
(``--expert-parallel 2``: each rank holds half the experts and trains on half of the
same batch), once with FSDP2 (the default) and once with ``--parallel ddp``. Their saved
weights, optimizer moments and logged loss are compared, then the 2-rank (sharded, DCP)
checkpoint is resumed on one process (world-size-free checkpoints). The error paths are
checked in process, before any process group exists.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeblocks.cli import main
from moeblocks.sra.checkpoint import find_checkpoint, is_sharded, load_state, load_weights
from moeblocks.sra.model import SRATransformer
from moeblocks.sra.train import build_optimizer

# Tiny models on one intra-op thread: see the fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
LAUNCH_TIMEOUT_S = 600  # a hang guard, not a speed test: a busy 2-core machine runs 5-10x slower
TRAIN = ["train", "--preset", "tiny", "--data", "synthetic", "--quiet"]

# Both runs see the same B·S tokens per step and the experts run the same rows in the
# same order; only float32 sums are split differently (each rank's cross-entropy mean,
# then an all-reduce; router statistics per rank, then summed), ~1e-7 relative per step.
# AdamW divides by sqrt(v), which magnifies that rounding for entries whose gradient is
# near zero, so the weights are compared as a whole: the difference relative to the
# 3-step update (measured ~1e-5). A wrong batch slice or a missed all-reduce gives O(1).
WEIGHT_TOL = 1e-3
# The first moment is proportional to the gradient (Adam's update is not: it would hide
# a gradient scaled by W), measured ~5e-5 relative.
MOMENT_TOL = 1e-3
# The logged global mean cross-entropy, relative. FSDP2 reduces gradients in another
# order than one process sums them (reduce-scatter), so the weights differ by ~1e-7
# relative after a step; a token whose top-k scores nearly tie may then pick another
# expert (measured: 1 of the 4096 routed slots of step 3), which moves the mean loss by
# ~1e-5. A wrong slice or a missed reduction moves it by far more than 1e-4.
LOSS_TOL = 1e-4


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], nproc: int, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        "-m", "moeblocks.cli", *args,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Rank 0 alone reports the result.
    assert proc.stdout.count("validation perplexity") == 1, proc.stdout


@pytest.fixture(scope="module")
def all_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ep-train")
    out = {name: root / name for name in ("one", "fsdp", "ddp")}
    assert main([*TRAIN, "--out", str(out["one"]), "--steps", str(STEPS)]) == 0
    for engine in ("fsdp", "ddp"):
        args = ["--steps", str(STEPS), "--expert-parallel", "2", "--parallel", engine]
        _torchrun([*TRAIN, "--out", str(out[engine]), *args], 2, root)
    return out


@pytest.fixture(scope="module")
def runs(all_runs: dict[str, Path]) -> tuple[Path, Path]:
    return all_runs["one"], all_runs["fsdp"]


def _checkpoint(run: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and ``state.pt`` (its optimizer state by parameter index) of either form."""
    ckpt = find_checkpoint(run)
    assert ckpt is not None
    assert ckpt.step == STEPS
    state = load_state(ckpt)
    torch.manual_seed(1)
    model = SRATransformer(ckpt.config)
    optimizer = build_optimizer(model, ckpt.config)
    if is_sharded(ckpt):  # read back from the DCP shards on one process
        from moeblocks.distributed import load_sharded

        load_sharded(ckpt.path / "dcp", model, optimizer)
        state["optimizer"] = optimizer.state_dict()
    else:
        load_weights(model, ckpt, ckpt.config)
    return model.state_dict(), state


def _rel(diffs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    num = sum(d.double().square().sum() for d in diffs)
    den = sum(r.double().square().sum() for r in refs)
    return float((num / den).sqrt())


@pytest.mark.parametrize("engine", ["fsdp", "ddp"])
def test_two_ranks_match_one(all_runs: dict[str, Path], engine: str) -> None:
    one, two = all_runs["one"], all_runs[engine]
    (w1, s1), (w2, s2) = _checkpoint(one), _checkpoint(two)
    assert w1.keys() == w2.keys()  # full (gathered) weights, keyed like one process's
    assert all(w1[k].shape == w2[k].shape for k in w1)
    config = find_checkpoint(one).config  # type: ignore[union-attr]
    torch.manual_seed(config.seed)
    w0 = SRATransformer(config).state_dict()
    floats = [k for k in w1 if w1[k].is_floating_point()]
    rel = _rel([w2[k] - w1[k] for k in floats], [w1[k] - w0[k] for k in floats])
    assert rel <= WEIGHT_TOL, f"weights differ by {rel:.3g} of the update"

    assert s2["world_size"] == 2
    assert len(s2["rng_per_rank"]) == 2  # each rank's RNG, for a resume on 2 ranks
    assert is_sharded(find_checkpoint(two))  # type: ignore[arg-type]
    m1, m2 = s1["optimizer"]["state"], s2["optimizer"]["state"]
    assert m1.keys() == m2.keys()
    assert all(m1[i]["exp_avg"].shape == m2[i]["exp_avg"].shape for i in m1)  # gathered
    rel = _rel([m2[i]["exp_avg"] - m1[i]["exp_avg"] for i in m1], [m1[i]["exp_avg"] for i in m1])
    assert rel <= MOMENT_TOL, f"first moments differ by {rel:.3g}"

    log1, log2 = (
        [json.loads(x) for x in (r / "log.jsonl").read_text().splitlines()] for r in (one, two)
    )
    assert [r["step"] for r in log1] == [r["step"] for r in log2] == [STEPS]
    for key in ("loss", "aux", "val_loss"):
        assert log2[0][key] == pytest.approx(log1[0][key], rel=LOSS_TOL), key
    assert (one / "tokenizer.json").read_text() == (two / "tokenizer.json").read_text()


def _checkpoint_at(run: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = find_checkpoint(run)
    assert ckpt is not None
    assert ckpt.step == step
    model = SRATransformer(ckpt.config)
    load_weights(model, ckpt, ckpt.config)
    return model.state_dict()


def test_two_rank_checkpoint_resumes_on_one(runs: tuple[Path, Path], tmp_path: Path) -> None:
    # Resume both runs for one more step on one process: the 2-rank run's gathered
    # weights and optimizer state load as they are, so the two stay together.
    resumed = []
    for run in runs:
        copy = tmp_path / run.name
        shutil.copytree(run, copy)
        args = ["train", "--out", str(copy), "--resume", "--steps", str(STEPS + 1), "--quiet"]
        assert main(args) == 0
        ckpt = find_checkpoint(copy)
        assert ckpt is not None
        resumed.append(_checkpoint_at(copy, STEPS + 1))
    w1, w2 = resumed
    base, _ = _checkpoint(runs[0])
    floats = [k for k in w1 if w1[k].is_floating_point()]
    rel = _rel([w2[k] - w1[k] for k in floats], [w1[k] - base[k] for k in floats])
    # Measured against the one resumed step's update, so a little looser than above.
    assert rel <= 10 * WEIGHT_TOL, f"resumed weights differ by {rel:.3g} of the update"


ONE, TWO = {"RANK": "0", "WORLD_SIZE": "1"}, ["--expert-parallel", "2"]


@pytest.mark.parametrize(
    ("env", "extra", "message"),
    [
        ({}, TWO, "launch with torchrun --nproc-per-node 2"),
        ({**ONE, "WORLD_SIZE": "3"}, TWO, "divide the torchrun world size 3"),
        ({**ONE, "WORLD_SIZE": "64"}, ["--expert-parallel", "64"], "the number of experts 32"),
        ({**ONE, "WORLD_SIZE": "32"}, TWO, "batch size 16 must be divisible by the world size"),
        ({**ONE, "WORLD_SIZE": "2"}, ["--ffn", "dense"], "needs an MoE model"),
        ({}, ["--expert-parallel", "0"], "must be an int >= 1"),
    ],
)
def test_errors_exit_2(
    env: dict[str, str],
    extra: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    assert main([*TRAIN, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("moeblocks: error: ")
    assert message in err
    assert not out.exists()  # checked before anything is written
