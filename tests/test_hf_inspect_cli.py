"""`moeblocks inspect --hf DIR` on tiny Hugging Face checkpoints written by save_pretrained."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from moeblocks.cli import main
from moeblocks.inspect.probe import BUILTIN_PROBES

pytest.importorskip("matplotlib")

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMON = {
    "vocab_size": 300,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
}


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def _save_mixtral(folder: Path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **COMMON)
    transformers.MixtralForCausalLM(cfg).save_pretrained(folder)
    return folder


def _save_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained on the built-in probe sentences (no download)."""
    tokenizers = pytest.importorskip("tokenizers")
    texts = [
        f"{item.context_a} {item.context_b}"
        for name in ("english", "english-senses")
        for item in BUILTIN_PROBES[name]
    ]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=COMMON["vocab_size"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    return _save_mixtral(tmp_path_factory.mktemp("hf") / "mixtral")


def test_inspect_hf_writes_report_with_pngs(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    argv = ["inspect", "--hf", str(checkpoint), "--max-tokens", "256", "--seq-len", "32"]
    assert main([*argv, "--data", "synthetic", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MixtralForCausalLM" in printed
    assert "k-sweep:  k=1:" in printed
    assert "routing collected over 256 tokens" in printed
    report = (out / "inspect.md").read_text(encoding="utf-8")
    assert "Anchors: not applicable" in report
    assert "No tokenizer in" in report  # token ids stand in for text
    assert "'<" in report  # tokens shown as ids
    for name in ("inspect-utilisation.png", "inspect-k-sweep.png", "inspect-routing-map.png"):
        assert f"({name})" in report
        assert is_png(out / name), name
    assert not (out / "inspect-anchors.png").exists()


def test_inspect_hf_with_a_tokenizer_runs_the_probes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _save_mixtral(tmp_path / "ckpt")
    _save_tokenizer(folder)
    argv = ["inspect", "--hf", str(folder), "--max-tokens", "128", "--seq-len", "32"]
    assert main([*argv, "--no-k-sweep", "--text", "Open the file in binary mode."]) == 0
    printed = capsys.readouterr().out
    assert "overlap probe (english, 12 items)" in printed
    assert "condition contrast (english-senses" in printed
    assert "No tokenizer" not in printed
    assert "' in'" in printed  # the traced sentence, decoded to text
    report = folder / "reports" / "inspect.md"  # default: DIR/reports
    assert report.is_file()
    assert not (folder / "reports" / "inspect-k-sweep.png").exists()


def test_inspect_hf_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "no such folder" in error(["inspect", "--hf", str(tmp_path / "missing")])
    assert "no config.json" in error(["inspect", "--hf", str(tmp_path)])
    dense = tmp_path / "dense"
    cfg = transformers.LlamaConfig(**COMMON)
    transformers.LlamaForCausalLM(cfg).save_pretrained(dense)
    assert "no supported sparse-MoE block" in error(["inspect", "--hf", str(dense)])
    assert "--hf DIR" in error(["inspect"])
    assert "not both" in error(["inspect", str(tmp_path), "--hf", str(dense)])


def test_inspect_hf_without_transformers_names_the_extra(checkpoint: Path) -> None:
    code = f"""
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "transformers":
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Hide())
from moeblocks.cli import main
sys.exit(main(["inspect", "--hf", {str(checkpoint)!r}, "--data", "synthetic"]))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'moeblocks[hf]'" in done.stderr
