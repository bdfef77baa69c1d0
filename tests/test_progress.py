"""Progress output: plain lines (no carriage returns) when the stream is not a terminal."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moeblocks.runtime.progress import LINE_EVERY_S, LINE_STEPS, LineProgress, start_progress

_LINE_RE = re.compile(r"^(?P<desc>.+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\S+) \((?P<pct>\d+) %\)")


class _Clock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _counts(text: str) -> list[int]:
    lines = text.splitlines()
    matches = [_LINE_RE.match(line) for line in lines]
    assert all(matches), lines
    return [int(m["n"]) for m in matches if m]


@given(
    total=st.integers(0, 3000),
    chunks=st.lists(st.integers(1, 400), max_size=60),
)
def test_lines_every_tenth_and_the_last_count(total: int, chunks: list[int]) -> None:
    out = io.StringIO()
    bar = LineProgress(total, "eval", unit="batch", stream=out, clock=_Clock())
    for n in chunks:
        bar.update(n)
    bar.close()
    bar.close()  # a second close prints nothing more
    text = out.getvalue()
    assert "\r" not in text
    counts = _counts(text)
    done = sum(chunks)
    # Time stands still, so only tenths print: at most one line per tenth reached, plus
    # the closing line (counts past the total, e.g. an estimate too low, add tenths).
    assert len(counts) <= done * LINE_STEPS // max(total, 1) + 1
    assert counts == sorted(counts)
    assert counts[-1:] == ([done] if done else [])
    # Reference: a line at each update that reaches a new tenth, and the last count.
    expected, n, shown = [], 0, 0
    for c in chunks:
        n += c
        if n * LINE_STEPS // max(total, 1) > shown * LINE_STEPS // max(total, 1):
            expected.append(n)
            shown = n
    assert counts == expected + ([n] if n != shown else [])


def test_a_line_every_30_s_when_tenths_are_slow() -> None:
    out, clock = io.StringIO(), _Clock()
    bar = LineProgress(10_000, "train", unit="step", stream=out, clock=clock)
    for _ in range(5):  # 5 steps, far from a tenth, each after 31 s
        clock.now += LINE_EVERY_S + 1
        bar.update()
    bar.update()  # no time passed: no line
    bar.close()
    assert _counts(out.getvalue()) == [1, 2, 3, 4, 5, 6]
    assert out.getvalue().splitlines()[0] == "train: 1/10000 step (0 %), 31 s"


def test_postfix_description_messages_and_resume() -> None:
    out = io.StringIO()
    bar = LineProgress(100, "train", unit="step", initial=50, stream=out, clock=_Clock())
    bar.set_postfix_str("loss 2.000")
    bar.update(10)
    bar.write("step 60: skipped, the loss is not finite")
    bar.set_description_str("train (k=2)")
    bar.update(40)
    bar.close()
    assert out.getvalue().splitlines() == [
        "train: 60/100 step (60 %), 0 s, loss 2.000",
        "step 60: skipped, the loss is not finite",
        "train (k=2): 100/100 step (100 %), 0 s, loss 2.000",
    ]


def test_start_progress_picks_lines_off_a_terminal() -> None:
    out = io.StringIO()
    bar = start_progress(20, "eval", stream=out)
    assert isinstance(bar, LineProgress)
    for _ in range(20):
        bar.update()
    bar.close()
    assert len(out.getvalue().splitlines()) == LINE_STEPS
    assert "\r" not in out.getvalue()


def test_start_progress_on_a_terminal_is_a_tqdm_bar() -> None:
    pytest.importorskip("tqdm")
    term = _Terminal()
    bar = start_progress(5, "eval", stream=term)
    assert not isinstance(bar, LineProgress)
    for _ in range(5):
        bar.update()
    bar.write("a message")
    bar.close()
    assert "\r" in term.getvalue()  # tqdm redraws in place: fine on a terminal
    assert "a message\n" in term.getvalue()


def test_disabled_shows_no_progress_but_messages(capsys: pytest.CaptureFixture[str]) -> None:
    bar = start_progress(10, "eval", enabled=False)
    bar.update(10)
    bar.set_postfix_str("x")
    bar.write("a message")
    bar.close()
    assert capsys.readouterr().err == "a message\n"


def test_bad_total_is_named() -> None:
    with pytest.raises(ValueError, match=r"total and initial must be >= 0, got -1 and 0"):
        LineProgress(-1, "eval")


@pytest.mark.usefixtures("one_thread")
def test_training_log_is_plain_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Issue 26: stderr captured (not a terminal) gets one short line per tenth, no '\r'
    # stream; the demo's captured output was one 30 kB line before.
    pytest.importorskip("tokenizers")
    from moeblocks.sra import SRAConfig
    from moeblocks.sra.train import train

    cfg = SRAConfig(
        vocab_size=300, seq_len=16, d_model=32, n_layers=1, n_heads=2, num_experts=4,
        d_expert=16, steps=40, batch_size=4, eval_every=0, eval_tokens=128, ckpt_every=0,
        dispatcher="torch",
    )  # fmt: skip
    train(cfg, "synthetic", tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("train: ")]
    # One line per tenth; the tiny run takes seconds, so the 30 s lines cannot add many.
    assert LINE_STEPS <= len(lines) <= LINE_STEPS + 2, err
    assert lines[-1].startswith("train: 40/40 step (100 %)")
    assert "loss " in lines[-1]
    assert max(len(line) for line in err.splitlines()) < 200
