"""The routing ablation: intervals, the table, the files it writes, and its command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moeblocks.cli import main
from moeblocks.sra import UsageError, preset
from moeblocks.sra.experiments import (
    ABLATION_VARIANTS,
    AblationRun,
    confidence_interval,
    format_ablation,
    load_ablation,
    routing_ablation,
    summarise_ablation,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_confidence_interval_is_student_t() -> None:
    c = confidence_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2 df) = 4.303
    assert (c.mean, c.n) == (2.0, 3)
    assert c.half_width == pytest.approx(4.303 / math.sqrt(3))
    c = confidence_interval([5.0] * 40)  # beyond the table: the normal quantile
    assert (c.mean, c.half_width, c.n) == (5.0, 0.0, 40)
    one = confidence_interval([1.5, math.nan])  # NaN (dense: no routing) is left out
    assert (one.mean, one.n) == (1.5, 1)
    assert math.isnan(one.half_width)
    assert confidence_interval([]).n == 0


def _run(variant: str, seed: int, ppl: float) -> AblationRun:
    nan = math.nan
    moe = variant != "dense"
    return AblationRun(variant, seed, ppl, -0.1 if moe else nan, 0.0 if moe else nan,
                       0.3 if moe else nan, 0.2 if moe else nan, 0.1, 1.0)  # fmt: skip


def test_table_has_one_row_per_variant() -> None:
    runs = [_run(v, s, 30.0 + s) for s in (0, 1) for v in ("cosine+bandpass", "dense")]
    summary = summarise_ablation(runs)
    assert list(summary) == ["cosine+bandpass", "dense"]
    assert summary["cosine+bandpass"]["ppl"].mean == 30.5
    table = format_ablation(runs).splitlines()
    assert len(table) == 4  # header, rule, 2 variants
    assert table[2].startswith("| cosine+bandpass | 30.50 ± ")
    assert "| – |" in table[3]  # dense has no routing metrics


def test_routing_ablation_end_to_end(tmp_path: Path) -> None:
    base = preset("tiny").replace(
        vocab_size=300, seq_len=16, d_model=32, n_heads=2, num_experts=8, d_expert=16,
        steps=6, batch_size=4, eval_every=0, ckpt_every=0, eval_tokens=256,
        dispatcher="torch",
    )  # fmt: skip
    variants = ["cosine+bandpass", "dense"]
    runs = routing_ablation(
        tmp_path, base, seeds=(0, 1), data="synthetic", variants=variants, max_tokens=256,
        progress=False, command="moeblocks experiment routing-ablation",
    )  # fmt: skip
    assert [(r.variant, r.seed) for r in runs] == [(v, s) for s in (0, 1) for v in variants]
    for r in runs:
        assert math.isfinite(r.ppl)
        assert math.isfinite(r.k_gain) == (r.variant != "dense")
    assert runs[0].ppl != runs[2].ppl  # the seed changes the run
    text = (tmp_path / "ablation.md").read_text()
    assert "moeblocks experiment routing-ablation" in text
    assert "| cosine+bandpass |" in text
    back, cfg, data, _ = load_ablation(tmp_path / "ablation.json")
    # NaN != NaN (dense rows), so compare the identifying fields and perplexity.
    assert [(r.variant, r.seed, r.ppl) for r in back] == [(r.variant, r.seed, r.ppl) for r in runs]
    assert (cfg, data) == (base, "synthetic")
    assert json.loads((tmp_path / "ablation.json").read_text())["runs"][0]["seed"] == 0
    assert len((tmp_path / "ablation.csv").read_text().splitlines()) == 1 + len(runs)
    assert (tmp_path / "ablation.png").stat().st_size > 0
    with pytest.raises(UsageError, match="unknown variants"):
        routing_ablation(tmp_path, base, variants=["cosine"], progress=False)


def test_experiment_command_rejects_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(ABLATION_VARIANTS) >= {"cosine+bandpass", "linear-nobalance", "dense"}
    with pytest.raises(SystemExit):
        main(["experiment", "routing-ablation", "--variants", "cosine"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["experiment", "routing-ablation", "--steps", "0"])
    assert "must be a positive integer" in capsys.readouterr().err
