"""The `moeblocks` command line: train / eval / demo, and its error paths (exit code 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

import moeblocks
from moeblocks.cli import main
from moeblocks.sra.data import synthetic_text

# Tiny models on one intra-op thread: see the fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(synthetic_text(1500, seed=5), encoding="utf-8")
    return str(path)


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("moeblocks: error: ")
    return err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"moeblocks {moeblocks.__version__}"


def test_train_eval_resume(tmp_path: Path, corpus: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = str(tmp_path / "run")
    assert main(["train", "--data", corpus, "--out", run, "--steps", "2", "--quiet"]) == 0
    assert "step 2: validation perplexity" in capsys.readouterr().out
    # The data lies outside the run folder: a path read from a checkpoint is not followed.
    assert main(["eval", run]) == 2
    assert f"pass --data {corpus}" in _one_line_error(capsys)
    assert main(["eval", run, "--data", corpus]) == 0
    out = capsys.readouterr().out
    assert "dead experts: layer 0:" in out
    assert out.count("\n") >= 8  # header lines + k = 1..4 (tiny trains with k up to 2)

    # Resume extends the run; the saved config is reused, the data confirmed.
    args = ["train", "--out", run, "--resume", "--data", corpus, "--steps", "3", "--quiet"]
    assert main(args) == 0
    assert "step 3:" in capsys.readouterr().out

    assert main(["train", "--out", run, "--resume", "--preset", "small", "--quiet"]) == 2
    assert "different config" in _one_line_error(capsys)
    assert main(["train", "--out", run, "--data", corpus, "--quiet"]) == 2
    assert "already holds a run" in _one_line_error(capsys)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-0000002", "step-0000003"]  # the last two (keep_checkpoints)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no such file or folder"),
        ("empty", "is empty"),
        ("short", "fewer than one sequence"),
        ("preset", "unknown preset 'huge'"),
        ("folder", "needs a train and a valid file"),
    ],
)
def test_bad_input_exits_2(
    tmp_path: Path, case: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data.txt"
    if case == "empty":
        data.write_text("  \n", encoding="utf-8")
    elif case == "short":
        data.write_text("a few words\n" * 5, encoding="utf-8")
    elif case == "folder":
        data = tmp_path / "wiki"
        data.mkdir()
        (data / "wiki.train.raw").write_text("text\n", encoding="utf-8")
    args = ["train", "--out", str(tmp_path / "run"), "--data", str(data), "--quiet"]
    if case == "preset":
        args += ["--preset", "huge"]
    assert main(args) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()  # nothing written, no partial checkpoint


def test_eval_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert main(["train", "--out", str(tmp_path), "--resume"]) == 2
    assert "holds no checkpoint" in _one_line_error(capsys)


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "3", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    for expected in ("validation: loss", "dead experts", "k-sweep", "tokens routed", "report:"):
        assert expected in printed
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "![loss curve](loss.png)" in report
    assert "experts.png" in report
    for png in ("loss.png", "experts.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_train_flags_encoding_keep_and_skips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "latin.txt"
    data.write_bytes(("café\n" + synthetic_text(1500, seed=5)).encode("latin-1"))
    run = str(tmp_path / "run")
    args = ["train", "--data", str(data), "--out", run, "--steps", "2", "--quiet"]
    assert main(args) == 2
    assert f"{data} is not valid utf-8 at byte 3" in _one_line_error(capsys)
    extra = ["--encoding", "latin-1", "--keep-checkpoints", "1", "--max-skipped-steps", "5"]
    assert main([*args, *extra]) == 0
    assert main(["eval", run, "--data", str(data), "--max-tokens", "256"]) == 0  # its encoding
    capsys.readouterr()
    from moeblocks.sra.checkpoint import find_checkpoint

    ckpt = find_checkpoint(Path(run))
    assert ckpt is not None
    assert (ckpt.encoding, ckpt.config.keep_checkpoints, ckpt.config.max_skipped_steps) == (
        "iso8859-1",
        1,
        5,
    )
