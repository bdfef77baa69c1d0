"""The `moeblocks` command line: train / eval / demo, config fields, outputs, error paths."""

from __future__ import annotations

import json
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
    assert main(["eval", run, "--data", corpus, "--quiet"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "dead experts: layer 0:" in out
    assert out.count("\n") >= 8  # header lines + k = 1..4 (tiny trains with k up to 2)
    assert captured.err == ""  # --quiet: no progress bar
    blob = json.loads((tmp_path / "run" / "reports" / "eval.json").read_text(encoding="utf-8"))
    assert f"over {blob['tokens']} tokens" in out
    assert blob["checkpoint"]["step"] == 2
    assert blob["perplexity"] > 1
    assert blob["k"] == 2  # tiny: k rises at a quarter of 2 steps
    assert [s["k"] for s in blob["k_sweep"]] == [1, 2, 3, 4]
    assert len(blob["dead_experts"]) == 2
    assert set(blob["dead_experts"][0]) == {"count", "fraction", "ids"}
    assert len(blob["expert_counts"][0]) == blob["config"]["num_experts"]
    assert blob["data"] == corpus

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
    reports = out / "reports"
    report = (reports / "demo.md").read_text(encoding="utf-8")
    pngs = ["training-curves.png", "training-utilisation.png", "training-dead.png",
            "training-entropy.png", "eval-utilisation.png", "eval-k-sweep.png"]  # fmt: skip
    for png in pngs:
        assert f"({png})" in report
        assert (reports / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((reports / "eval.json").read_text(encoding="utf-8"))["k_sweep"]


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
    assert main(["eval", run, "--data", str(data), "--max-tokens", "256", "--quiet"]) == 0
    capsys.readouterr()
    from moeblocks.sra.checkpoint import find_checkpoint

    ckpt = find_checkpoint(Path(run))
    assert ckpt is not None
    assert (ckpt.encoding, ckpt.config.keep_checkpoints, ckpt.config.max_skipped_steps) == (
        "iso8859-1",
        1,
        5,
    )


def _train_config(argv: list[str]):  # type: ignore[no-untyped-def]
    """The config `moeblocks train ARGV` would train, without training."""
    from moeblocks.cli import _parser
    from moeblocks.cli.config_args import run_config

    return run_config(_parser().parse_args(["train", "--out", "unused", *argv]))


def test_every_config_field_settable_with_precedence(tmp_path: Path) -> None:
    from moeblocks.sra.config import PRESETS

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"seq_len": 64, "lr": 0.01, "steps": 50, "seed": 3}))
    cfg = _train_config(["--preset", "small", "--config", str(cfg_file), "--set", "lr=2e-3",
                         "--set", "warmup=10/50", "--set", "expert_bias=false",
                         "--set", "balance=cv", "--steps", "40"])  # fmt: skip
    small = PRESETS["small"]
    assert cfg.d_model == small.d_model  # preset
    assert (cfg.seq_len, cfg.seed) == (64, 3)  # config file over the preset
    assert cfg.lr == 2e-3  # --set over the config file
    assert (cfg.warmup, cfg.expert_bias, cfg.balance) == (0.2, False, "cv")
    assert cfg.steps == 40  # a named flag over everything
    # A run's whole config (or an eval.json holding one under "config") is a config file.
    whole = tmp_path / "eval.json"
    whole.write_text(json.dumps({"config": PRESETS["small"].to_dict(), "tokens": 5}))
    assert _train_config(["--config", str(whole)]) == PRESETS["small"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "seqlen=64"], "unknown config field 'seqlen' (did you mean seq_len"),
        (["--set", "seq_len=1.5"], "--set seq_len=1.5: seq_len expects an integer, got '1.5'"),
        (
            ["--set", "ffn=moe"],
            "ffn expects one of cosine, linear, dense, mixtral, qwen2_moe, olmoe, "
            "deepseek_v3, gpt_oss, switch, llama4, got 'moe'",
        ),
        (["--set", "expert_bias=maybe"], "expert_bias expects true or false"),
        (["--set", "lr"], "--set expects key=value"),
        (["--set", "warmup=2"], "warmup"),  # parsed, then refused by SRAConfig
        (["--config", "CFG", '{"seq_len": "64"}'], "seq_len expects an integer, got '64'"),
        (["--config", "CFG", '{"n_layer": 2}'], "did you mean n_layers"),
        (["--config", "CFG", "[1, 2]"], "must hold a JSON object of config fields"),
        (["--config", "CFG", "{seq_len: 2}"], "is not valid JSON"),
    ],
)
def test_bad_config_fields_exit_2(
    tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[0] == "--config":
        path = tmp_path / "cfg.json"
        path.write_text(argv[2], encoding="utf-8")
        argv = ["--config", str(path)]
    assert main(["train", "--out", str(tmp_path / "run"), "--quiet", *argv]) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_one_line_file_suggests_only_real_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "one.txt"
    data.write_text("word " * 400 + "\n", encoding="utf-8")
    args = ["train", "--out", str(tmp_path / "run"), "--data", str(data), "--quiet"]
    assert main([*args, "--set", "vocab_size=300"]) == 2
    err = _one_line_error(capsys)
    assert "validation split has 0 tokens" in err
    assert "more lines" in err
    flags = [w for w in err.split() if w.startswith("--")]
    assert flags == ["--set"]  # the only flag it names exists
    assert "--set seq_len=N" in err


def test_help_describes_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ["demo", "train", "eval", "generate", "inspect", "experiment"]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "examples:" in text, command
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "{tiny,small,paper,paper-linear}" in text
    assert "seq_len=128" in text  # every field, with the tiny preset's value
    assert "warmup=" in text
    assert "one of cosine, linear, dense" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "RUN", "--max-tokens", "-5"],
        ["eval", "RUN", "--max-tokens", "0"],
        ["train", "--out", "x", "--steps", "0"],
        ["train", "--out", "x", "--preset", "huge"],
        ["inspect", "RUN", "--max-tokens", "-5"],
        ["demo", "--format", "jpg"],
    ],
)
def test_bad_flag_values_are_refused_by_the_parser(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error: argument" in capsys.readouterr().err


def test_shared_options_are_declared_once() -> None:
    import argparse

    from moeblocks.cli import _parser

    def commands(parser: argparse.ArgumentParser, path: str = "") -> dict:
        """Every (sub)command below ``parser`` by its path, e.g. "experiment routing-zoo"."""
        found = {}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, cmd in action.choices.items():
                    found[f"{path} {name}".strip()] = cmd
                    found |= commands(cmd, f"{path} {name}")
        return found

    for flag in ("--device", "--threads", "--max-tokens"):
        takers = {
            name: next(a for a in cmd._actions if flag in a.option_strings)
            for name, cmd in commands(_parser()).items()
            if any(flag in a.option_strings for a in cmd._actions)
        }
        assert len(takers) >= 3, (flag, sorted(takers))
        # One declaration: the same type and metavar wherever the option appears.
        assert len({(a.type, a.metavar) for a in takers.values()}) == 1, flag


def test_config_fields_carry_their_metadata() -> None:
    import dataclasses

    from moeblocks.sra.config import SRAConfig, field_help, fields_where

    for f in dataclasses.fields(SRAConfig):
        assert field_help(f.name), f.name  # every field says what it means
    resumable = fields_where("may_change_on_resume")
    assert resumable == {"steps", "keep_checkpoints", "max_skipped_steps"}
    training_only = fields_where("training_only")
    assert resumable <= training_only  # what a resume may change never shapes the weights
    assert not {"d_model", "num_experts", "vocab_size", "ffn"} & training_only
