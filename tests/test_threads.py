"""Thread-count logic of moeblocks.runtime.threads: affinity, cgroup quotas, env overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moeblocks.cli import _parser
from moeblocks.runtime import threads as th


def _v2(root: Path, text: str) -> Path:
    (root / "cpu.max").write_text(text)
    return root


def _v1(root: Path, quota: str, period: str, sub: str = "cpu") -> Path:
    (root / sub).mkdir()
    (root / sub / "cpu.cfs_quota_us").write_text(quota)
    (root / sub / "cpu.cfs_period_us").write_text(period)
    return root


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    assert th.cgroup_cpu_limit(_v2(tmp_path, "150000 100000\n")) == 1.5


def test_cgroup_v2_no_quota(tmp_path: Path) -> None:
    assert th.cgroup_cpu_limit(_v2(tmp_path, "max 100000\n")) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    assert th.cgroup_cpu_limit(_v1(tmp_path, "200000\n", "100000\n")) == 2.0


def test_cgroup_v1_combined_controller_folder(tmp_path: Path) -> None:
    assert th.cgroup_cpu_limit(_v1(tmp_path, "50000", "100000", sub="cpu,cpuacct")) == 0.5


def test_cgroup_v1_unlimited(tmp_path: Path) -> None:
    assert th.cgroup_cpu_limit(_v1(tmp_path, "-1", "100000")) is None


@pytest.mark.parametrize("text", ["", "garbage", "12"])
def test_cgroup_unreadable_counts_as_no_quota(tmp_path: Path, text: str) -> None:
    assert th.cgroup_cpu_limit(_v2(tmp_path, text)) is None
    assert th.cgroup_cpu_limit(tmp_path / "missing") is None


def test_available_cpus_affinity_capped_by_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # never consulted when affinity exists
    assert th.available_cpus(tmp_path) == 4  # no cgroup files: affinity alone
    assert th.available_cpus(_v2(tmp_path, "150000 100000")) == 2  # 1.5 CPUs round up
    assert th.available_cpus(_v2(tmp_path, "800000 100000")) == 4  # quota above affinity
    assert th.available_cpus(_v2(tmp_path, "1000 100000")) == 1  # at least one


def _loadavg(path: Path, running: int) -> Path:
    path.write_text(f"0.50 0.40 0.30 {running}/123 4567\n")
    return path


def test_busy_cpus_counts_other_runnable_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(th, "own_running", lambda: 1)  # no OpenMP worker spinning now
    path = tmp_path / "loadavg"
    assert th.busy_cpus(3, 0.0, _loadavg(path, 1)) == 0  # only the reader runs
    assert th.busy_cpus(3, 0.0, _loadavg(path, 3)) == 2
    assert th.busy_cpus(3, 0.0, tmp_path / "missing") is None
    path.write_text("garbage")
    assert th.busy_cpus(3, 0.0, path) is None


def test_busy_cpus_reads_this_machine() -> None:
    busy = th.busy_cpus(2, 0.0)
    assert busy is None or busy >= 0


def test_default_threads_order(monkeypatch: pytest.MonkeyPatch) -> None:
    assert th.default_threads(None, {}, cpus=3, busy=0.0) == 3
    assert th.default_threads(None, {}, cpus=3, busy=1.4) == 2  # others keep ~1 CPU busy
    assert th.default_threads(None, {}, cpus=2, busy=2.0) == 1  # at least one
    assert th.default_threads(None, {}, cpus=2, busy=5.0) == 1
    env = {"OMP_NUM_THREADS": "5"}
    assert th.default_threads(None, env, cpus=3, busy=3.0) == 5  # the user's choice wins
    assert th.default_threads(None, {"OMP_NUM_THREADS": "4,2"}, cpus=3, busy=0.0) == 4
    assert th.default_threads(None, {"OMP_NUM_THREADS": "junk"}, cpus=3, busy=0.0) == 3
    assert th.default_threads(None, {"OMP_NUM_THREADS": "0"}, cpus=3, busy=0.0) == 3
    assert th.default_threads(2, env, cpus=3, busy=3.0) == 2  # --threads wins over all
    with pytest.raises(ValueError, match="positive"):
        th.default_threads(0, {})
    # Unmeasurable load counts as idle.
    monkeypatch.setattr(th, "busy_cpus", lambda: None)
    monkeypatch.setattr(th, "available_cpus", lambda: 4)
    assert th.default_threads(None, {}) == 4


def test_configure_threads_sets_torch_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert th.configure_threads(1) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cli_accepts_threads() -> None:
    parser = _parser()
    for argv in (["demo"], ["train", "--out", "x"], ["eval", "run"]):
        assert parser.parse_args([*argv, "--threads", "3"]).threads == 3
        assert parser.parse_args(argv).threads is None
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--threads", "0"])


def _tasks(root: Path, states: str) -> Path:
    for i, state in enumerate(states):
        (root / str(i)).mkdir(parents=True)
        (root / str(i) / "stat").write_text(f"{i} (python (main)) {state} 1 2 3\n")
    return root


def test_own_running_counts_runnable_threads(tmp_path: Path) -> None:
    assert th.own_running(_tasks(tmp_path / "a", "RSRS")) == 2  # ")" inside the name
    assert th.own_running(_tasks(tmp_path / "b", "SS")) == 1  # the caller runs, at least
    assert th.own_running(tmp_path / "missing") == 1
    assert th.own_running() >= 1  # this process


def test_busy_cpus_leaves_out_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(th, "own_running", lambda: 3)  # the reader + 2 spinning workers
    assert th.busy_cpus(3, 0.0, _loadavg(tmp_path / "loadavg", 4)) == 1


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_thread_tuner_follows_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    busy = [0.0]
    monkeypatch.setattr(th, "available_cpus", lambda: 2)
    monkeypatch.setattr(th, "busy_cpus", lambda samples, interval: busy[0])
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        clock = _Clock()
        tuner = th.ThreadTuner(every=3.0, clock=clock)
        busy[0] = 1.0  # another process starts
        assert tuner.step() is None  # not yet time to look
        clock.now = 3.0
        assert tuner.step() is None  # seen once: wait for a second look
        clock.now = 4.0
        assert tuner.step() is None  # not time yet
        clock.now = 6.0
        assert tuner.step() == 1
        assert torch.get_num_threads() == 1
        busy[0] = 0.0  # it ends; a blip back does not count
        clock.now = 9.0
        assert tuner.step() is None
        busy[0] = 1.0
        clock.now = 12.0
        assert tuner.step() is None
        assert torch.get_num_threads() == 1
        busy[0] = 0.0
        for t in (15.0, 18.0):
            clock.now = t
            changed = tuner.step()
        assert changed == 2
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a tuner never reads the environment
        clock.now = 21.0
        assert tuner.step() is None
    finally:
        torch.set_num_threads(old)
    with pytest.raises(ValueError, match="every"):
        th.ThreadTuner(every=0.0)
