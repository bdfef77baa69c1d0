"""torch.compile runs the composed architecture blocks and changes no result."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import torch
import moeblocks as mb

torch.manual_seed(0)
D, F, E = 16, 8, 8


def deepseek_like():
    router = mb.Router(
        mb.LinearScorer(D, E, compute_dtype="float32"),
        3,
        scoring="sigmoid",
        selection=mb.GroupLimitedTopK(4, 2),
        weights=mb.WeightPolicy("always", scale=2.5, eps=1e-20),
        balancer=mb.BiasBalancer(E, rate=0.01),
    )
    shared = mb.SharedExperts(mb.SwiGLUExperts(1, D, 2 * F), gate=True)
    losses = {"seq": mb.SequenceBalanceLoss(0.1)}
    bank = mb.SwiGLUExperts(E, D, F)
    return mb.MoELayer(router, mb.TorchDispatcher(), bank, losses, shared=shared)


def gpt_oss_switch_like():
    router = mb.Router(mb.LinearScorer(D, E, bias=True), 2, scoring="softmax_topk",
                       weights=mb.WeightPolicy("never"))
    bank = mb.SwiGLUExperts(E, D, F, activation=mb.ClampedSwiGLU(), bias=True)
    capacity = mb.Capacity(factor=1.0, per="sequence")
    losses = {"lb": mb.LoadBalanceLoss(fractions="tokens")}
    return mb.MoELayer(router, mb.TorchDispatcher(), bank, losses, capacity=capacity)


for make in (deepseek_like, gpt_oss_switch_like):
    torch.manual_seed(1)
    eager_layer = make().train()
    compiled_layer = make().train()
    compiled_layer.load_state_dict(eager_layer.state_dict())
    x = torch.randn(3, 10, D)
    eager = eager_layer(x)
    compiled = torch.compile(compiled_layer)(x)
    # Inductor may fuse and reorder float32 reductions: a few ulps.
    torch.testing.assert_close(compiled.out, eager.out, rtol=1e-5, atol=1e-5)
    assert torch.equal(compiled.routing.experts, eager.routing.experts)
    for name in eager.aux_losses:
        torch.testing.assert_close(compiled.aux_losses[name], eager.aux_losses[name])
    if eager.routing.dropped is not None:
        assert torch.equal(compiled.routing.dropped, eager.routing.dropped)
    # Buffers the forward updates (the balancer's loads) move identically.
    for (name, a), (_, b) in zip(eager_layer.named_buffers(), compiled_layer.named_buffers()):
        assert torch.equal(a, b), name
    g = torch.randn_like(x)
    loss_e = (eager.out * g).sum() + eager.total_aux_loss()
    loss_c = (compiled.out * g).sum() + compiled.total_aux_loss()
    ge = torch.autograd.grad(loss_e, list(eager_layer.parameters()))
    gc = torch.autograd.grad(loss_c, list(compiled_layer.parameters()))
    for a, b in zip(ge, gc):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    print(make.__name__, "ok")
"""


def test_compiled_architecture_blocks_match_eager() -> None:
    # In a fresh interpreter: the test run's beartype shape hook is not traceable by dynamo.
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deepseek_like ok" in done.stdout
    assert "gpt_oss_switch_like ok" in done.stdout
