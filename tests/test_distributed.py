"""Expert parallelism on CPU/gloo against one process that holds every expert.

Legend: P ranks, E experts, L = E / P experts per rank, T tokens, D model dim.

Each world size (2 and 4) is launched once, as P subprocesses on loopback that run every
scenario below and save what they saw (module-scoped fixtures). The tests then compare
those results here with the single-process layer on the concatenated batch: outputs,
aux losses, input gradients, router gradients (summed over ranks) and each rank's
expert-shard gradients against the matching slice of the full layer's. The ranks run
under the same jaxtyping/beartype import hook as the rest of the suite.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import moeblocks as mb
from moeblocks.distributed import (
    AllToAllDispatcher,
    GroupReducedLoss,
    all_reduce_gradients,
    clip_grad_norm_,
    expert_parallelize,
    full_state_dict,
    load_full_state_dict,
    make_expert_parallel_groups,
    reduce_aux_losses,
    shard_experts,
)

D, F = 12, 10  # model and expert hidden dims
LR = 0.1  # SGD step of the expert × data-parallel case
LAUNCH_TIMEOUT_S = 600  # a hang guard, not a speed test: a busy 2-core machine runs 5-10x slower

# The expert path runs in float64 and sees the same rows in the same order as the single
# process, but the router computes scores, probabilities and the aux-loss statistics in
# float32 by design (routers.py), and those sums run per rank and then across ranks
# instead of over the whole batch at once, so they round differently (~1e-7 relative).
# 1e-5 of the largest value leaves a 100x margin; the absolute floor covers entries that
# are zero in the reference.
REL_TOL, ABS_TOL = 1e-5, 1e-9


@dataclass(frozen=True)
class Case:
    """One scenario: layer config and tokens per rank (index = global rank)."""

    name: str
    scorer: str  # "cosine" or "linear"
    bank: str  # "swiglu" or "gelu"
    k: int
    tokens: tuple[int, ...]
    num_experts: int = 8
    skew: bool = False  # every token prefers the experts of the last expert-parallel rank
    masked: bool = False  # a random padding mask for the aux losses
    ep_size: int = 0  # 0: all ranks form one expert-parallel group


CASES = {
    2: [
        Case("random", "cosine", "swiglu", 2, (5, 7), masked=True),
        Case("skewed", "linear", "gelu", 2, (4, 6), skew=True),
        Case("empty", "linear", "swiglu", 1, (0, 6)),
    ],
    4: [
        Case("random", "cosine", "swiglu", 2, (5, 7, 3, 6), masked=True),
        Case("skewed", "linear", "gelu", 2, (4, 3, 5, 2), skew=True),
        Case("empty", "linear", "swiglu", 1, (6, 0, 4, 0)),
        Case("hybrid", "cosine", "swiglu", 2, (3, 5, 4, 2), masked=True, ep_size=2),
    ],
}
LOAD_CASE = Case("load", "linear", "swiglu", 2, (4, 5))  # checkpoint 1 -> 2


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def build_layer(case: Case, seed: int) -> mb.MoELayer:
    """The full single-process layer of a case, in float64, identical on every rank."""
    torch.manual_seed(seed)
    E = case.num_experts
    if case.scorer == "cosine":
        scorer: mb.Scorer = mb.CosineScorer(D, E)
    else:
        scorer = mb.LinearScorer(D, E)
    bank = (mb.SwiGLUExperts if case.bank == "swiglu" else mb.GELUExperts)(E, D, F)
    # Weight 1 so the aux-loss gradients weigh as much as the task gradients.
    losses: dict[str, mb.AuxLoss] = {
        "balance": mb.LoadBalanceLoss(1.0),
        "cv": mb.CVSquaredLoss(1.0),
        "band": mb.BandpassLoss(0.1, 0.14, 1.0),  # uniform usage is 1/8 = 0.125
        "z": mb.ZLoss(1.0),
    }
    if case.scorer == "cosine":
        losses["dispersion"] = mb.DispersionLoss(1.0)
    layer = mb.MoELayer(mb.Router(scorer, schedule=case.k), mb.TorchDispatcher(), bank, losses)
    layer = layer.double()
    if case.skew:
        assert isinstance(scorer, mb.LinearScorer)
        P = case.ep_size or len(case.tokens)
        favoured = torch.arange(E) >= E - E // P  # the last rank's experts
        with torch.no_grad():
            scorer.weight_ED.mul_(0.1)
            scorer.weight_ED[:, 0] += torch.where(favoured, 5.0, -5.0).double()
    return layer


Inputs = tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor]]


def case_inputs(case: Case) -> Inputs:
    """Tokens, masks and output gradients of every rank."""
    gen = torch.Generator().manual_seed(_seed(case.name) + 1)
    xs, masks, grads = [], [], []
    for T in case.tokens:
        x = torch.randn(T, D, generator=gen, dtype=torch.float64)
        if case.skew:
            x = 0.3 * x
            x[:, 0] += 2.0  # along the direction the favoured experts score high
        xs.append(x)
        masks.append(torch.rand(T, generator=gen) < 0.7 if case.masked else None)
        grads.append(torch.randn(T, D, generator=gen, dtype=torch.float64))
    return xs, masks, grads


# ---------------------------------------------------------------------------- ranks


def _run_case(case: Case, rank: int, world: int) -> dict:
    groups = make_expert_parallel_groups(case.ep_size) if case.ep_size else None
    layer = build_layer(case, _seed(case.name))
    expert_parallelize(layer, None if groups is None else groups.ep)
    reduce_aux_losses(layer)
    seen: list[torch.Tensor] = []
    layer.experts.register_forward_pre_hook(lambda _m, args: seen.append(args[1].clone()))
    xs, masks, grads = case_inputs(case)
    x = xs[rank].clone().requires_grad_(True)
    out = layer(x, mask=masks[rank])
    ((out.out * grads[rank]).sum() + out.total_aux_loss()).backward()
    result = {
        "out": out.out.detach(),
        "aux": {n: v.detach() for n, v in out.aux_losses.items()},
        "x_grad": x.grad,
        "local_group_sizes": seen[0],
    }
    if groups is not None:
        all_reduce_gradients(layer, groups)
        result["grad_norm"] = clip_grad_norm_(layer, 1e9, groups)  # large: leaves grads as is
        result["groups"] = (groups.ep_rank, groups.ep_size, groups.dp_rank, groups.dp_size)
    result["grads"] = {n: p.grad.clone() for n, p in layer.named_parameters()}
    if groups is not None:
        with torch.no_grad():
            for p in layer.parameters():
                p -= LR * p.grad
        result["full_state"] = full_state_dict(layer)
    return result


def _run_load(rank: int, workdir: Path) -> dict:
    source = torch.load(workdir / "load_source.pt")
    layer = expert_parallelize(build_layer(LOAD_CASE, seed=1234))  # other weights
    load_full_state_dict(layer, source)
    xs, _, _ = case_inputs(LOAD_CASE)
    reduce_aux_losses(layer)
    result = {
        "local_state": layer.state_dict(),
        "full_state": full_state_dict(layer),
        "out": layer(xs[rank]).out.detach(),
        # A copy shares the process groups and gives the same output.
        "copy_out": copy.deepcopy(layer)(xs[rank]).out.detach(),
    }
    bad = {k: v[:-2] if k.startswith("experts.") else v for k, v in source.items()}
    with pytest.raises(ValueError, match="must hold the layer's 8 experts") as err:
        load_full_state_dict(layer, bad)
    result["bad_load_error"] = str(err.value)
    return result


def _run_errors() -> dict:
    layer = build_layer(Case("odd", "linear", "swiglu", 1, (1, 1, 1, 1), num_experts=6), 0)
    errors = {}
    for what, call in [
        ("dispatcher", lambda: AllToAllDispatcher().local_experts(6)),
        ("parallelize", lambda: expert_parallelize(layer)),
        ("groups", lambda: make_expert_parallel_groups(3)),
    ]:
        with pytest.raises(ValueError, match="divis") as err:  # the messages are checked below
            call()
        errors[what] = str(err.value)
    errors["layer_untouched"] = layer.experts.num_experts == 6
    return errors


def _rank_main(workdir: Path) -> None:
    """Entry point of one rank (see ``_launch``)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=LAUNCH_TIMEOUT_S)
    )
    try:
        results = {case.name: _run_case(case, rank, world) for case in CASES[world]}
        if world == 2:
            results["load"] = _run_load(rank, workdir)
        else:
            results["errors"] = _run_errors()
        torch.save(results, workdir / f"rank{rank}.pt")
        del results
        # No rank tears its connections down while another is still in a collective
        # (see tests/gloo.py); after a failure the test process stops the others.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    assert not left, f"threads left after the shutdown: {left}"


# ------------------------------------------------------------------------- launcher


def _launch(world: int, workdir: Path) -> list[dict]:
    """Run ``world`` ranks of this file on loopback, like ``torchrun``; return their results."""
    # The hook goes in before this file (and so moeblocks) is imported in the rank.
    code = (
        "from jaxtyping import install_import_hook; "
        "install_import_hook('moeblocks', 'beartype.beartype'); "
        f"import runpy; runpy.run_path({str(Path(__file__))!r}, run_name='__main__')"
    )
    # Only here: the ranks run this file without tests/ on the path.
    from gloo import agent_store, wait_all

    root = Path(__file__).resolve().parent.parent
    procs, logs = [], []
    with agent_store(world) as env:
        for rank in range(world):
            logs.append(workdir / f"rank{rank}.log")
            with logs[-1].open("w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", code, str(workdir)],
                        env={**env, "RANK": str(rank)},
                        cwd=root,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        wait_all(procs, LAUNCH_TIMEOUT_S)
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        tails = "\n".join(f"--- rank {r}:\n{logs[r].read_text()[-3000:]}" for r in failed)
        pytest.fail(f"ranks {failed} of {world} failed or timed out:\n{tails}")
    return [torch.load(workdir / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def ranks2(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    workdir = tmp_path_factory.mktemp("ep2")
    torch.save(build_layer(LOAD_CASE, _seed("load")).state_dict(), workdir / "load_source.pt")
    return _launch(2, workdir)


@pytest.fixture(scope="module")
def ranks4(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _launch(4, tmp_path_factory.mktemp("ep4"))


@pytest.fixture(params=[2, 4], ids=["P2", "P4"])
def ranks(request: pytest.FixtureRequest) -> list[dict]:
    return request.getfixturevalue(f"ranks{request.param}")


# ---------------------------------------------------------------------------- tests


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= REL_TOL * scale + ABS_TOL, f"{what}: max error {err:.3g}, scale {scale:.3g}"


def reference(case: Case) -> tuple[mb.MoELayer, mb.MoEOutput, torch.Tensor]:
    """The full layer on the concatenated batch, after backward of the global objective.

    Every rank adds the (globally reduced, so identical) aux losses to its own loss, so
    the sum of the ranks' objectives holds them W times.
    """
    layer = build_layer(case, _seed(case.name))
    xs, masks, grads = case_inputs(case)
    x = torch.cat(xs).requires_grad_(True)
    mask = torch.cat(masks) if case.masked else None
    out = layer(x, mask=mask)
    world = len(case.tokens)
    ((out.out * torch.cat(grads)).sum() + world * out.total_aux_loss()).backward()
    return layer, out, x


def _rank_rows(case: Case, rank: int) -> slice:
    start = sum(case.tokens[:rank])
    return slice(start, start + case.tokens[rank])


def _expert_rows(case: Case, rank: int) -> slice:
    P = case.ep_size or len(case.tokens)
    L = case.num_experts // P
    return slice(rank % P * L, (rank % P + 1) * L)


@pytest.mark.parametrize("name", ["random", "skewed", "empty"])
def test_matches_single_process(ranks: list[dict], name: str) -> None:
    world = len(ranks)
    case = next(c for c in CASES[world] if c.name == name)
    ref, out, x = reference(case)
    for rank, res in enumerate(ranks):
        rows = _rank_rows(case, rank)
        r = res[name]
        assert_close(r["out"], out.out[rows], f"rank {rank} output")
        assert_close(r["x_grad"], x.grad[rows], f"rank {rank} input grad")
        assert r["aux"].keys() == out.aux_losses.keys()
        for loss_name, value in out.aux_losses.items():
            assert_close(r["aux"][loss_name], value, f"rank {rank} aux loss {loss_name}")
        for pname, p in ref.experts.named_parameters():
            local = r["grads"][f"experts.{pname}"]
            assert_close(local, p.grad[_expert_rows(case, rank)], f"rank {rank} grad {pname}")
    for pname, p in ref.router.named_parameters():
        total = sum(res[name]["grads"][f"router.{pname}"] for res in ranks)
        assert_close(total, p.grad, f"router grad {pname} summed over ranks")


def test_skewed_case_sends_everything_to_one_rank(ranks: list[dict]) -> None:
    # Guard on the scenario itself: ranks 0..P-2 receive no row at all.
    received = [int(res["skewed"]["local_group_sizes"].sum()) for res in ranks]
    routed = sum(CASES[len(ranks)][1].tokens) * 2
    assert received == [0] * (len(ranks) - 1) + [routed]


def test_empty_case_has_a_rank_without_tokens(ranks: list[dict]) -> None:
    case = next(c for c in CASES[len(ranks)] if c.name == "empty")
    assert 0 in case.tokens
    for rank, res in enumerate(ranks):
        assert res["empty"]["out"].shape == (case.tokens[rank], D)


def test_expert_and_data_parallel_gradients(ranks4: list[dict]) -> None:
    """ep 2 x dp 2: after all_reduce_gradients every rank holds the global-mean gradient,
    and clip_grad_norm_ sees the norm of the whole model's gradient."""
    case = CASES[4][-1]
    ref, out, _ = reference(case)
    world = len(ranks4)
    norm = torch.stack([(p.grad / world).norm() for p in ref.parameters()]).norm()
    for rank, res in enumerate(ranks4):
        r = res["hybrid"]
        assert r["groups"] == (rank % 2, 2, rank // 2, 2)
        assert_close(r["grad_norm"], norm, f"rank {rank} global grad norm")
        assert_close(r["out"], out.out[_rank_rows(case, rank)], f"rank {rank} output")
        for loss_name, value in out.aux_losses.items():
            assert_close(r["aux"][loss_name], value, f"rank {rank} aux loss {loss_name}")
        for pname, p in ref.named_parameters():
            expected = p.grad / world
            if pname.startswith("experts."):
                expected = expected[_expert_rows(case, rank)]
            assert_close(r["grads"][pname], expected, f"rank {rank} synced grad {pname}")


def test_checkpoint_four_ranks_to_one(ranks4: list[dict]) -> None:
    case = CASES[4][-1]
    ref, _, _ = reference(case)
    with torch.no_grad():
        for p in ref.parameters():
            p -= LR * p.grad / len(ranks4)
    single = build_layer(case, seed=99)
    load_full_state_dict(single, ranks4[0]["hybrid"]["full_state"])
    for key, value in ref.state_dict().items():
        for rank, res in enumerate(ranks4):  # every replica saves the same full state
            assert_close(res["hybrid"]["full_state"][key], value, f"rank {rank} saved {key}")
        assert_close(single.state_dict()[key], value, f"loaded {key}")


def test_checkpoint_one_rank_to_two(ranks2: list[dict]) -> None:
    source = build_layer(LOAD_CASE, _seed("load"))
    xs, _, _ = case_inputs(LOAD_CASE)
    for rank, res in enumerate(ranks2):
        r = res["load"]
        for key, value in source.state_dict().items():
            expected = value[rank * 4 : (rank + 1) * 4] if key.startswith("experts.") else value
            assert torch.equal(r["local_state"][key], expected), f"rank {rank} shard {key}"
            assert torch.equal(r["full_state"][key], value), f"rank {rank} gathered {key}"
        assert_close(r["out"], source(xs[rank]).out.detach(), f"rank {rank} output")
        assert torch.equal(r["copy_out"], r["out"])
        assert "got shape (6, 12, 20)" in r["bad_load_error"]


def test_indivisible_experts_raise_on_ranks(ranks4: list[dict]) -> None:
    errors = ranks4[0]["errors"]
    expected = "num_experts (6) must be divisible by the expert-parallel group size (4)"
    assert expected in errors["dispatcher"]
    assert "group size (4)" in errors["parallelize"]
    assert errors["layer_untouched"], "a failed expert_parallelize must leave the layer whole"
    assert "ep_size must be a positive divisor of the world size 4, got 3" in errors["groups"]


# -------------------------------------------------------------- single-process tests


def test_shard_experts_slices_every_tensor() -> None:
    torch.manual_seed(0)
    bank = mb.GELUExperts(6, D, F, backend="loop")
    shard = shard_experts(bank, rank=1, ep_size=3)
    assert type(shard) is mb.GELUExperts
    assert (shard.num_experts, bank.num_experts) == (2, 6)
    for name, t in bank.state_dict().items():
        assert torch.equal(shard.state_dict()[name], t[2:4])
        assert shard.state_dict()[name].data_ptr() != t.data_ptr()
    rows = torch.randn(5, D)
    full = bank(rows, torch.tensor([0, 0, 2, 3, 0, 0]))
    assert torch.equal(shard(rows, torch.tensor([2, 3])), full)


def test_shard_experts_rejects_bad_arguments() -> None:
    bank = mb.SwiGLUExperts(6, D, F)
    with pytest.raises(ValueError, match=r"num_experts \(6\) must be divisible by ep_size \(4\)"):
        shard_experts(bank, rank=0, ep_size=4)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 3\), got 3"):
        shard_experts(bank, rank=3, ep_size=3)


def test_distributed_pieces_need_an_initialised_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        AllToAllDispatcher()
    with pytest.raises(ValueError, match="must contain an MoELayer"):
        expert_parallelize(torch.nn.Linear(2, 2))


def test_group_reduced_loss_rejects_unknown_losses() -> None:
    class Custom(torch.nn.Module):
        weight = 1.0

        def forward(self, routing: mb.Routing, router: object, mask: None = None) -> torch.Tensor:
            return routing.probs.sum()

    with pytest.raises(TypeError, match="got Custom"):
        GroupReducedLoss(Custom())


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
