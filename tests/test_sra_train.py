"""SRA training: loss goes down, checkpoints round trip, resume and Ctrl-C are exact."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from moeblocks.sra import SRAConfig, UsageError
from moeblocks.sra import train as train_module
from moeblocks.sra.checkpoint import find_checkpoint, load_weights
from moeblocks.sra.data import load_corpus, synthetic_text
from moeblocks.sra.evaluate import evaluate, evaluate_run, format_run_eval, load_run
from moeblocks.sra.model import SRATransformer
from moeblocks.sra.tokenizer import encode
from moeblocks.sra.train import lr_at, train

# Tiny models on one intra-op thread: see the fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


def micro(**changes: object) -> SRAConfig:
    base = SRAConfig(
        vocab_size=300, seq_len=16, d_model=32, n_layers=2, n_heads=2, num_experts=8,
        d_expert=16, k_start=1, k_final=2, k_switch=0.5, steps=8, batch_size=4, warmup=0.25,
        eval_every=0, eval_tokens=256, ckpt_every=0, dispatcher="torch",
        band_floor=0.0005 * 32, band_ceiling=0.004 * 32,
    )  # fmt: skip
    return base.replace(**changes)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    # A small synthetic corpus as a plain file: quick to tokenise, split 90/10 by lines.
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(synthetic_text(600, seed=7), encoding="utf-8")
    return str(path)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    ckpt = find_checkpoint(run)
    assert ckpt is not None
    return load_file(ckpt.path / "model.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, data_file: str) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    train(micro(), data_file, out, progress=False)
    return out


def test_loss_decreases_on_synthetic(tmp_path: Path) -> None:
    cfg = micro(steps=30, seq_len=32, batch_size=8, lr=1e-2, warmup=5 / 30)
    result = train(cfg, "synthetic", tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").open()]
    assert result.step == 30
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[-1]["loss"] < records[0]["loss"] - 1.0, records
    assert result.val_ppl < 60  # from ~300 (the vocabulary) at init


def test_checkpoint_round_trip(straight: Path, data_file: str) -> None:
    model, tok, ckpt = load_run(straight, data=data_file)
    assert ckpt.step == 8
    assert ckpt.data == data_file
    assert ckpt.config == micro()
    assert model.moe_layers[0].router.schedule.k == 2  # the schedule step travels too
    saved = _weights(straight)
    state = model.state_dict()
    for name, value in saved.items():
        assert torch.equal(state[name], value), name
    tokens = torch.from_numpy(encode(tok, load_corpus(data_file).valid))
    ev = evaluate_run(model, tokens, ckpt)
    assert [r.k for r in ev.sweep] == [1, 2, 3, 4]
    assert ev.result.counts.shape == (2, 8)
    assert len(ev.result.dead_per_layer) == 2
    text = format_run_eval(ev, k_train=2)
    assert "k-sweep" in text
    assert "dead experts" in text
    # Same weights, same numbers.
    again = evaluate(model, tokens, 4)
    assert again.loss == pytest.approx(ev.result.loss, rel=1e-6)


def test_load_into_other_config_fails(straight: Path) -> None:
    ckpt = find_checkpoint(straight)
    assert ckpt is not None
    other = micro(num_experts=4)
    with pytest.raises(UsageError, match="different config: num_experts 8"):
        load_weights(SRATransformer(other), ckpt, other)


def test_resume_is_exact(straight: Path, data_file: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = train(micro(), data_file, out, stop_at=4, progress=False)
    assert first.step == 4
    assert find_checkpoint(out).step == 4
    train(None, data_file, out, resume=True, progress=False)
    final, reference = _weights(out), _weights(straight)
    assert final.keys() == reference.keys()
    for name in reference:
        assert torch.equal(final[name], reference[name]), name
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").open()]
    assert steps == [4, 8]


def test_ctrl_c_saves_then_resume_is_exact(
    straight: Path, data_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_batch_at = train_module.batch_at

    def batch_at_with_ctrl_c(tokens, step, *args):  # type: ignore[no-untyped-def]
        if step == 2:  # Ctrl-C arrives while step 2 (the third) is running
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch_at(tokens, step, *args)

    monkeypatch.setattr(train_module, "batch_at", batch_at_with_ctrl_c)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(micro(), data_file, out, progress=False)
    assert find_checkpoint(out).step == 3  # the running step finished, then was saved
    monkeypatch.setattr(train_module, "batch_at", real_batch_at)
    train(None, data_file, out, resume=True, progress=False)
    final, reference = _weights(out), _weights(straight)
    for name in reference:
        assert torch.equal(final[name], reference[name]), name


def test_run_folder_guards(straight: Path, data_file: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="already holds a run"):
        train(micro(), data_file, straight, progress=False)
    with pytest.raises(UsageError, match="different config: d_model"):
        train(micro(d_model=64), None, straight, resume=True, progress=False)
    with pytest.raises(UsageError, match="holds no checkpoint"):
        train(micro(), data_file, tmp_path / "empty", resume=True, progress=False)
    assert not (tmp_path / "empty").exists()


def test_lr_schedule() -> None:
    cfg = micro(steps=100, warmup=0.1, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)  # halfway down the cosine
