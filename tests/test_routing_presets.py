"""The SRA decoder with the routing of each MoE family (``SRAConfig.ffn`` presets).

Legend: T tokens, D model dim, E experts, F expert hidden width, K top-k, L layers.

Each preset's layer is compared, in float64, with the published-rule transcriptions of
tests/test_architectures.py (imported, not repeated) at the preset's scaled widths;
active parameters are pinned per preset; the decoder trains a few steps with each, the
DeepSeek-V3 bias moves once per optimizer step and Switch logs its dropped tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_architectures import (
    compare,
    deepseek_v3_reference,
    llama4_reference,
    mixtral_reference,
    olmoe_reference,
    olmoe_z_loss,
    qwen2_moe_reference,
    swiglu_expert,
    switch_reference,
    tokens,
)
from test_architectures import gpt_oss_reference as gpt_oss_ref
from test_initialization import assert_meta_then_init_equals_eager

import moeblocks as mb
from moeblocks.sra import train as train_module
from moeblocks.sra.checkpoint import find_checkpoint, load_weights
from moeblocks.sra.config import FFN_CHOICES, PRESETS, SRAConfig, UsageError
from moeblocks.sra.data import synthetic_text
from moeblocks.sra.model import SRATransformer
from moeblocks.sra.routing_presets import (
    FAMILIES,
    PARTS,
    ROUTING_ZOO,
    build_moe,
    check_ffn,
    composition,
    describe,
    widths,
)
from moeblocks.sra.train import train

# Tiny models on one intra-op thread: see the fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


def small(ffn: str, **changes: object) -> SRAConfig:
    """A one-layer model whose experts are the references' (SwiGLU, no biases)."""
    base = SRAConfig(
        vocab_size=300, seq_len=16, d_model=16, n_layers=1, n_heads=2, num_experts=16,
        d_expert=6, k_start=1, k_final=2, steps=8, dispatcher="torch", expert="swiglu",
        expert_bias=False, ffn=ffn,
    )  # fmt: skip
    return base.replace(**changes)


def test_zoo_names_and_descriptions() -> None:
    assert ROUTING_ZOO == (
        "cosine", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss", "switch", "llama4",
    )  # fmt: skip
    assert set(ROUTING_ZOO) | {"linear", "dense"} == set(FFN_CHOICES)
    assert ROUTING_ZOO[1:] == FAMILIES
    for name in FFN_CHOICES:
        parts = composition(name)
        assert tuple(parts) == PARTS
        assert all(parts.values()), name
        line = describe(name)
        assert all(f"{part}: {parts[part]}" in line for part in PARTS)
    assert "group-limited" in describe("deepseek_v3")
    assert "1.25" in describe("switch")


def test_bad_ffn_names_list_the_choices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moeblocks.cli import main

    # SRAConfig itself refuses it too, but under the tests' runtime type checks its
    # Literal annotation answers first; the command line is what users type it into.
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "ffn=deepseek"]) == 2
    message = capsys.readouterr().err.replace("\n", " ")
    with pytest.raises(UsageError) as err:
        describe("deepseek")
    for text in (message, str(err.value)):
        assert "'deepseek'" in text
        assert all(name in text for name in FFN_CHOICES), text


# ------------------------------------------------------- routing = the published rule


def _randomise(layer: mb.MoELayer, gen: torch.Generator) -> None:
    """Non-zero values where the init leaves zeros (zeros hide bugs)."""
    with torch.no_grad():
        router = layer.router
        if router.scorer.bias_E is not None:  # gpt-oss's router bias
            router.scorer.bias_E.copy_(torch.randn(layer.num_experts, generator=gen))
        if router.balancer is not None:  # DeepSeek-V3's selection bias
            router.balancer.bias.copy_(0.1 * torch.randn(layer.num_experts, generator=gen))
        if layer.shared is not None and layer.shared.gate_D is not None:  # Qwen's gate
            layer.shared.gate_D.copy_(torch.randn(layer.dim, generator=gen))


def _preset_layer(ffn: str, **changes: object) -> mb.MoELayer:
    torch.manual_seed(0)
    layer = build_moe(small(ffn, **changes))
    _randomise(layer, torch.Generator().manual_seed(1))
    # Switch's jitter only acts in training; DeepSeek's balancer only counts loads there.
    return layer.double().eval()


def _float64_gate(layer: mb.MoELayer) -> None:
    # DeepSeek-V3 and Switch cast the gate's matmul to float32 (checked below); the
    # transcriptions compute in float64, so the float64 comparison runs the gate in the
    # input's dtype. Everything else in the layer is untouched.
    assert layer.router.scorer.compute_dtype == "float32"
    layer.router.scorer.compute_dtype = "input"


def _check_widths(layer: mb.MoELayer, ffn: str) -> None:
    w = widths(small(ffn))
    assert layer.experts.hidden == w.routed
    assert layer.router.schedule.max_k == w.k
    assert (0 if layer.shared is None else layer.shared.experts.hidden) == w.shared
    assert w.active_hidden == 2 * 6  # K·F: exact at these sizes


def test_mixtral_preset_is_mixtral() -> None:
    layer = _preset_layer("mixtral")
    _check_widths(layer, "mixtral")
    compare(layer, mixtral_reference(layer, 2), tokens(11, 16, 1))


def test_qwen2_moe_preset_is_qwen2_moe() -> None:
    layer = _preset_layer("qwen2_moe")
    _check_widths(layer, "qwen2_moe")  # routed F/2 = 3, shared K·F/2 = 6
    res = compare(layer, qwen2_moe_reference(layer, 2), tokens(13, 16, 3))
    assert bool((res.routing.weights.sum(-1) < 1).all())  # raw probabilities


def test_olmoe_preset_is_olmoe() -> None:
    layer = _preset_layer("olmoe")
    _check_widths(layer, "olmoe")
    x = tokens(10, 16, 4)
    res = compare(layer, olmoe_reference(layer, 2), x)
    # OLMoE's coefficients: load balance 0.01, router z-loss 0.001 (paper, sec. 2).
    z = olmoe_z_loss(layer, x)
    torch.testing.assert_close(res.aux_losses["z"], 0.001 * z, rtol=1e-10, atol=1e-12)


def test_deepseek_v3_preset_is_deepseek_v3() -> None:
    layer = _preset_layer("deepseek_v3")
    _check_widths(layer, "deepseek_v3")  # routed = shared = K·F/(K+1) = 4
    _float64_gate(layer)
    x = tokens(12, 16, 5)
    res = compare(layer, deepseek_v3_reference(layer, 2, 8, 4), x)
    # The selection bias changed some choice (else it went untested here).
    s_TE = torch.sigmoid(x @ layer.router.scorer.weight_ED.T)
    plain = s_TE.topk(2).indices.sort(-1).values
    assert not torch.equal(plain, res.routing.experts.sort(-1).values)


def test_gpt_oss_preset_is_gpt_oss() -> None:
    layer = _preset_layer("gpt_oss")
    _check_widths(layer, "gpt_oss")
    # The decoder's own SwiGLU experts (the expert MLP is not part of the routing).
    reference = gpt_oss_ref(layer, 2, expert=swiglu_expert(layer.experts))
    compare(layer, reference, tokens(10, 16, 6))


def test_switch_preset_is_switch() -> None:
    layer = _preset_layer("switch")
    _check_widths(layer, "switch")  # top-1, routed K·F = 12
    _float64_gate(layer)
    with torch.no_grad():
        layer.router.scorer.weight_ED[0] += 0.5  # overload expert 0 so tokens overflow
    # 64 tokens / 16 experts × 1.25 = 5 places per expert: an integer, so no rounding
    # convention enters.
    T = 64
    reference = switch_reference(layer, T * 5 // 4 // 16, expert=swiglu_expert(layer.experts))
    res = compare(layer, reference, tokens(T, 16, 7))
    assert int(res.routing.num_dropped) > 0


def test_llama4_preset_is_llama4() -> None:
    layer = _preset_layer("llama4")
    _check_widths(layer, "llama4")  # top-1, routed = shared = K·F/2 = 6
    compare(layer, llama4_reference(layer, 1), tokens(9, 16, 8))


def test_family_gates_compute_dtype_and_losses() -> None:
    # Per family: the gate's matmul dtype and {loss: (class, weight, fractions)}; weights
    # are the paper's (OLMoE, Switch, DeepSeek-V3) or HF's router_aux_loss_coef, whose
    # load_balancing_loss_func counts token fractions.
    expected = {
        "mixtral": ("input", {"balance": ("LoadBalanceLoss", 0.001, "tokens")}),
        "qwen2_moe": ("input", {"balance": ("LoadBalanceLoss", 0.001, "tokens")}),
        "olmoe": (
            "input",
            {"balance": ("LoadBalanceLoss", 0.01, "tokens"), "z": ("ZLoss", 0.001, None)},
        ),
        "deepseek_v3": ("float32", {"sequence": ("SequenceBalanceLoss", 0.0001, None)}),
        "gpt_oss": ("input", {"balance": ("LoadBalanceLoss", 0.001, "tokens")}),
        "switch": ("float32", {"balance": ("LoadBalanceLoss", 0.01, "slots")}),
        "llama4": ("input", {}),
    }
    assert set(expected) == set(FAMILIES)
    for ffn, (dtype, losses) in expected.items():
        layer = build_moe(small(ffn))
        assert layer.router.scorer.compute_dtype == dtype, ffn
        got = {
            name: (type(loss).__name__, loss.weight, getattr(loss, "fractions", None))
            for name, loss in layer.losses.items()
        }
        assert got == losses, ffn
    balancer = build_moe(small("deepseek_v3")).router.balancer
    assert balancer is not None
    assert balancer.rate == 1e-3  # DeepSeek-V3's γ


# ------------------------------------------------------------ equal active parameters

# Active parameters of the ``tiny`` preset's model (L = 2, D = 128, E = 32, F = 96,
# K = 2, GELU-tanh experts with biases) per ffn. Every preset runs K·F = 192 expert
# hidden units per token, so what differs is only (per layer): the cosine scorer's τ
# (+1), gpt-oss's router bias (+E), Qwen's shared-expert gate (+D), and one output bias
# (D) per expert bank a token passes beyond K (Qwen, DeepSeek: +1 bank; Switch: -1).
TINY_ACTIVE = {
    "cosine": 502_914,
    "mixtral": 502_912,
    "qwen2_moe": 502_912 + 2 * (128 + 128),
    "olmoe": 502_912,
    "deepseek_v3": 502_912 + 2 * 128,
    "gpt_oss": 502_912 + 2 * 32,
    "switch": 502_912 - 2 * 128,
    "llama4": 502_912,
}


def _active(config: SRAConfig) -> int:
    with torch.device("meta"):  # counting needs no weights
        return SRATransformer(config).num_params(active=True)


def test_active_parameters_of_the_tiny_zoo() -> None:
    tiny = PRESETS["tiny"]
    assert {name: _active(tiny.replace(ffn=name)) for name in ROUTING_ZOO} == TINY_ACTIVE


@pytest.mark.parametrize("base", ["default", "small", "odd"])
def test_active_parameters_equal_within_rounding(base: str) -> None:
    config = {
        "default": SRAConfig(),  # SwiGLU without biases, F = 64: DeepSeek's 128/3 rounds
        "small": PRESETS["small"],  # K = 4
        "odd": SRAConfig(d_expert=37, k_final=3, k_start=3),
    }[base]
    want = _active(config.replace(ffn="cosine"))
    D, E, L = config.d_model, config.num_experts, config.n_layers
    per_unit = 3 * D if config.expert == "swiglu" else 2 * D  # weights per hidden unit
    per_unit += (2 if config.expert == "swiglu" else 1) * config.expert_bias
    for name in FAMILIES:
        cfg = config.replace(ffn=name)
        w = widths(cfg)
        banks = w.k + (w.shared > 0)
        units = w.active_hidden // w.routed  # routed k + the shared width in routed widths
        off = abs(w.active_hidden - config.k_final * config.d_expert)
        assert off * 2 <= units, name  # the nearest integer width
        # Rounding (those hidden units), output biases (one D per bank beyond K) and
        # router extras (τ, a router bias, a shared gate).
        bound = L * (
            off * per_unit + abs(banks - config.k_final) * D * config.expert_bias + 1 + E + D
        )
        assert abs(_active(cfg) - want) <= bound, (name, _active(cfg), want, bound)
        assert abs(_active(cfg) - want) / want < 0.01, name


@given(
    k=st.integers(1, 8),
    f=st.integers(1, 300),
    ffn=st.sampled_from(FAMILIES),
)
def test_widths_hold_the_active_hidden_units(k: int, f: int, ffn: str) -> None:
    cfg = SRAConfig(num_experts=64, k_start=1, k_final=k, d_expert=f, ffn=ffn)
    w = widths(cfg)
    units = w.active_hidden // w.routed  # routed k plus the shared width in routed widths
    assert w.active_hidden == units * w.routed
    # The nearest integer width: K·F within half a width-unit per routed width.
    assert abs(units * w.routed - k * f) * 2 <= units or w.routed == 1
    assert w.k == (1 if ffn in ("switch", "llama4") else k)


# ------------------------------------------------------------------ build and train


@pytest.mark.parametrize("ffn", ROUTING_ZOO)
def test_preset_builds_on_meta(ffn: str) -> None:
    cfg = small(ffn, n_layers=2, init="gpt2", expert="gelu_tanh", expert_bias=True)
    assert_meta_then_init_equals_eager(lambda: SRATransformer(cfg), seed=19)


def micro(ffn: str, **changes: object) -> SRAConfig:
    base = SRAConfig(
        vocab_size=300, seq_len=16, d_model=32, n_layers=2, n_heads=2, num_experts=16,
        d_expert=16, k_start=1, k_final=2, k_switch=0.5, steps=12, batch_size=4,
        warmup=0.25, lr=1e-2, eval_every=6, eval_tokens=256, ckpt_every=0,
        dispatcher="torch", init="gpt2", ffn=ffn,
    )  # fmt: skip
    return base.replace(**changes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``run(ffn)``: the folder of a 12-step training run of ``ffn`` (made once)."""
    made: dict[str, Path] = {}

    def run(ffn: str) -> Path:
        if ffn not in made:
            out = tmp_path_factory.mktemp(ffn) / "run"
            train(micro(ffn), "synthetic", out, progress=False)
            made[ffn] = out
        return made[ffn]

    return run


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").open()]


@pytest.mark.parametrize("ffn", ROUTING_ZOO)
def test_decoder_trains_with_each_preset(ffn: str, runs) -> None:  # type: ignore[no-untyped-def]
    records = _records(runs(ffn))
    assert [r["step"] for r in records] == [6, 10, 12]
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.3, losses  # from ~ln 300 = 5.7 on synthetic text
    for r in records:
        assert 0.0 <= r["dropped"] <= 1.0
    validated = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in validated] == [6, 12]
    assert all(0.0 <= r["val_dropped"] <= 1.0 for r in validated)
    saved = json.loads((find_checkpoint(runs(ffn)).path / "config.json").read_text())
    assert saved["config"]["ffn"] == ffn  # checkpoints record the preset


def test_switch_logs_its_dropped_tokens(runs) -> None:  # type: ignore[no-untyped-def]
    records = _records(runs("switch"))
    # A capacity of 1.25 × the fair share drops copies whenever routing is uneven, as a
    # barely trained router's is; without a capacity nothing is ever dropped.
    assert all(r["dropped"] > 0 for r in records), records
    assert all(r["val_dropped"] > 0 for r in records if "val_loss" in r)
    assert all(r["dropped"] == 0 for r in _records(runs("mixtral")))


def test_deepseek_bias_moves_once_per_applied_step(
    runs, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    ckpt = find_checkpoint(runs("deepseek_v3"))
    model = SRATransformer(micro("deepseek_v3"))
    load_weights(model, ckpt, micro("deepseek_v3"))
    biases = [layer.router.balancer.bias for layer in model.moe_layers]
    steps, rate = 12, 1e-3
    for bias_E in biases:
        assert bool((bias_E != 0).any()), "the bias never moved"
        # Each update adds ±rate to every entry (or 0 for an exactly mean load): after
        # 12 steps a bias is a multiple of the rate, at most 12 of them from 0.
        units_E = bias_E / rate
        torch.testing.assert_close(units_E, units_E.round(), rtol=0, atol=1e-3)
        assert float(units_E.abs().max()) <= steps + 1e-3
    assert all(bool((layer.router.balancer.load == 0).all()) for layer in model.moe_layers)
    # The trainer calls step_balancers once after every applied optimizer step.
    calls: list[int] = []
    real = train_module.step_balancers
    monkeypatch.setattr(train_module, "step_balancers", lambda m: calls.append(real(m)))
    train(micro("deepseek_v3", steps=3, eval_every=0), "synthetic", tmp_path / "r", progress=False)
    assert calls == [2, 2, 2]  # one balancer per layer, once per step


def test_deepseek_resume_continues_the_bias_exactly(tmp_path: Path) -> None:
    cfg = micro("deepseek_v3", steps=4, eval_every=0)
    train(cfg, "synthetic", tmp_path / "straight", progress=False)
    train(cfg, "synthetic", tmp_path / "split", progress=False, stop_at=2)
    train(cfg, None, tmp_path / "split", resume=True, progress=False)
    states = []
    for run in ("straight", "split"):
        model = SRATransformer(cfg)
        load_weights(model, find_checkpoint(tmp_path / run), cfg)
        states.append(model.state_dict())
    biases = [n for n in states[0] if n.endswith("balancer.bias")]
    assert len(biases) == 2
    assert all(bool((states[0][n] != 0).any()) for n in biases)
    for name, value in states[0].items():  # bit for bit, the biases included
        assert torch.equal(states[1][name], value), name


def test_eval_reports_the_k_a_family_trained_with(runs) -> None:  # type: ignore[no-untyped-def]
    from moeblocks.sra.evaluate import eval_record, evaluate_run, format_run_eval, load_run
    from moeblocks.sra.routing_presets import trained_k
    from moeblocks.sra.tokenizer import encode

    model, tok, ckpt = load_run(runs("switch"))
    assert trained_k(ckpt.config) == model.k == 1  # top-1, though k_final is 2
    assert trained_k(micro("cosine")) == 2
    text = synthetic_text(200, seed=3)
    ev = evaluate_run(model, torch.from_numpy(encode(tok, text)), ckpt, max_tokens=256)
    assert eval_record(ev)["k"] == 1
    assert [s.k for s in ev.sweep] == [1, 2, 3, 4]
    report = format_run_eval(ev, trained_k(ckpt.config))
    assert "k 1)" in report
    assert "\n  * 1 " in report  # the sweep marks k = 1 as the trained k


def test_inspect_shows_no_sra_corridor_or_curriculum_for_a_family(runs) -> None:  # type: ignore[no-untyped-def]
    from moeblocks.sra.inspection import inspect_run

    # micro() keeps the tiny recipe's bandpass fields, which a family ignores.
    got = inspect_run(runs("switch"), max_tokens=256, k_sweep=False)
    assert (got.corridor, got.k_switch, got.k_train) == (None, None, 1)
    assert "k 1," in got.title
    sra = inspect_run(runs("cosine"), max_tokens=256, k_sweep=False)
    assert (sra.corridor is not None, sra.k_switch, sra.k_train) == (True, 6, 2)
    assert "k 1->2," in sra.title


def test_checkpoint_of_one_preset_refuses_another(runs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = runs("deepseek_v3")
    ckpt = find_checkpoint(run)
    other = micro("mixtral")
    named = r"different config: ffn 'deepseek_v3' \(saved\) != 'mixtral'"
    with pytest.raises(UsageError, match=named):
        load_weights(SRATransformer(other), ckpt, other)
    with pytest.raises(UsageError, match=named):
        train(other, None, run, resume=True, progress=False)


def test_cli_selects_a_preset() -> None:
    from moeblocks.cli import _parser
    from moeblocks.cli.config_args import fields_epilog, run_config

    for argv in (["--set", "ffn=deepseek_v3"], ["--ffn", "deepseek_v3"]):
        args = _parser().parse_args(["train", "--out", "unused", *argv])
        assert run_config(args).ffn == "deepseek_v3"
    assert all(name in fields_epilog().replace("\n", " ") for name in FAMILIES)


@pytest.mark.parametrize("field", ["router_noise", "z_loss_weight", "dispersion_weight"])
def test_a_family_refuses_sra_only_routing_fields(field: str) -> None:
    with pytest.raises(UsageError, match=f"{field} apply to ffn cosine and linear only"):
        micro("olmoe", **{field: 0.1})
    assert getattr(micro("linear", **{field: 0.1}), field) == 0.1
    # Fields every preset sets (the tiny recipe's bandpass, batch anchors) are ignored.
    assert PRESETS["tiny"].replace(ffn="olmoe").balance == "bandpass"


def test_sizes_a_preset_cannot_route_are_refused_before_training(tmp_path: Path) -> None:
    bad = micro("deepseek_v3", num_experts=12)  # not 8 groups
    with pytest.raises(UsageError, match="num_experts must be a multiple of 8"):
        check_ffn(bad)
    with pytest.raises(UsageError, match="multiple of 8"):
        train(bad, "synthetic", tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_presets_that_do_not_shard_are_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    plan = train_module._plan_parallel
    with pytest.raises(UsageError, match="deepseek_v3 trains in one process only"):
        plan(None, micro("deepseek_v3"))
    with pytest.raises(UsageError, match="llama4 weights expert inputs"):
        plan(None, micro("llama4"))  # expert parallelism over the 2 ranks by default
    assert plan(1, micro("llama4")).ep_size == 1  # data parallel alone is fine
    for ffn in ("cosine", "mixtral", "qwen2_moe", "olmoe", "gpt_oss", "switch"):
        assert plan(None, micro(ffn)).ep_size == 2
