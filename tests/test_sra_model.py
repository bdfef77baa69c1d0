"""The reference SRA transformer: shapes, gradients, routing records, config checks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import moeblocks as mb
from moeblocks.sra import PRESETS, SRAConfig, SRATransformer, UsageError, preset
from moeblocks.sra.model import build_schedule

# Tiny models on one intra-op thread: see the fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


def micro(**changes: object) -> SRAConfig:
    base = SRAConfig(
        vocab_size=300, seq_len=16, d_model=32, n_layers=2, n_heads=2, num_experts=8,
        d_expert=16, k_start=1, k_final=2, k_switch=0.5, steps=8, batch_size=4,
        band_floor=0.0005 * 32, band_ceiling=0.004 * 32, dispatcher="torch",
    )  # fmt: skip
    return base.replace(**changes)


@pytest.mark.parametrize("ffn", ["cosine", "linear", "dense"])
def test_forward_backward_shapes(ffn: str) -> None:
    torch.manual_seed(0)
    cfg = micro(ffn=ffn, z_loss_weight=0.01)
    model = SRATransformer(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 11))
    res = model(idx)
    assert res.logits.shape == (3, 11, cfg.vocab_size)
    n_moe = 0 if ffn == "dense" else cfg.n_layers
    assert len(res.routings) == len(res.aux_losses) == n_moe
    for routing, aux in zip(res.routings, res.aux_losses, strict=True):
        assert routing.experts.shape == (33, cfg.k_start)
        assert set(aux) == {"bandpass", "z"}
    loss = F.cross_entropy(res.logits.flatten(0, 1), idx.flatten()) + res.total_aux_loss()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    if ffn == "cosine":
        scorer = model.blocks[0].ffn.router.scorer
        assert isinstance(scorer, mb.CosineScorer)
        assert scorer.anchors_ED.grad.abs().sum() > 0  # the router learns at k=1


def test_k_override_mask_and_schedule() -> None:
    cfg = micro()
    model = SRATransformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    assert model(idx, k=3).routings[0].top_k == 3
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False  # trailing padding
    assert model(idx, mask=mask).logits.shape == (2, 8, cfg.vocab_size)
    assert model.k == 1
    model.set_step(cfg.k_switch_step)
    assert model.k == cfg.k_final == model(idx).routings[1].top_k
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, cfg.seq_len + 1, dtype=torch.long))


def test_causal() -> None:
    # Changing a later token must not change the logits of earlier positions.
    torch.manual_seed(0)
    cfg = micro()
    model = SRATransformer(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 10))
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % cfg.vocab_size
    a, b = model(idx).logits, model(changed).logits
    # Same ops on identical prefixes: only float reassociation inside SDPA may differ.
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_dense_baseline_matches_active_params() -> None:
    cfg = micro()
    moe, dense = SRATransformer(cfg), SRATransformer(cfg.replace(ffn="dense"))
    routers = sum(p.numel() for layer in moe.moe_layers for p in layer.router.parameters())
    assert moe.num_params(active=True) - routers == dense.num_params()


def test_schedule_from_config() -> None:
    sched = build_schedule(micro(steps=100, k_switch=0.25, k_start=1, k_final=4))
    assert isinstance(sched, mb.StepK)
    assert [sched.k_at(s) for s in (0, 24, 25, 99)] == [1, 1, 4, 4]
    assert build_schedule(micro(k_start=2, k_final=2)).max_k == 2


def test_presets_and_config_errors() -> None:
    paper = preset("paper")
    assert (paper.d_model, paper.n_layers, paper.n_heads) == (512, 4, 8)
    assert (paper.num_experts, paper.d_expert, paper.k_start, paper.k_final) == (256, 256, 1, 4)
    assert (paper.band_floor, paper.band_ceiling, paper.balance_weight) == (0.0005, 0.004, 0.4)
    assert set(PRESETS) == {"tiny", "small", "paper", "paper-linear"}
    with pytest.raises(UsageError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(UsageError, match="n_heads"):
        micro(n_heads=3)
    with pytest.raises(UsageError, match="unknown fields"):
        SRAConfig.from_dict({**micro().to_dict(), "colour": 1})
    assert SRAConfig.from_dict(micro().to_dict()) == micro()


def test_import_stays_light() -> None:
    # tqdm is left out of the list: torch itself imports it.
    code = (
        "import sys, moeblocks, moeblocks.sra, moeblocks.sra.train, moeblocks.sra.evaluate, "
        "moeblocks.sra.report, moeblocks.cli\n"
        "moeblocks.cli._parser()\n"
        "heavy = [m for m in ('tokenizers', 'matplotlib', 'safetensors') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
