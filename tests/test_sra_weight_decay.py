"""Which parameters the SRA trainer decays: the exact set of names, for every preset.

Weight decay belongs on weight matrices only: never on a norm, a bias (1-D, or the
stacked ``[E, F]`` / ``[E, D]`` expert biases), the cosine router's anchors or its
temperature τ; on the tied embedding only when ``decay_embedding`` (the official recipe
decays it). A rule that only checks some of these lets the others drift, so each case
writes the decayed names out in full and compares sets. The models are built on the
``meta`` device: the paper presets hold 290M parameters, and names and shapes are all
the optimizer's groups depend on.
"""

from __future__ import annotations

import pytest
import torch

from moeblocks.sra import SRAConfig, SRATransformer, preset
from moeblocks.sra.config import PRESETS
from moeblocks.sra.train import build_optimizer

# The weight matrices of one block, per FFN kind (the linear router's gate is a weight
# matrix and decays, as in the official code; the cosine router's anchors do not).
BLOCK_MATRICES = ("attn.qkv.weight", "attn.proj.weight")
FFN_MATRICES = {
    "cosine": ("ffn.experts.w_in_EDF", "ffn.experts.w_out_EFD"),
    "linear": ("ffn.router.scorer.weight_ED", "ffn.experts.w_in_EDF", "ffn.experts.w_out_EFD"),
    "dense": ("ffn.w_in.weight", "ffn.w_out.weight"),
}


def expected_decayed(config: SRAConfig) -> set[str]:
    """The names that must decay, written out from the rule above."""
    names = {
        f"blocks.{i}.{leaf}"
        for i in range(config.n_layers)
        for leaf in (*BLOCK_MATRICES, *FFN_MATRICES[config.ffn])
    }
    return names | ({"embed.weight"} if config.decay_embedding else set())


def _groups(config: SRAConfig) -> tuple[dict[str, torch.Tensor], list[dict]]:
    with torch.device("meta"):
        model = SRATransformer(config)
    return dict(model.named_parameters()), build_optimizer(model, config).param_groups


CASES = {
    **{name: preset(name) for name in PRESETS},
    "tiny-undecayed-embedding": preset("tiny").replace(decay_embedding=False),
    "tiny-dense": preset("tiny").replace(ffn="dense"),
    "tiny-linear": preset("tiny").replace(ffn="linear"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decayed_names_are_exactly_the_weight_matrices(case: str) -> None:
    config = CASES[case]
    assert config.ffn in FFN_MATRICES, f"{case}: add the FFN kind {config.ffn!r} to this test"
    params, groups = _groups(config)
    name_of = {id(p): n for n, p in params.items()}
    decay, no_decay = groups
    assert decay["weight_decay"] == config.weight_decay > 0
    assert no_decay["weight_decay"] == 0.0
    decayed = [name_of[id(p)] for p in decay["params"]]
    kept = [name_of[id(p)] for p in no_decay["params"]]
    # Every parameter in exactly one group.
    assert sorted(decayed + kept) == sorted(params)
    assert set(decayed) == expected_decayed(config)
    # The rule restated on shapes and names, so a renamed parameter cannot slip by.
    assert all(params[n].ndim >= 2 for n in decayed)
    assert not [n for n in decayed if "anchors" in n or "temperature" in n or ".b_" in n]
    assert {n for n in kept if params[n].ndim < 2} == {n for n in params if params[n].ndim < 2}
