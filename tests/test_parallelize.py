"""``parallelize`` (FSDP2, FSDP2 + EP, DDP, checkpointing, compile) against one process.

Legend: W ranks, P expert-parallel group size, E experts, T tokens, B batch, S sequence.

Two launches of this file on gloo/CPU ranks (through ``tests/gloo.run_ranks``; the 4
ranks check shapes under the jaxtyping hook like the rest of the suite, the 2 ranks
cannot, since dynamo does not trace the hook):

- 4 ranks train a small SRA model for 3 AdamW steps (clipped) under FSDP2 (P = 1, 2,
  4), DDP (P = 2) and FSDP2 + P = 2 with activation checkpointing, each on its slice
  of the same batches, and save a DCP checkpoint of the FSDP2 + EP run after 2 steps;
- 2 ranks load that checkpoint (FSDP2, P = 2) and take step 3, train the SRA model
  with per-block ``torch.compile``, and train a toy model of MoE blocks with uneven
  sequence lengths whose skewed router leaves the experts of one rank without tokens
  (and whose bias balancers must see the global loads).

The test process runs the same training on one process (and loads the 4-rank
checkpoint there too) and compares losses, gradients, norms and weights.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import moeblocks as mb
from moeblocks.distributed import ParallelConfig, ParallelModel, load_sharded, save_sharded
from moeblocks.sra.config import preset
from moeblocks.sra.model import SRATransformer
from moeblocks.sra.train import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gloo import run_ranks  # tests/ is on the path of pytest, not of the ranks

STEPS, SAVE_AT, MAX_NORM = 3, 2, 0.5  # MAX_NORM < the measured norms (~1-2): clipping acts
LAUNCH_TIMEOUT_S = 600  # a hang guard, not a speed test: a busy 2-core machine runs 5-10x slower
CONFIG = dataclasses.replace(
    preset("tiny"), vocab_size=260, seq_len=8, d_model=16, n_heads=2, num_experts=8,
    d_expert=12, batch_size=8, anchor_init="orthogonal", k_start=2, steps=STEPS,
)  # fmt: skip
SCENARIOS_4 = {
    "fsdp": ParallelConfig(engine="fsdp", ep_size=1),
    "fsdp_ep2": ParallelConfig(engine="fsdp", ep_size=2),
    "fsdp_ep4": ParallelConfig(engine="fsdp", ep_size=4),
    "ddp_ep2": ParallelConfig(engine="ddp", ep_size=2),
    "fsdp_ep2_ac": ParallelConfig(engine="fsdp", ep_size=2, activation_checkpointing=True),
}
# aot_eager: dynamo captures each block and AOT autograd splits forward and backward,
# without inductor's C++ build (minutes on 2 busy cores); both must leave results alone.
COMPILED = ParallelConfig(
    engine="fsdp", ep_size=2, compile_blocks=True, compile_backend="aot_eager"
)

# Tolerances. The ranks see the same tokens and run every expert on the same rows in the
# same order as one process, but float32 sums are split differently: each rank's mean
# cross-entropy, then a reduction over ranks (FSDP2's reduce-scatter, DDP's buckets);
# router statistics per rank, then summed. That rounds at ~1e-7 relative per step.
LOSS_TOL = 1e-5  # relative, per step, loss, aux and norm (measured ≤ 8e-7)
GRAD_TOL = 1e-5  # whole-model relative difference of the step-1 gradients (measured ≤ 3e-7)
# AdamW divides by sqrt(v), which magnifies rounding for entries whose gradient is near
# zero, so weights are compared as a whole, relative to the 3-step update (measured
# ≤ 2e-5); a wrong batch slice, a missed or doubled reduction gives O(1).
WEIGHT_TOL = 1e-3


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: inputs and targets ``[B, S]``."""
    gen = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(
        0, CONFIG.vocab_size, (CONFIG.batch_size, CONFIG.seq_len + 1), generator=gen
    )
    return ids[:, :-1], ids[:, 1:]


def _sra_step(
    run: nn.Module | ParallelModel,
    model: nn.Module,
    pm: ParallelModel | None,
    optimizer: torch.optim.Optimizer,
    step: int,
    rows: slice,
) -> dict:
    """One training step on ``rows`` of the batch; the record is the same on every rank."""
    x, y = batch(step)
    res = run(x[rows])
    ce = F.cross_entropy(res.logits.flatten(0, 1), y[rows].flatten())
    aux = res.total_aux_loss()
    (ce + aux).backward()
    if pm is None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    else:
        pm.sync_gradients()
        norm = pm.clip_grad_norm_(MAX_NORM)
    ce = ce.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(ce)
        ce /= dist.get_world_size()
    record = {"loss": float(ce), "aux": float(aux.detach()), "norm": float(norm)}
    if step == 0:  # the clipped gradients, each as one process holds it
        record["grads"] = _full(model, pm, {n: p.grad for n, p in model.named_parameters()})
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return record


def _full(model: nn.Module, pm: ParallelModel | None, tensors: dict) -> dict[str, torch.Tensor]:
    """Tensors named like ``model``'s parameters, as one process holding everything has them."""
    from moeblocks.distributed.checkpoint import _expert_prefixes, _global_expert_view

    experts = _expert_prefixes(model)
    out = {}
    for name, t in tensors.items():
        prefix = next((p for p in experts if name.startswith(p)), None)
        if prefix is not None and pm is not None:
            assert pm.expert_mesh is not None
            t = _global_expert_view(t, experts[prefix], pm.expert_mesh)
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
    return out


def _weights(model: nn.Module, pm: ParallelModel | None) -> dict[str, torch.Tensor]:
    from moeblocks.distributed import sharded_state_dict

    mesh = None if pm is None else pm.expert_mesh
    state = sharded_state_dict(model, expert_mesh=mesh)["model"]
    return {
        n: (t.full_tensor() if hasattr(t, "full_tensor") else t).clone() for n, t in state.items()
    }


def _sra_model() -> SRATransformer:
    torch.manual_seed(0)
    return SRATransformer(CONFIG)


# ---------------------------------------------------------------------------- ranks


def _rank_rows() -> slice:
    rank, world = dist.get_rank(), dist.get_world_size()
    B = CONFIG.batch_size
    return slice(rank * B // world, (rank + 1) * B // world)


def _run_sra(config: ParallelConfig, workdir: Path, *, save: bool = False) -> dict:
    from moeblocks.distributed import parallelize

    model = _sra_model()
    pm = parallelize(model, config)
    calls = [0]
    for layer in model.moe_layers:
        layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    optimizer = build_optimizer(model, CONFIG)
    steps = []
    for step in range(STEPS):
        if save and step == SAVE_AT:
            save_sharded(workdir / "dcp4", model, optimizer, expert_mesh=pm.expert_mesh)
        steps.append(_sra_step(pm, model, pm, optimizer, step, _rank_rows()))
    return {"steps": steps, "weights": _weights(model, pm), "moe_calls": calls[0]}


def _run_load(workdir: Path) -> dict:
    from moeblocks.distributed import parallelize

    torch.manual_seed(7)  # other weights: all of them must come from the checkpoint
    model = SRATransformer(CONFIG)
    pm = parallelize(model, ParallelConfig(engine="fsdp", ep_size=2))
    optimizer = build_optimizer(model, CONFIG)
    load_sharded(workdir / "dcp4", model, optimizer, expert_mesh=pm.expert_mesh)
    steps = [_sra_step(pm, model, pm, optimizer, s, _rank_rows()) for s in range(SAVE_AT, STEPS)]
    return {"steps": steps, "weights": _weights(model, pm)}


# The toy model: MoE blocks on flat tokens, any number per rank.
TOY_DIM, TOY_E, TOY_LR = 8, 4, 0.05
TOY_SHAPES = ((2, 7), (1, 3))  # [B, S] of each rank's batch: uneven lengths
TOY_STEPS = 2


class ToyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        scorer = mb.LinearScorer(TOY_DIM, TOY_E)
        # The bias balancer's loads must be summed over every rank (parallelize sets its
        # group), so all ranks apply the update one process applies.
        balancer = mb.BiasBalancer(TOY_E, rate=0.01)
        router = mb.Router(scorer, schedule=mb.ConstantK(2), balancer=balancer)
        experts = mb.SwiGLUExperts(TOY_E, TOY_DIM, 6)
        self.moe = mb.MoELayer(router, mb.TorchDispatcher(), experts, {"cv": mb.CVSquaredLoss(0.1)})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, mb.MoEOutput]:
        out = self.moe(x)
        return x + out.out, out


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock() for _ in range(2))
        self.head = nn.Linear(TOY_DIM, 1)
        with torch.no_grad():  # every token prefers experts 0 and 1 (rank 0's under P = 2)
            w = self.blocks[0].moe.router.scorer.weight_ED
            w.zero_()
            w[:2, 0] = 3.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        aux = x.new_zeros(())
        for block in self.blocks:
            x, out = block(x)
            aux = aux + out.total_aux_loss()
        return self.head(x).squeeze(-1), aux


def toy_tokens() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(B, S, TOY_DIM, generator=gen) for B, S in TOY_SHAPES]
    for x in xs:
        x[..., 0] = x[..., 0].abs() + 1.0  # along the favoured experts' direction
    return xs


def toy_loss(
    y: torch.Tensor, aux: torch.Tensor, tokens_everywhere: int, world: int
) -> torch.Tensor:
    # Σ over this rank's tokens / all ranks' tokens, times W: the engines average over W
    # ranks, which gives the gradient of the mean over every token, as one process has.
    return (y.square().sum() / tokens_everywhere) * world + aux


def _run_toy() -> dict:
    from moeblocks.distributed import parallelize

    torch.manual_seed(3)
    model = Toy()
    pm = parallelize(model, ParallelConfig(engine="fsdp", ep_size=2))
    seen: list[torch.Tensor] = []
    model.blocks[0].moe.experts.register_forward_pre_hook(
        lambda _m, args: seen.append(args[1].clone())
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=TOY_LR)
    x = toy_tokens()[dist.get_rank()]
    total = sum(B * S for B, S in TOY_SHAPES)
    losses = []
    for _ in range(TOY_STEPS):
        y, aux = pm(x)
        toy_loss(y, aux, total, dist.get_world_size()).backward()
        pm.sync_gradients()
        optimizer.step()
        optimizer.zero_grad()
        mb.step_balancers(model)
        part = (y.detach().square().sum() / total).reshape(1)
        dist.all_reduce(part)
        losses.append(float(part + aux.detach()))
    return {"losses": losses, "weights": _weights(model, pm), "local_rows": seen[0]}


def _rank_main(out: Path) -> None:
    """Entry point of one rank: the scenarios of its world size."""
    torch.set_num_threads(1)
    workdir = out.parent
    if dist.get_world_size() == 4:
        results = {
            name: _run_sra(config, workdir, save=name == "fsdp_ep2")
            for name, config in SCENARIOS_4.items()
        }
    else:
        results = {
            "load": _run_load(workdir),
            "compiled": _run_sra(COMPILED, workdir),
            "toy": _run_toy(),
        }
    torch.save(results, out)


if __name__ == "__rank__":
    _rank_main(Path(sys.argv[1]))


# ------------------------------------------------------------------------- launches


def _launch(world: int, workdir: Path) -> list[dict]:
    code = f"import runpy; runpy.run_path({str(Path(__file__))!r}, run_name='__rank__')"
    # The 2 ranks compile, which the jaxtyping hook does not allow; the 4 ranks check shapes.
    checks = world == 4
    outs = run_ranks(code, workdir, world=world, timeout=LAUNCH_TIMEOUT_S, shape_checks=checks)
    return [torch.load(p, weights_only=False) for p in outs]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], list[dict]]:
    workdir = tmp_path_factory.mktemp("parallelize")
    four = _launch(4, workdir)
    two = _launch(2, workdir)  # loads the checkpoint the 4 ranks saved
    return workdir, four, two


@pytest.fixture(scope="module")
def reference() -> dict:
    model = _sra_model()
    optimizer = build_optimizer(model, CONFIG)
    rows = slice(0, CONFIG.batch_size)
    steps = [_sra_step(model, model, None, optimizer, s, rows) for s in range(STEPS)]
    return {"steps": steps, "weights": _weights(model, None)}


# ---------------------------------------------------------------------------- tests


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base: dict | None = None) -> float:
    keys = [k for k in b if b[k].is_floating_point()]
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys)
    ref = b if base is None else {k: b[k].double() - base[k].double() for k in keys}
    den = sum(float(ref[k].double().square().sum()) for k in keys)
    return (num / den) ** 0.5


def _compare(result: dict, reference: dict, first_step: int = 0) -> None:
    initial = _weights(_sra_model(), None)
    for got, want in zip(result["steps"], reference["steps"][first_step:], strict=True):
        for key in ("loss", "aux", "norm"):
            assert got[key] == pytest.approx(want[key], rel=LOSS_TOL), key
    if first_step == 0:
        grads = result["steps"][0]["grads"]
        assert grads.keys() == reference["steps"][0]["grads"].keys()
        assert _rel(grads, reference["steps"][0]["grads"]) <= GRAD_TOL
    assert result["weights"].keys() == reference["weights"].keys()
    assert _rel(result["weights"], reference["weights"], initial) <= WEIGHT_TOL


@pytest.mark.parametrize("name", [*SCENARIOS_4, "compiled"])
def test_matches_one_process(ranks: tuple, reference: dict, name: str) -> None:
    _, four, two = ranks
    results = four if name in SCENARIOS_4 else two
    for rank_result in results:  # every rank logs the same global numbers
        _compare(rank_result[name], reference)


def test_activation_checkpointing_recomputes(ranks: tuple) -> None:
    _, four, _ = ranks
    layers = CONFIG.n_layers
    assert four[0]["fsdp_ep2"]["moe_calls"] == STEPS * layers
    assert four[0]["fsdp_ep2_ac"]["moe_calls"] == 2 * STEPS * layers  # forward + recompute


def test_dcp_four_ranks_to_two_and_one(ranks: tuple, reference: dict) -> None:
    workdir, four, two = ranks
    assert sorted(p.name for p in (workdir / "dcp4").iterdir()) == [
        ".metadata", *(f"__{r}_0.distcp" for r in range(4))
    ]  # fmt: skip
    saved_run = four[0]["fsdp_ep2"]
    for rank_result in two:  # 2 ranks continue as the 4 did
        _compare(rank_result["load"], saved_run, first_step=SAVE_AT)
    # One process, no process group: the same continuation.
    torch.manual_seed(7)
    model = SRATransformer(CONFIG)
    optimizer = build_optimizer(model, CONFIG)
    load_sharded(workdir / "dcp4", model, optimizer)
    rows = slice(0, CONFIG.batch_size)
    steps = [_sra_step(model, model, None, optimizer, s, rows) for s in range(SAVE_AT, STEPS)]
    _compare({"steps": steps, "weights": _weights(model, None)}, saved_run, first_step=SAVE_AT)
    _compare({"steps": steps, "weights": _weights(model, None)}, reference, first_step=SAVE_AT)


def test_uneven_lengths_experts_without_tokens_and_balancers(ranks: tuple) -> None:
    _, _, two = ranks
    torch.manual_seed(3)
    model = Toy()
    initial = _weights(model, None)
    optimizer = torch.optim.SGD(model.parameters(), lr=TOY_LR)
    x = torch.cat([t.reshape(-1, TOY_DIM) for t in toy_tokens()])
    losses = []
    for _ in range(TOY_STEPS):
        y, aux = model(x)
        loss = toy_loss(y, aux, x.shape[0], 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mb.step_balancers(model)
        losses.append(float(loss.detach()))
    for rank_result in two:
        assert rank_result["toy"]["losses"] == pytest.approx(losses, rel=LOSS_TOL)
        assert _rel(rank_result["toy"]["weights"], _weights(model, None), initial) <= WEIGHT_TOL
    biases = {k: v for k, v in _weights(model, None).items() if k.endswith("balancer.bias")}
    assert len(biases) == 2
    assert any(b.abs().sum() > 0 for b in biases.values())
    for rank_result in two:  # sign-rule steps of the global loads: exactly the same
        for key, bias in biases.items():
            assert torch.equal(rank_result["toy"]["weights"][key], bias), key
    # Rank 1 holds experts 2 and 3, which no token chose in the first block.
    assert two[1]["toy"]["local_rows"].tolist() == [0, 0]
    assert two[0]["toy"]["local_rows"].sum() > 0


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="engine must be one of"):
        ParallelConfig(engine="zero3")
    with pytest.raises(ValueError, match="ep_size must be an int >= 1"):
        ParallelConfig(ep_size=0)
    with pytest.raises(TypeError, match="compile_blocks"):  # beartype or our check
        ParallelConfig(compile_blocks=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="blocks must be a module name"):
        ParallelConfig(blocks="")


def test_parallelize_needs_a_process_group() -> None:
    from moeblocks.distributed import parallelize

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"torch\.distributed initialised"):
        parallelize(_sra_model())


def test_local_shard_of_a_dtensor_is_a_writable_view(tmp_path: Path) -> None:
    """local_shard: a plain tensor is itself; a DTensor gives its local piece, a view."""
    from moeblocks.distributed import local_shard

    plain = torch.arange(4.0)
    assert local_shard(plain) is plain
    if dist.is_initialized():
        pytest.skip("needs to own the default process group")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        dt = distribute_tensor(torch.arange(6.0), init_device_mesh("cpu", (1,)), [Replicate()])
        piece = local_shard(dt)
        assert type(piece) is torch.Tensor
        assert torch.equal(piece, torch.arange(6.0))
        piece.add_(1)  # writes through to the DTensor
        assert torch.equal(dt.to_local(), torch.arange(6.0) + 1)
    finally:
        dist.destroy_process_group()
