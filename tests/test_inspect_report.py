"""`moeblocks inspect` on a tiny trained run: tables, report.md and valid PNG plots."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("tokenizers")

from moeblocks.inspect import plots
from moeblocks.inspect.cli import add_inspect_commands
from moeblocks.inspect.report import word_ids_from_pieces

# Tiny models on one intra-op thread: see the fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_word_ids_from_pieces():
    pieces = ["yes", "ter", "day", "Ġ,", "Ġthe", "Ġ", "r", "ed", "Ċ", "cat", "."]
    assert word_ids_from_pieces(pieces).tolist() == [0, 0, 0, -1, 1, -1, 2, 2, -1, 3, -1]


def test_each_plot_writes_a_png(tmp_path):
    util = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    paths = [
        plots.plot_utilisation(util, tmp_path / "u.png"),
        plots.plot_anchor_similarity([torch.eye(4), torch.eye(4)], tmp_path / "a.png"),
        plots.plot_class_heatmap(torch.rand(4, 3) * 2 - 1, ["x", "y", "z"], tmp_path / "c.png"),
        plots.plot_k_sweep([1, 2, 3], [30.0, 28.0, 28.5], 2, tmp_path / "k.png"),
        plots.plot_routing_map(torch.tensor([[0, 1, 2], [3, 3, 1]]), ["a", "Ġb", "c"],
                               tmp_path / "r.png", 4),
    ]  # fmt: skip
    assert all(is_png(p) for p in paths)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread) -> Path:
    from moeblocks.sra.config import preset
    from moeblocks.sra.train import train

    out = tmp_path_factory.mktemp("inspect") / "run"
    cfg = preset("tiny").replace(
        vocab_size=300, seq_len=32, d_model=32, n_layers=2, num_experts=8, d_expert=16,
        steps=30, batch_size=8, eval_every=0, ckpt_every=0, eval_tokens=256, warmup=5 / 30,
    )  # fmt: skip
    train(cfg, "synthetic", out, progress=False, overwrite=True)
    return out


def test_inspect_command_writes_report_with_pngs(tiny_run, capsys):
    parser = argparse.ArgumentParser(prog="moeblocks")
    add_inspect_commands(parser.add_subparsers(dest="command", required=True))
    text = "now , the red fox sees a dog ."
    args = parser.parse_args(["inspect", str(tiny_run), "--max-tokens", "512", "--text", text])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "overlap probe (synthetic, 16 items)" in printed
    assert "condition contrast (synthetic-swap, 6 'similar' vs 6 'dissimilar'" in printed
    assert "k-sweep:" in printed
    assert "purity" in printed
    assert "sentence trace" in printed
    assert "'now'" in printed
    out = tiny_run / "inspect"
    report = (out / "report.md").read_text()
    names = ["utilisation.png", "anchors.png", "classes_layer0.png", "classes_layer1.png",
             "k_sweep.png", "routing_map.png"]  # fmt: skip
    for name in names:
        assert is_png(out / name), name
        assert f"({name})" in report
