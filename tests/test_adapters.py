"""TensorMoE returns the layer's output; collect_aux_losses hands back its aux losses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moeblocks as mb


def _layer(losses: bool = True) -> mb.MoELayer:
    router = mb.Router(mb.LinearScorer(8, 4), k=2)
    named = {"balance": mb.LoadBalanceLoss(weight=0.5), "z": mb.ZLoss()} if losses else None
    return mb.MoELayer(router, mb.TorchDispatcher(), mb.GELUExperts(4, 8, 16), named)


def test_tensor_moe_is_the_layer_output_and_collects_every_call() -> None:
    torch.manual_seed(0)
    first, second = mb.TensorMoE(_layer()), mb.TensorMoE(_layer())
    model = nn.Sequential(first, nn.Tanh(), second)
    x = torch.randn(2, 5, 8)
    with mb.collect_aux_losses(model) as aux:
        y = model(x)
    ref_1 = first.layer(x)
    ref_2 = second.layer(torch.tanh(ref_1.out))
    torch.testing.assert_close(y, ref_2.out, rtol=0, atol=0)  # the same ops, in order
    assert [sorted(call) for call in aux.calls] == [["balance", "z"], ["balance", "z"]]
    expected = ref_1.total_aux_loss() + ref_2.total_aux_loss()
    # Summed in another order than total_aux_loss: float32 rounding only.
    torch.testing.assert_close(aux.total(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        aux.by_name()["z"], ref_1.aux_losses["z"] + ref_2.aux_losses["z"], rtol=0, atol=0
    )
    aux.total().backward()  # the collected losses carry the router's gradient
    assert first.layer.router.scorer.weight_ED.grad is not None


def test_hooks_end_with_the_block_even_on_error() -> None:
    model = nn.Sequential(mb.TensorMoE(_layer()))
    calls = []

    def fail_inside() -> None:
        with mb.collect_aux_losses(model) as aux:
            calls.append(aux.calls)
            model(torch.randn(3, 8))
            raise KeyError("a failing step")

    with pytest.raises(KeyError, match="a failing step"):
        fail_inside()
    (aux_calls,) = calls
    assert len(aux_calls) == 1
    assert not model[0].layer._forward_hooks
    with pytest.raises(RuntimeError, match="drops the layer's aux losses"):
        model(torch.randn(3, 8))  # no collector any more
    assert len(aux_calls) == 1


def test_training_without_a_collector_is_an_error_not_a_silent_drop() -> None:
    model = nn.Sequential(mb.TensorMoE(_layer()))
    with pytest.raises(RuntimeError, match=r"aux losses \(balance, z\).*collect_aux_losses"):
        model(torch.randn(3, 8))
    assert model.eval()(torch.randn(3, 8)).shape == (3, 8)  # inference needs no losses
    no_losses = mb.TensorMoE(_layer(losses=False))
    assert no_losses(torch.randn(3, 8)).shape == (3, 8)  # nothing to lose
    with mb.collect_aux_losses(no_losses) as aux:
        no_losses(torch.randn(3, 8))
    assert aux.calls == [{}]
    assert float(aux.total()) == 0.0


def test_bad_arguments() -> None:
    with (
        pytest.raises(ValueError, match="model holds no MoELayer: Linear"),
        mb.collect_aux_losses(nn.Linear(2, 2)),
    ):
        pass
    with pytest.raises(TypeError, match="layer"):
        mb.TensorMoE(nn.Linear(8, 8))  # type: ignore[arg-type]
