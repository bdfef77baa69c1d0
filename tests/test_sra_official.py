"""The reference SRA model against the official SRA code's setup and formulas.

Numbers transcribed from ITernovtsii/semantic-resonance at commit 0ce43e7 (MIT licence):
the Exp001 configs (etc/v2/experiments/001_multi_seed/configs/SRA_B_seed19.yaml), the
run log's parameter count (outputs/SRA_B_seed137.log: "Total trainable parameters:
290,341,892"), and the formulas of src/models/{sra,csr,components}.py,
src/training/{losses,trainer}.py. The formulas below are written from the paper's and
the code's mathematics, not copied.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import moeblocks as mb
from moeblocks.sra import SRAConfig, SRATransformer, UsageError, preset
from moeblocks.sra.data import Corpus
from moeblocks.sra.train import build_optimizer, lr_at

pytestmark = pytest.mark.usefixtures("one_thread")

OFFICIAL_PARAMS = 290_341_892  # the official run log of SRA B (cosine router)


def micro(**changes: object) -> SRAConfig:
    base = preset("tiny").replace(
        vocab_size=300, seq_len=16, d_model=32, n_layers=4, n_heads=2, num_experts=8,
        d_expert=16, steps=40, batch_size=4, dispatcher="torch",
    )  # fmt: skip
    return base.replace(**changes)


def _meta_params(config: SRAConfig) -> int:
    with torch.device("meta"):
        return SRATransformer(config).num_params()


def test_paper_preset_counts_the_official_parameters() -> None:
    assert _meta_params(preset("paper")) == OFFICIAL_PARAMS
    # The linear twin swaps each layer's anchors [E, D] and scalar temperature for a
    # gate [E, D]: one parameter fewer per layer.
    assert _meta_params(preset("paper-linear")) == OFFICIAL_PARAMS - 4


def test_paper_preset_is_the_official_recipe() -> None:
    p = preset("paper")
    # Model: vocab 32k, d 512, 4 layers, 8 heads, 256 GELU(tanh) experts of 256 with
    # biases, attention biases, dropout 0.1, batch-seeded anchors, tau 10.
    assert (p.vocab_size, p.d_model, p.n_layers, p.n_heads) == (32000, 512, 4, 8)
    assert (p.num_experts, p.d_expert, p.expert, p.expert_bias) == (256, 256, "gelu_tanh", True)
    assert (p.attn_bias, p.dropout, p.anchor_init, p.temperature) == (True, 0.1, "batch", 10.0)
    assert (p.init, p.ffn) == ("gpt2", "cosine")
    # Recipe: 8 epochs = 25,296 steps of 128 windows of 256 tokens (255 predicted), peak
    # LR 3e-4 after 4000 warmup steps, cosine to 0, AdamW wd 0.01 incl. the embedding,
    # clip 1.0, bf16 autocast, seed 19.
    assert (p.steps, p.batch_size, p.seq_len + 1) == (25296, 128, 256)
    assert (p.lr, p.warmup_steps, p.min_lr_ratio) == (3e-4, 4000, 0.0)
    assert (p.weight_decay, p.decay_embedding, p.grad_clip) == (0.01, True, 1.0)
    assert (p.precision, p.seed) == ("bf16", 19)
    # Routing: K 1 -> 4 from epoch 3 (step 2 · 3162), bandpass 0.0005/0.004 at weight
    # 0.4, averaged over layers.
    assert (p.k_start, p.k_final, p.k_switch_step) == (1, 4, 2 * 3162)
    assert (p.balance, p.band_floor, p.band_ceiling) == ("bandpass", 0.0005, 0.004)
    assert (p.balance_weight, p.aux_reduce) == (0.4, "mean")
    assert preset("paper-linear").differences(p) == ["ffn"]


def test_cpu_presets_keep_the_recipe_shape() -> None:
    paper = preset("paper")
    shape = ("expert", "expert_bias", "attn_bias", "init", "aux_reduce", "min_lr_ratio",
             "warmup", "weight_decay", "decay_embedding", "k_switch", "anchor_init")  # fmt: skip
    for name in ("tiny", "small"):
        cfg = preset(name)
        assert [getattr(cfg, f) for f in shape] == [getattr(paper, f) for f in shape], name


def test_init_follows_gpt2() -> None:
    torch.manual_seed(0)
    cfg = micro(d_model=64, num_experts=16, d_expert=256, n_heads=4)
    model = SRATransformer(cfg)
    experts = model.moe_layers[0].experts
    assert experts.w_in_EDF.std().item() == pytest.approx(0.02, rel=0.05)
    scaled = 0.02 / math.sqrt(2 * cfg.n_layers)  # residual projections
    assert experts.w_out_EFD.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(scaled, rel=0.1)
    for bias in (experts.b_in_EF, experts.b_out_ED, model.blocks[0].attn.qkv.bias):
        assert not bias.detach().any()


def test_aux_losses_are_averaged_over_layers() -> None:
    torch.manual_seed(0)
    cfg = micro(band_floor=0.2, band_ceiling=0.3)  # a corridor most experts miss
    mean_model = SRATransformer(cfg).eval()
    sum_model = SRATransformer(cfg.replace(aux_reduce="sum")).eval()
    sum_model.load_state_dict(mean_model.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (3, 12))
    out = mean_model(idx)
    # Official rule, from the probabilities: per layer P_e = mean_t p_te, bandpass
    # N^2 · mean_e(relu(floor - P_e)^2 + relu(P_e - ceil)^2); then 0.4 · mean over layers.
    per_layer = []
    for routing in out.routings:
        P = routing.probs.float().mean(0)
        N = P.numel()
        band = (F.relu(cfg.band_floor - P) ** 2 + F.relu(P - cfg.band_ceiling) ** 2).mean()
        per_layer.append(band * N**2)
    official = cfg.balance_weight * torch.stack(per_layer).mean()
    assert official > 0
    torch.testing.assert_close(out.total_aux_loss(), official, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        sum_model(idx).total_aux_loss(), cfg.n_layers * official, rtol=1e-5, atol=0
    )


@given(k=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_renormalisation_divides_by_sum_plus_1e6(k: int, seed: int) -> None:
    torch.manual_seed(seed)
    layer = SRATransformer(micro()).eval().moe_layers[0]
    x = torch.randn(10, 32)
    routing = layer(x, k=k).routing
    top = routing.probs.gather(1, routing.experts)
    torch.testing.assert_close(routing.weights, top / (top.sum(-1, keepdim=True) + 1e-6))


def test_linear_twin_decays_its_gate_and_cosine_anchors_do_not() -> None:
    for ffn, router_decays in (("linear", True), ("cosine", False)):
        cfg = micro(ffn=ffn)
        model = SRATransformer(cfg)
        opt = build_optimizer(model, cfg)
        decayed = {id(p) for p in opt.param_groups[0]["params"]}
        assert opt.param_groups[0]["weight_decay"] == cfg.weight_decay
        names = {n for n, p in model.named_parameters() if id(p) in decayed}
        assert "embed.weight" in names  # decay_embedding, as the official optimizer
        assert not any(".b_" in n or n.endswith(".bias") for n in names)
        assert any("router" in n for n in names) == router_decays


def test_lr_follows_warmup_then_cosine_to_zero() -> None:
    cfg = micro(steps=1000, warmup=0.1, lr=1.0, min_lr_ratio=0.0)
    assert lr_at(99, cfg) == pytest.approx(1.0)
    # Official (HF get_cosine_schedule_with_warmup): 0.5 · (1 + cos(pi · progress)).
    for step in (100, 325, 550, 999):
        progress = (step - 100) / 900
        assert lr_at(step, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * progress)))


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = SRATransformer(micro(dropout=0.5))
    idx = torch.randint(0, 300, (2, 8))
    model.eval()
    torch.testing.assert_close(model(idx).logits, model(idx).logits)
    model.train()
    assert not torch.equal(model(idx).logits, model(idx).logits)


def test_batch_seeding_skips_padding() -> None:
    torch.manual_seed(0)
    scorer = mb.CosineScorer(4, 3, init="batch")
    layer = mb.MoELayer(mb.Router(scorer), mb.TorchDispatcher(), mb.GELUExperts(3, 4, 8))
    real = torch.eye(4)[:3] + 0.1  # three real tokens
    pad = torch.full((5, 4), -7.0)  # padding that must never become an anchor
    x = torch.cat([real, pad])[None]
    mask = torch.tensor([[True] * 3 + [False] * 5])
    layer.train()
    layer(x, mask=mask)
    anchors = F.normalize(scorer.anchors_ED.detach(), dim=-1)
    cos_to_real = anchors @ F.normalize(real, dim=-1).t()
    assert torch.allclose(cos_to_real.max(1).values, torch.ones(3))


def test_config_errors_and_legacy_configs() -> None:
    with pytest.raises(UsageError, match=r"warmup is a fraction of steps"):
        micro(warmup=50.0)
    with pytest.raises(UsageError, match="dropout"):
        micro(dropout=1.0)
    legacy = micro().to_dict()
    legacy.update(warmup=10, steps=40)
    del legacy["aux_reduce"]
    old = SRAConfig.from_dict(legacy)  # moeblocks 0.1: warmup in steps, aux summed
    assert (old.warmup_steps, old.aux_reduce) == (10, "sum")


def test_bf16_autocast_trains(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from moeblocks.sra.train import train

    cfg = micro(precision="bf16", steps=3, eval_every=0, ckpt_every=0, eval_tokens=64)
    res = train(cfg, "synthetic", tmp_path / "run", progress=False)
    assert res.step == 3
    assert math.isfinite(res.val_loss)


def test_token_cache_tokenises_once(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from moeblocks.sra import tokenizer
    from moeblocks.sra.tokencache import cache_path, encode_split

    monkeypatch.setenv("MOEBLOCKS_CACHE", str(tmp_path / "cache"))
    text = "the cat sat on the mat. " * 200
    corpus = Corpus(str(tmp_path / "corpus"), text, text[:500])
    tok = tokenizer.train_tokenizer(text, 300)
    calls = []
    real_encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda t, s: calls.append(1) or real_encode(t, s))
    first = encode_split(tok, corpus, "train")
    second = encode_split(tok, corpus, "train")
    assert len(calls) == 1  # the second call is a cache hit
    np.testing.assert_array_equal(first, real_encode(tok, text))
    np.testing.assert_array_equal(second, first)
    assert cache_path(corpus, "train", tok).is_file()
    other = Corpus(corpus.name, text + "x", text[:500])  # other text: another key
    assert cache_path(other, "train", tok) != cache_path(corpus, "train", tok)
    assert isinstance(encode_split(tok, Corpus("pydoc", text, text), "valid"), np.ndarray)
    assert len(calls) == 2  # built-in corpora are not cached
