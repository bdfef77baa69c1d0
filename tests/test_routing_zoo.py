"""The routing zoo: interval math, the table from its runs' files, resumption, and its command."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeblocks.cli import main
from moeblocks.sra import UsageError, preset
from moeblocks.sra.data import synthetic_text
from moeblocks.sra.evaluate import evaluate
from moeblocks.sra.experiments import confidence_interval, format_ablation, load_validation
from moeblocks.sra.routing_presets import ROUTING_ZOO
from moeblocks.sra.routing_zoo import (
    DENSE,
    MEASURE_FILE,
    REFERENCE,
    TINY_STEPS,
    ZOO_METRICS,
    ZooRun,
    compare_to_reference,
    family_config,
    format_differences,
    load_zoo,
    read_zoo_run,
    routing_zoo,
    zoo_base,
    zoo_families,
)

pytestmark = pytest.mark.usefixtures("one_thread")

T975 = {1: 12.706, 2: 4.303, 3: 3.182}  # Student's t, two-sided 95 %, by degrees of freedom

# The smallest model that still has 2 MoE layers of 8 experts; 6 steps each.
BASE = preset("tiny").replace(
    vocab_size=300, seq_len=16, d_model=32, n_heads=2, num_experts=8, d_expert=16,
    steps=6, batch_size=4, eval_every=0, ckpt_every=0, eval_tokens=256, dispatcher="torch",
)  # fmt: skip
# The reference, a family with a capacity limit (it drops tokens) and the dense baseline.
FAMILIES = [REFERENCE, "switch", DENSE]


def _run(family: str, seed: int, **values: float) -> ZooRun:
    nan = math.nan
    fields = dict.fromkeys(ZOO_METRICS, nan) | {"train_seconds": 1.0} | values
    return ZooRun(family, seed, **fields)


def test_interval_by_hand() -> None:
    c = confidence_interval([2.0, 4.0, 9.0])  # mean 5, sample variance (9 + 1 + 16) / 2 = 13
    assert c.mean == 5.0
    assert c.half_width == pytest.approx(T975[2] * math.sqrt(13 / 3), rel=1e-12)  # rounding only
    runs = [_run(REFERENCE, s, ppl=p) for s, p in enumerate([30.0, 31.0, 32.0, 29.0])]
    runs += [_run("other", s, ppl=p) for s, p in enumerate([35.0, 33.0, 36.0, 34.0])]
    (d,) = compare_to_reference(runs, ["ppl"])
    # differences 5, 2, 4, 5: mean 4, sample variance (1 + 4 + 0 + 1) / 3 = 2, 3 df
    assert (d.family, d.metric, d.diff.mean, d.diff.n) == ("other", "ppl", 4.0, 4)
    assert d.diff.half_width == pytest.approx(T975[3] * math.sqrt(2 / 4), rel=1e-12)
    assert d.outside  # 4 ± 2.25 excludes 0


@given(
    st.lists(
        st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)),
        min_size=1,
        max_size=4,
        unique_by=lambda t: t,
    )
)
def test_differences_are_paired_by_seed(pairs: list[tuple[float, float]]) -> None:
    runs = [_run(REFERENCE, s, cv2=a) for s, (a, _) in enumerate(pairs)]
    runs += [_run("x", s, cv2=b) for s, (_, b) in reversed(list(enumerate(pairs)))]
    (d,) = compare_to_reference(runs, ["cv2"])
    diffs = [b - a for a, b in pairs]
    assert d.diff.n == len(pairs)
    assert d.diff.mean == pytest.approx(statistics.fmean(diffs), abs=1e-9)  # summation order
    if len(pairs) == 1:
        assert math.isnan(d.diff.half_width)
        assert not d.outside
    else:
        hw = T975[len(pairs) - 1] * statistics.stdev(diffs) / math.sqrt(len(pairs))
        assert d.diff.half_width == pytest.approx(hw, rel=1e-9, abs=1e-9)
        assert d.outside == (abs(d.diff.mean) > d.diff.half_width)


def test_differences_text_says_which_hold() -> None:
    runs = [_run(REFERENCE, s, ppl=30.0 + s, dead_pct=0.0) for s in range(3)]
    runs += [_run("far", s, ppl=40.0 + s, dead_pct=[0.0, 10.0, 0.0][s]) for s in range(3)]
    text = format_differences(runs)
    assert "**val. perplexity**: outside the interval: far +10.00 ± 0.00; within it: none." in text
    assert "**dead experts %**: outside the interval: none; within it: far +3.3 ± 14.3." in text
    assert "class purity" not in text  # no values: no line
    assert "nothing to compare" in format_differences(runs[3:])


def _table_row(text: str, family: str) -> list[str]:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| {family} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def _recompute(out: Path, family: str, seeds: list[int], metric: str) -> float:
    """A metric's mean over seeds straight from the run folders' files."""
    values = []
    for s in seeds:
        run = out / f"{family}-s{s}"
        log = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
        if metric == "tok_per_s":
            values.append([r["tok_per_s"] for r in log if "tok_per_s" in r][-1])
        elif metric == "dropped_pct":  # only for a family with a capacity limit
            drops = [100 * r["dropped"] for r in log if "dropped" in r]
            values.append(statistics.fmean(drops) if family == "switch" else math.nan)
        else:
            values.append(json.loads((run / MEASURE_FILE).read_text())["metrics"][metric])
    return statistics.fmean(values)


def test_routing_zoo_end_to_end(tmp_path: Path) -> None:
    # A small corpus file: the built-in synthetic one takes seconds to generate per load.
    data = tmp_path / "corpus.txt"
    data.write_text(synthetic_text(600, seed=5))
    seeds = [0, 1]
    kw = {"seeds": seeds, "data": str(data), "families": FAMILIES, "max_tokens": 256}
    kw["progress"] = False
    tmp_path = tmp_path / "zoo"
    runs = routing_zoo(tmp_path, BASE, command="moeblocks experiment routing-zoo", **kw)
    assert [(r.family, r.seed) for r in runs] == [(f, s) for s in seeds for f in FAMILIES]
    for r in runs:
        assert math.isfinite(r.ppl)
        assert r.tok_per_s > 0
        assert math.isfinite(r.cv2) == (r.family != DENSE)
        assert math.isfinite(r.dropped_pct) == (r.family == "switch")
        assert 0 <= r.purity <= 1 or r.family == DENSE
        saved = json.loads((tmp_path / f"{r.family}-s{r.seed}" / "checkpoint.json").read_text())
        assert saved["step"] == BASE.steps
    assert runs[0].ppl != runs[len(FAMILIES)].ppl  # the seed changes the run
    # Switch trained top-1 and is measured top-1 (not at the config's k_final = 2).
    model, _, _, tokens = load_validation(tmp_path / "switch-s0", str(data))
    switch = runs[FAMILIES.index("switch")]
    assert evaluate(model, tokens, BASE.batch_size, 256, k=1).ppl == switch.ppl
    assert evaluate(model, tokens, BASE.batch_size, 256, k=2).ppl != switch.ppl
    text = (tmp_path / "routing_zoo.md").read_text()
    assert "moeblocks experiment routing-zoo" in text
    assert "## Differences from `cosine`" in text
    # Every number of the table is the mean of the runs' own files.
    for family in FAMILIES:
        row = _table_row(text, family)
        for metric in ["ppl", "dead_pct", "cv2", "purity", "tok_per_s", "dropped_pct"]:
            cell = row[list(ZOO_METRICS).index(metric) + 1]
            want = _recompute(tmp_path, family, seeds, metric)
            if math.isnan(want):  # dense: no routing
                assert cell == "–", (family, metric)
            else:
                assert cell.startswith(format(want, ZOO_METRICS[metric][1]) + " ± "), (
                    family,
                    metric,
                )
        assert row[-1] == str(len(seeds))
    back, cfg, data_back, _ = load_zoo(tmp_path / "routing_zoo.json")
    assert [(r.family, r.seed, r.ppl) for r in back] == [(r.family, r.seed, r.ppl) for r in runs]
    assert (cfg, data_back) == (BASE, str(data))
    assert len((tmp_path / "routing_zoo.csv").read_text().splitlines()) == 1 + len(runs)
    assert (tmp_path / "routing_zoo.png").stat().st_size > 0

    # A rerun trains and measures nothing again, and reads the files afresh: a changed
    # log value changes the table.
    run0 = tmp_path / f"{REFERENCE}-s0"
    measured = (run0 / MEASURE_FILE).stat().st_mtime_ns
    log = [json.loads(ln) for ln in (run0 / "log.jsonl").read_text().splitlines()]
    log[-1]["tok_per_s"] = 123456789
    (run0 / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    again = routing_zoo(tmp_path, BASE, **kw)
    assert (run0 / MEASURE_FILE).stat().st_mtime_ns == measured
    assert (again[0].ppl, again[0].cv2) == (runs[0].ppl, runs[0].cv2)
    assert again[0].tok_per_s == 123456789.0 != runs[0].tok_per_s
    row = _table_row((tmp_path / "routing_zoo.md").read_text(), REFERENCE)
    want = _recompute(tmp_path, REFERENCE, seeds, "tok_per_s")
    assert row[list(ZOO_METRICS).index("tok_per_s") + 1].startswith(f"{want:.0f} ± ")
    assert read_zoo_run(run0, REFERENCE, 0).tok_per_s == 123456789.0

    # The runs of other settings are refused, not mixed into the table.
    with pytest.raises(UsageError, match=r"other settings \(lr\)"):
        routing_zoo(tmp_path, BASE.replace(lr=1e-3), **kw)
    # A run whose checkpoint no longer verifies is refused, not silently retrained.
    (weights,) = (tmp_path / "dense-s1" / "checkpoints").glob("step-*/model.safetensors")
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(UsageError, match=r"verifies.*delete .*dense-s1 to retrain it"):
        routing_zoo(tmp_path, BASE, **kw)

    # A run without a checkpoint trains again and is measured again, not read back.
    run1 = tmp_path / f"{REFERENCE}-s1"
    measure = json.loads((run1 / MEASURE_FILE).read_text())
    measured = (run1 / MEASURE_FILE).stat().st_mtime_ns
    (ckpt,) = (run1 / "checkpoints").glob("step-*")
    shutil.rmtree(ckpt)  # as if killed before its only save
    again = routing_zoo(tmp_path, BASE, **{**kw, "families": [REFERENCE], "seeds": [1]})
    assert (run1 / MEASURE_FILE).stat().st_mtime_ns != measured
    assert again[0].ppl == measure["metrics"]["ppl"]  # one thread, same seed: same run


def test_zoo_refuses_bad_input(tmp_path: Path) -> None:
    kw = {"progress": False, "data": "synthetic"}
    with pytest.raises(UsageError, match=r"families must be some of .*'mamba'"):
        routing_zoo(tmp_path, BASE, families=["cosine", "mamba"], **kw)
    with pytest.raises(UsageError, match="must not repeat"):
        routing_zoo(tmp_path, BASE, families=["cosine", "cosine"], **kw)
    with pytest.raises(UsageError, match="at least one seed"):
        routing_zoo(tmp_path, BASE, seeds=[], **kw)
    for seeds in ([0, -1], [1, 1]):
        with pytest.raises(UsageError, match=r"distinct ints >= 0, got \["):
            routing_zoo(tmp_path, BASE, seeds=seeds, **kw)
    with pytest.raises(UsageError, match="jobs must be an int >= 1, got 0"):
        routing_zoo(tmp_path, BASE, jobs=0, **kw)
    assert not any(tmp_path.iterdir())  # refused before anything was written
    with pytest.raises(UsageError, match=r"no zoo-measure\.json"):
        read_zoo_run(tmp_path, REFERENCE, 0)


def test_zoo_configs() -> None:
    assert zoo_families() == (*ROUTING_ZOO, DENSE)
    assert len(zoo_families()) == 9
    assert zoo_families()[0] == REFERENCE
    assert zoo_families()[-1] == DENSE
    assert zoo_base().steps == 200
    assert zoo_base().eval_every == 0
    assert zoo_base("tiny", 50).steps == 50
    assert zoo_base("small").steps == preset("small").steps
    dense = family_config(BASE, DENSE, 3)
    assert (dense.ffn, dense.balance, dense.seed) == ("dense", "none", 3)
    other = family_config(BASE, FAMILIES[1], 2)
    assert other.differences(BASE) == ["ffn", "seed"]


def test_experiment_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["experiment", "routing-zoo", "--families", "mamba"])
    assert "invalid choice: 'mamba'" in capsys.readouterr().err
    for bad in (["--jobs", "0"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            main(["experiment", "routing-zoo", *bad])
        assert "must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["experiment", "routing-zoo", "--help"])
    help_text = capsys.readouterr().out
    assert "examples:" in help_text
    assert "--jobs" in help_text
    assert all(f in help_text for f in zoo_families())
    with pytest.raises(SystemExit):
        main(["experiment", "routing-ablation", "--families", "cosine"])
    assert "unrecognized arguments: --families" in capsys.readouterr().err


ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["routing_zoo_cpu", "routing_zoo_400_cpu"])
def test_published_results_are_computed_from_their_runs(name: str) -> None:
    # The measured table, the differences and the docs page come from the runs' JSON.
    results = ROOT / "benchmarks" / "results" / f"{name}.md"
    runs, base, _, command = load_zoo(results.with_suffix(".json"))
    assert command.startswith("moeblocks experiment routing-zoo --preset tiny --seeds 0 1 2")
    assert base.steps == (400 if "400" in name else TINY_STEPS)
    assert sorted({r.family for r in runs}) == sorted(zoo_families())
    assert {r.seed for r in runs} == {0, 1, 2}
    text = results.read_text(encoding="utf-8")
    page = (ROOT / "docs" / "routing-zoo.md").read_text(encoding="utf-8")
    table = format_ablation(runs, ZOO_METRICS, key="family")
    differences = format_differences(runs)
    assert table in text
    assert differences in text
    assert table in page
    assert differences in page
