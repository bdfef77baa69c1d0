"""MoELayer: input validation, zero tokens, masks, dtypes and torch.compile."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moeblocks as mb

ROOT = Path(__file__).resolve().parent.parent


def make_layer(
    dim: int = 8, num_experts: int = 4, k: int = 2, check_finite: bool = False
) -> mb.MoELayer:
    router = mb.Router(mb.CosineScorer(dim, num_experts), schedule=k)
    losses = {"balance": mb.LoadBalanceLoss(weight=0.5), "z": mb.ZLoss()}
    return mb.MoELayer(
        router, mb.TorchDispatcher(), mb.SwiGLUExperts(num_experts, dim, 16), losses, check_finite
    )


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.randn(8), ValueError, r"shape \[\*batch, 8\]"),
        (torch.randn(3, 7), ValueError, r"shape \[\*batch, 8\]"),
        (torch.randint(0, 3, (3, 8)), TypeError, "floating-point"),
        (torch.randn(3, 8, dtype=torch.float64), TypeError, "dtype"),
        (torch.randn(3, 8, device="meta"), ValueError, "meta"),
    ],
)
def test_bad_input(x: torch.Tensor, error: type[Exception], match: str) -> None:
    layer = make_layer()
    # The test run's jaxtyping hook may reject a wrong dtype (as a TypeError) before the
    # layer's own check runs, so the layer's message is checked on the check itself.
    with pytest.raises(error, match=match):
        layer._validate(x, None)
    with pytest.raises(error):
        layer(x)


@pytest.mark.parametrize("k", [0, 5])
def test_bad_k(k: int) -> None:
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 4\]"):
        make_layer()(torch.randn(3, 8), k=k)


def test_non_finite_input_with_check_finite() -> None:
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        make_layer(check_finite=True)(x)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        make_layer(check_finite=True)(x)


def test_bad_mask() -> None:
    layer, x, mask = make_layer(), torch.randn(2, 3, 8), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 3\)"):
        layer._validate(x, mask)
    with pytest.raises((ValueError, TypeError)):  # TypeError from the test run's shape hook
        layer(x, mask=mask)


def test_mismatched_components() -> None:
    router = mb.Router(mb.LinearScorer(8, 4))
    with pytest.raises(ValueError, match="do not match"):
        mb.MoELayer(router, mb.TorchDispatcher(), mb.GELUExperts(4, 6, 8))
    with pytest.raises(TypeError, match="dispatcher"):
        mb.MoELayer(router, object(), mb.GELUExperts(4, 8, 8))  # type: ignore[arg-type]


def test_zero_tokens_give_empty_output_and_finite_losses() -> None:
    layer = make_layer()
    x = torch.randn(0, 5, 8, requires_grad=True)
    res = layer(x)
    assert res.out.shape == (0, 5, 8)
    assert all(torch.isfinite(v) for v in res.aux_losses.values())
    (res.out.sum() + res.total_aux_loss()).backward()


def test_aux_losses_are_weighted_and_masked() -> None:
    torch.manual_seed(0)
    layer = make_layer()
    x = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    res = layer(x, mask=mask)
    raw = mb.LoadBalanceLoss()(res.routing, mask.reshape(-1))
    torch.testing.assert_close(res.aux_losses["balance"], 0.5 * raw)
    torch.testing.assert_close(
        res.total_aux_loss(), res.aux_losses["balance"] + res.aux_losses["z"]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype: torch.dtype) -> None:
    layer = make_layer().to(dtype)
    x = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    res = layer(x)
    assert res.out.dtype == dtype
    res.out.float().sum().backward()
    assert x.grad.dtype == dtype
    assert torch.isfinite(x.grad).all()


_COMPILE_SCRIPT = """
import torch
import moeblocks as mb

torch.manual_seed(0)
router = mb.Router(mb.CosineScorer(16, 8), schedule=2)
losses = {"balance": mb.LoadBalanceLoss(), "z": mb.ZLoss(), "bandpass": mb.BandpassLoss(0.05, 0.2)}
layer = mb.MoELayer(router, mb.TorchDispatcher(), mb.SwiGLUExperts(8, 16, 32), losses)
x = torch.randn(3, 10, 16)
eager = layer(x)
compiled = torch.compile(layer)(x)
# Inductor may fuse and reorder float32 reductions: a few ulps.
torch.testing.assert_close(compiled.out, eager.out, rtol=1e-5, atol=1e-5)
for name in eager.aux_losses:
    torch.testing.assert_close(
        compiled.aux_losses[name], eager.aux_losses[name], rtol=1e-5, atol=1e-6
    )
assert torch.equal(compiled.routing.experts, eager.routing.experts)
g = torch.randn_like(x)
params = list(layer.parameters())
grads = [torch.autograd.grad((r.out * g).sum(), params) for r in (eager, compiled)]
for a, b in zip(*grads):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
print("compiled ok")
"""


def test_compiled_matches_eager() -> None:
    # In a fresh interpreter: the test run's beartype shape hook is not traceable by dynamo.
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled ok" in done.stdout


def _readme_block(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    (code,) = _readme_block("python")
    assert len(code.strip().splitlines()) <= 25
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "torch.Size([4, 32, 64]) torch.Size([128, 1])"
    assert out[1] == "torch.Size([128, 2]) 4"


def test_plain_callable_losses_are_listed_read_only() -> None:
    def entropy(routing, mask=None):
        return -(routing.probs * routing.probs.clamp_min(1e-12).log()).sum(-1).mean()

    entropy.weight = 0.1  # type: ignore[attr-defined]
    router = mb.Router(mb.LinearScorer(8, 4))
    layer = mb.MoELayer(
        router, mb.TorchDispatcher(), mb.GELUExperts(4, 8, 8), {"h": entropy, "z": mb.ZLoss()}
    )
    assert list(layer.plain_losses) == ["h"]
    assert list(layer.losses) == ["z"]
    with pytest.raises(TypeError):
        layer.plain_losses["x"] = entropy  # type: ignore[index]
    res = layer(torch.randn(3, 8))
    torch.testing.assert_close(res.aux_losses["h"], 0.1 * entropy(res.routing))
    from moeblocks.distributed import reduce_aux_losses

    with pytest.raises(TypeError, match="plain-callable losses"):
        reduce_aux_losses(layer)


def test_a_loss_of_the_01_signature_gets_the_router_and_a_deprecation_warning() -> None:
    seen = []

    def old(routing, router, mask=None):
        seen.append(router)
        return routing.probs.sum() * 0

    old.weight = 1.0  # type: ignore[attr-defined]
    router = mb.Router(mb.LinearScorer(8, 4))
    with pytest.warns(DeprecationWarning, match=r"\['old'\] take \(routing, router, mask\)"):
        layer = mb.MoELayer(router, mb.TorchDispatcher(), mb.GELUExperts(4, 8, 8), {"old": old})
    layer(torch.randn(3, 8))
    assert seen == [router]
