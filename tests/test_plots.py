"""Plots of moeblocks.inspect.plots: every function writes PNG/SVG/PDF, NaN and 64 experts."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("matplotlib")

from moeblocks.inspect import plots

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "svg": b"<?xml", "pdf": b"%PDF"}


def written(path: Path) -> bool:
    fmt = path.suffix.lstrip(".")
    return path.is_file() and path.read_bytes()[: len(MAGIC[fmt])] == MAGIC[fmt]


def log_records(L: int = 2, E: int = 8, n: int = 6) -> list[dict]:
    """A log.jsonl as the trainer writes it: train records, an eval record, a skipped step."""
    g = torch.Generator().manual_seed(0)
    recs = []
    for i in range(1, n + 1):
        counts = torch.randint(0, 50, (L, E), generator=g)
        counts[0, 3] = 0  # one expert dead in every window
        recs.append({"step": 10 * i, "loss": 5.0 - 0.3 * i, "aux": 0.2, "lr": 1e-3 * i / n,
                     "k": 1 if i < 3 else 2, "tok_per_s": 1000, "expert_counts": counts.tolist(),
                     "router_entropy": [1.5 - 0.1 * i, 1.8 - 0.05 * i]})  # fmt: skip
    recs[2].update(val_loss=4.5, val_ppl=90.0, dead=[0.125, 0.0])
    recs.append({"step": 70, "skipped": "non-finite loss", "lr": 1e-3})
    return recs


def test_expert_colours_distinct_for_64_and_more() -> None:
    assert len(set(plots.expert_colours(64))) == 64
    assert len(set(plots.expert_colours(68))) == 68
    assert len(set(plots.expert_colours(256))) == 256


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_routing_plots_in_every_format(tmp_path: Path, fmt: str) -> None:
    util = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    experts = torch.tensor([[[0, 1], [1, 2], [3, 0]], [[3, 2], [3, 1], [1, 0]]])
    weights = torch.full((2, 3, 2), 0.5)
    paths = [
        plots.plot_utilisation(util, tmp_path / f"u.{fmt}", util * 0.9, (0.05, 0.4)),
        plots.plot_anchor_similarity([torch.eye(4), torch.eye(4)], tmp_path / f"a.{fmt}"),
        plots.plot_class_heatmap(torch.rand(4, 3) * 2 - 1, ["x", "y", "z"], tmp_path / f"c.{fmt}"),
        plots.plot_k_sweep([1, 2, 3], [30.0, 28.0, 28.5], 2, tmp_path / f"k.{fmt}", 512),
        plots.plot_routing_map(experts, weights, ["a", "Ġb", "c"], tmp_path / f"r.{fmt}", 4,
                               torch.tensor([0, 1, 1])),
    ]  # fmt: skip
    assert all(written(p) for p in paths)


def test_nan_values_and_64_experts(tmp_path: Path) -> None:
    E, T = 64, 12
    npmi = torch.rand(E, 5) * 2 - 1
    npmi[::3, 1] = math.nan  # experts with no token of a class: masked, not drawn as 0
    assert written(plots.plot_class_heatmap(npmi, list("abcde"), tmp_path / "c.png"))
    ppls = [40.0, math.nan, 35.0, 36.0]
    assert written(plots.plot_k_sweep([1, 2, 3, 4], ppls, 2, tmp_path / "k.png"))
    util = torch.rand(2, E)
    util[:, :5] = 0
    util = util / util.sum(-1, keepdim=True)
    assert written(plots.plot_utilisation(util, tmp_path / "u.png", corridor=(0.002, 0.03)))
    experts = torch.randint(0, E, (3, T, 4))
    weights = torch.softmax(torch.randn(3, T, 4), -1)
    pieces = ["Ġthe", "Ġcat", "s", "Ġ,", "Ċ", "x", "Ġy", "z", "Ġ", "a", "b", "."]
    assert written(plots.plot_routing_map(experts, weights, pieces, tmp_path / "r.png", E))


def test_wrong_suffix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must end in one of"):
        plots.plot_k_sweep([1, 2], [3.0, 2.0], 1, tmp_path / "k.jpg")


def test_training_plots_from_log_records(tmp_path: Path) -> None:
    recs = log_records()
    assert written(plots.plot_training_curves(recs, tmp_path / "t.png", k_switch=25))
    assert written(plots.plot_utilisation_history(recs, tmp_path / "u.png"))
    assert written(plots.plot_dead_history(recs, tmp_path / "d.png"))
    assert written(plots.plot_entropy_history(recs, tmp_path / "h.svg", num_experts=8))
    old = [{k: v for k, v in r.items() if k not in ("expert_counts", "router_entropy")}
           for r in recs]  # fmt: skip  # a log from before the per-expert counts
    assert written(plots.plot_training_curves(old, tmp_path / "t2.png"))
    assert written(plots.plot_dead_history(old, tmp_path / "d2.png"))  # validation dots only
    with pytest.raises(ValueError, match="expert_counts"):
        plots.plot_utilisation_history(old, tmp_path / "u2.png")


def test_training_figures_written_for_a_report(tmp_path: Path) -> None:
    from moeblocks.inspect.report import write_training_figures

    made = write_training_figures(log_records(), tmp_path, "svg", 8, 25)
    names = [name for _, name in made]
    assert names == ["training-curves.svg", "training-utilisation.svg", "training-dead.svg",
                     "training-entropy.svg"]  # fmt: skip
    assert all(written(tmp_path / n) for n in names)
    assert write_training_figures([], tmp_path) == []


def test_ablation_chart_takes_pairs_numbers_and_cell_records(tmp_path: Path) -> None:
    cell = SimpleNamespace(mean=12.0, half_width=math.nan, n=1)  # as CellSummary
    rows = [
        {"name": "cosine+bandpass", "ppl": (30.1, 0.8), "dead_pct": (2.0, 1.0), "k_gain": cell},
        {"name": "linear+bandpass", "ppl": (31.0, 1.1), "dead_pct": 5.0, "k_gain": (0.3, 0.2)},
        {"name": "dense", "ppl": (33.5, 0.4), "dead_pct": (math.nan, math.nan), "k_gain": None},
    ]
    titles = {"ppl": "val. perplexity", "dead_pct": "dead experts %", "k_gain": "gain at k+1"}
    assert written(plots.plot_ablation(rows, tmp_path / "a.png", titles=titles))
    assert written(plots.plot_ablation(rows, tmp_path / "a.pdf", metrics=["ppl"]))
    with pytest.raises(ValueError, match="at least one variant"):
        plots.plot_ablation([], tmp_path / "x.png")


def test_nothing_drawn_outside_the_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A title or label wider than its figure is cut off in the saved file (the routing
    # map's title was): every drawn artist, small inputs included, lies on the canvas.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), save(fig, path))[1])
    experts = torch.tensor([[[0, 1], [1, 2], [3, 0]], [[3, 2], [3, 1], [1, 0]]])
    util = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    weights = torch.full((2, 3, 2), 0.5)
    plots.plot_routing_map(experts, weights, ["a", "b", "c"], tmp_path / "r.png", 4)
    plots.plot_routing_map(experts[:, :1], torch.ones(2, 1, 2), ["a"], tmp_path / "r1.png", 4)
    plots.plot_utilisation(util, tmp_path / "u.png", util * 0.9, (0.05, 0.4))
    plots.plot_anchor_similarity([torch.eye(4)], tmp_path / "a.png")
    plots.plot_class_heatmap(torch.rand(4, 3), ["x", "y", "z"], tmp_path / "c.png")
    plots.plot_k_sweep([1, 2, 3], [30.0, 28.0, 28.5], 2, tmp_path / "k.png", 512)
    plots.plot_training_curves(log_records(), tmp_path / "t.png", k_switch=25)
    plots.plot_dead_history(log_records(), tmp_path / "d.png")
    assert len(figures) == 8
    for fig in figures:
        FigureCanvasAgg(fig).draw()
        box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches; drawn artists only
        width, height = fig.get_size_inches()
        # 0.01 in: half a pixel at the 150 dpi of the saved PNGs, for rounding.
        title = fig.axes[0].get_title()
        assert box.x0 >= -0.01, (title, box)
        assert box.y0 >= -0.01, (title, box)
        assert box.x1 <= width + 0.01, (title, box)
        assert box.y1 <= height + 0.01, (title, box)
