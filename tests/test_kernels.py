"""Triton permute / unpermute / index kernels against plain-PyTorch references.

Legend: T tokens, E experts, K experts per token, N = T·K slots, R grouped rows (N plus
padding), D model dim.

Without a GPU the kernels run on CPU tensors through Triton's interpreter, which is slow,
so sizes stay small and hypothesis runs a modest number of examples. With a GPU the same
tests run on CUDA with compiled kernels, and the ``gpu`` tests add larger sizes.
"""

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of the kernels: Triton reads it when decorating.
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from triton.runtime.interpreter import InterpretedFunction

from moeblocks import kernels
from moeblocks.dispatch import TorchDispatcher, build_layout
from moeblocks.routing import Routing
from moeblocks.triton_dispatch import AutoDispatcher, TritonDispatcher

ref = kernels.reference
# The package re-exports the function `permute`, which hides the module of that name.
INTERPRETED = isinstance(
    importlib.import_module("moeblocks.kernels.permute")._permute, InterpretedFunction
)
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# The interpreter runs one Python loop per Triton program: 3/5 of the active hypothesis
# profile's examples (15 under the default "ci" profile).
SETTINGS = settings(
    max_examples=max(1, settings.default.max_examples * 3 // 5),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---------------------------------------------------------------- inputs


def make_experts(
    T: int, E: int, K: int, skew: str, seed: int, device: str = DEVICE
) -> torch.Tensor:
    """``[T, K]`` expert ids: distinct per token, except in the "repeats" mode."""
    gen = torch.Generator().manual_seed(seed)
    if skew == "repeats":  # not what a top-k router gives, but the index must cope
        return torch.randint(0, E, (T, K), generator=gen).to(device)
    scores_TE = torch.rand(T, E, generator=gen)
    if skew == "one_expert":  # every token's first choice is expert E-1
        scores_TE[:, -1] += 2
    elif skew == "few_experts":  # only K+1 experts see tokens; the rest stay empty
        scores_TE[:, : min(E, K + 1)] += 2
    return scores_TE.topk(K, dim=1).indices.to(device)


def make_routing(experts_TK: torch.Tensor, E: int, seed: int) -> Routing:
    T, K = experts_TK.shape
    gen = torch.Generator().manual_seed(seed + 1)
    weights_TK = (torch.rand(T, K, generator=gen) + 0.1).to(experts_TK.device)
    zeros_TE = torch.zeros(T, E, device=experts_TK.device)
    return Routing(zeros_TE, zeros_TE, experts_TK, weights_TK)


tokens_st = st.sampled_from([0, 1]) | st.integers(2, 33)
experts_st = st.integers(1, 64) | st.sampled_from([256, 1024])
dims_st = st.integers(1, 130) | st.just(1100)  # 1100: wider than one 1024-column tile
skew_st = st.sampled_from(["uniform", "one_expert", "few_experts"])
pad_st = st.sampled_from([1, 1, 2, 3, 8, 16])


@st.composite
def routed(draw, skews=skew_st, experts=experts_st):
    T, E = draw(tokens_st), draw(experts)
    K = draw(st.integers(1, min(8, E)))
    return T, E, K, draw(skews), draw(st.integers(0, 2**31 - 1))


# ------------------------------------------------------------- tolerances
# The kernels accumulate in float32 (float64 for float64) and round once to the output
# dtype. Against the float64 evaluation of the reference the error is therefore at most
# one rounding of the output (an ulp: the CPU interpreter truncates float32 -> bfloat16
# instead of rounding to nearest, so a whole ulp, not half) plus float32 accumulation
# error, n·2^-24 of the sum of |terms| for n terms in any order (Higham, ch. 4).
_ULP = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 0.0}


def assert_within(
    actual: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, terms: int
) -> None:
    """``|actual - exact| <= (ulp + (terms + 1)·2^-24) · bound`` plus underflow slack."""
    assert actual.shape == exact.shape, (actual.shape, exact.shape)
    rel = _ULP[actual.dtype] + (terms + 1) * 2.0**-24
    slack = torch.finfo(actual.dtype).tiny  # products may underflow to subnormals
    err = (actual.double() - exact.double()).abs()
    limit = rel * bound.double().abs() + slack
    assert bool((err <= limit).all()), f"max excess {(err - limit).max().item():.3g}"


# ------------------------------------------------------------------ index


def assert_index_matches_layout(got: kernels.SlotIndex, want, pad_to: int, E: int) -> None:
    """Exact equality with build_layout up to its R; after it, the kernel's unused tail."""
    N = want.row_of_slot.shape[0]
    used = want.num_rows
    R = kernels.num_rows_bound(N, E, pad_to)
    assert got.slot_of_row.shape == (R,)
    assert torch.is_tensor(got.rows_used)
    assert got.rows_used.shape == ()
    assert int(got.rows_used) == used
    assert torch.equal(got.row_of_slot, want.row_of_slot)
    assert torch.equal(got.slot_of_row[:used], want.slot_of_row)
    assert bool((got.slot_of_row[used:] == -1).all())
    assert torch.equal(got.counts, want.counts)
    assert torch.equal(got.offsets[:-1], want.offsets[:-1])
    assert int(got.offsets[-1]) == R
    # The last segment takes the unused tail, so the sizes sum to R.
    assert torch.equal(got.group_sizes[:-1], want.group_sizes[:-1])
    assert int(got.group_sizes[-1]) == int(want.group_sizes[-1]) + R - used
    for field in got:
        assert field.dtype == torch.long


@SETTINGS
@given(routed(skews=st.sampled_from(["uniform", "one_expert", "few_experts", "repeats"])), pad_st)
def test_index_equals_build_layout_exactly(case, pad_to):
    T, E, K, skew, seed = case
    experts_TK = make_experts(T, E, K, skew, seed)
    got = kernels.build_index(experts_TK, E, pad_to)
    assert_index_matches_layout(got, build_layout(experts_TK, E, pad_to), pad_to, E)
    for g, w in zip(got, ref.build_index_reference(experts_TK.cpu(), E, pad_to), strict=True):
        assert torch.equal(g.cpu(), w)
    assert int(got.counts.sum()) == T * K
    assert bool((got.group_sizes % pad_to == 0).all())


@pytest.mark.parametrize(
    ("T", "E", "K", "pad_to", "dtype"),
    [
        # N = 6000 slots = 47 blocks of 128: three steps of the interpreter's 16-block
        # scan tile (512 on a GPU), with padding and int32 ids.
        (1500, 64, 4, 8, torch.int32),
        # 257 experts: 17 scan programs of 16 bins, the last holding the out-of-range bin.
        (700, 257, 8, 1, torch.int64),
    ],
)
def test_index_at_scale_crosses_scan_blocks(T, E, K, pad_to, dtype):
    experts_TK = make_experts(T, E, K, "one_expert", 7).to(dtype)
    got = kernels.build_index(experts_TK, E, pad_to)
    assert_index_matches_layout(got, build_layout(experts_TK.long(), E, pad_to), pad_to, E)

    # The whole dispatch at this size, gradients included (D = 3 keeps it quick).
    routing = make_routing(experts_TK.long(), E, 7)
    x = torch.randn(T, 3, device=DEVICE, requires_grad=True)
    w = routing.weights.clone().requires_grad_()
    grouped, layout = TritonDispatcher(pad_to).permute(x, routing)
    grouped_ref, layout_ref = TorchDispatcher(pad_to).permute(x, routing)
    assert torch.equal(grouped[: layout_ref.num_rows], grouped_ref)
    out = TritonDispatcher(pad_to).unpermute(grouped.sin(), layout, w)
    out_ref = TorchDispatcher(pad_to).unpermute(grouped_ref.sin(), layout_ref, w)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w), g)
    grads_ref = torch.autograd.grad(out_ref, (x, w), g)
    # float32 sums of K (for x: K, for w: D = 3) products in possibly other orders.
    for a, b in zip((out, *grads), (out_ref, *grads_ref), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_index_out_of_range_ids_stay_in_bounds():
    """Unchecked bad ids (CUDA without sync_checks, or compiled) never leave [0, R)."""
    E, pad_to = 4, 2
    experts_TK = torch.tensor([[0, 5], [-1, 3], [3, 2**33], [1, 0]], device=DEVICE)
    # The op directly: the Python wrapper would raise on these CPU ids.
    index = kernels.SlotIndex(*torch.ops.moeblocks.build_index(experts_TK, E, pad_to))
    N, R = 8, kernels.num_rows_bound(8, E, pad_to)
    assert index.slot_of_row.shape == (R,)
    # Every slot has its own row, inside the tensor; the rows agree both ways.
    assert sorted(index.row_of_slot.tolist()) == sorted(set(index.row_of_slot.tolist()))
    assert bool(((index.row_of_slot >= 0) & (index.row_of_slot < R)).all())
    assert torch.equal(index.slot_of_row[index.row_of_slot], torch.arange(N, device=DEVICE))
    # The valid ids are counted and placed as if the bad ones were not there.
    assert index.counts.tolist() == [2, 1, 0, 2]
    bad = torch.tensor([1, 2, 5], device=DEVICE)  # slots of 5, -1 and 2^33
    assert bool((index.row_of_slot[bad] >= index.rows_used).all())


def test_index_build_has_no_host_sync():
    """Structurally: the count is a device tensor and the op compiles without a break."""
    experts_TK = make_experts(40, 6, 2, "few_experts", 3)
    index = kernels.build_index(experts_TK, 6, pad_to=4)
    assert isinstance(index.rows_used, torch.Tensor)
    assert index.rows_used.device == experts_TK.device
    explanation = torch._dynamo.explain(lambda e: torch.ops.moeblocks.build_index(e, 6, 4))(
        experts_TK
    )
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    # A data-dependent size would need an unbacked symbol in the fake outputs.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(experts_TK)
        shapes = [tuple(t.shape) for t in torch.ops.moeblocks.build_index(fake, 6, 4)]
    assert shapes == [(80,), (kernels.num_rows_bound(80, 6, 4),), (6,), (6,), (7,), ()]


# ------------------------------------------------- dispatcher vs reference


@SETTINGS
# Float tests keep E <= 64: with many experts padding multiplies the rows (every expert
# rounds up to pad_to), and the interpreter pays for every row. One 1024-expert example.
@given(routed(experts=st.integers(1, 64)), dims_st, st.sampled_from(FLOATS), pad_st)
@example((33, 1024, 8, "uniform", 0), 100, torch.bfloat16, 2)
# Found by a CI seed: the torch dispatcher's CPU bmm adds K = 8 products in another order.
@example((2, 8, 8, "uniform", 0), 77, torch.float32, 1)
def test_dispatcher_matches_torch_and_reference(case, D, dtype, pad_to):
    T, E, K, skew, seed = case
    experts_TK = make_experts(T, E, K, skew, seed)
    routing = make_routing(experts_TK, E, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(T, D, generator=gen).to(DEVICE, dtype).requires_grad_()
    w = routing.weights.clone().requires_grad_()

    grouped, layout = TritonDispatcher(pad_to).permute(x, routing)
    grouped_ref, layout_ref = TorchDispatcher(pad_to).permute(x, routing)
    # Permute only copies: bitwise equal in every dtype, up to the torch layout's R;
    # the Triton layout's worst-case tail after it is zero padding.
    used = layout_ref.num_rows
    assert torch.equal(grouped[:used], grouped_ref)
    assert bool((grouped[used:] == 0).all())
    assert torch.equal(layout.slot_of_row[:used], layout_ref.slot_of_row)
    assert torch.equal(layout.row_of_slot, layout_ref.row_of_slot)

    # Expert outputs: something per row, so a wrong row shows up.
    y = (grouped * 1.5 + 0.25).detach().requires_grad_()
    out = TritonDispatcher(pad_to).unpermute(y, layout, w)
    out_torch = TorchDispatcher(pad_to).unpermute(y, layout, w)
    if dtype == torch.float32:
        # Both add the same K float32 products, in possibly different orders (the CPU
        # bmm changes its order with K): each is within (K + 1)·2^-24 of the sum of
        # |terms| from the exact value (Higham, ch. 4), so they differ by at most twice.
        bound = ref.unpermute_reference(
            y.detach().abs().double(), layout.row_of_slot, layout.slot_of_row, K, w.abs().double()
        )
        err = (out.double() - out_torch.double()).abs()
        assert bool((err <= 2 * (K + 1) * 2.0**-24 * bound + torch.finfo(dtype).tiny).all())
    else:
        # The torch reference also rounds the weights to the half type and may add the K
        # products in the half type: up to K + 2 further roundings of half an ulp.
        bound = ref.unpermute_reference(
            y.abs().float(), layout.row_of_slot, layout.slot_of_row, K, w.abs()
        )
        half_ulp = _ULP[dtype] / 2
        err = (out.float() - out_torch.float()).abs()
        assert bool((err <= (2 * half_ulp + (K + 2) * half_ulp) * bound + 1e-4).all())

    # Gradients against the float64 evaluation of the plain references.
    index = (layout.row_of_slot, layout.slot_of_row, K)
    g_out = torch.randn(T, D, generator=gen).to(DEVICE, dtype)
    g_y, g_w = torch.autograd.grad(out, (y, w), g_out)
    y64, w64 = y.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    out64 = ref.unpermute_reference(y64, *index, w64)
    g_y64, g_w64 = torch.autograd.grad(out64, (y64, w64), g_out.double())
    assert_within(out, out64, ref.unpermute_reference(y64.abs(), *index, w64.abs()), K)
    assert_within(g_y, g_y64, g_y64, 1)  # one product per row
    assert_within(g_w, g_w64, ref.slot_dot_reference(g_out.double().abs(), y64.abs(), *index), D)

    g_grouped = torch.randn(grouped.shape, generator=gen).to(DEVICE, dtype)
    (g_x,) = torch.autograd.grad(grouped, x, g_grouped)
    (g_x_torch,) = torch.autograd.grad(grouped_ref, x, g_grouped[:used])
    g_x64 = ref.unpermute_reference(g_grouped.double(), *index)
    g_x_bound = ref.unpermute_reference(g_grouped.double().abs(), *index)
    assert_within(g_x, g_x64, g_x_bound, K)
    if dtype == torch.float32:
        # The torch reference adds the same K copies in another order: same bound.
        assert_within(g_x_torch, g_x64, g_x_bound, K)


@SETTINGS
@given(routed(experts=st.integers(1, 64)), dims_st, st.sampled_from(FLOATS), pad_st)
def test_weighted_permute_and_slot_dot_match_reference(case, D, dtype, pad_to):
    """The ops only the backward passes use, called directly."""
    T, E, K, skew, seed = case
    index = kernels.build_index(make_experts(T, E, K, skew, seed), E, pad_to)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen).to(DEVICE, dtype)
    w = (torch.rand(T, K, generator=gen) - 0.5).to(DEVICE)
    b = torch.randn(index.slot_of_row.shape[0], D, generator=gen).to(DEVICE, dtype)
    args = (index.row_of_slot, index.slot_of_row, K)

    scaled = kernels.permute(x, *args, weights=w)
    exact = ref.permute_reference(x.double(), *args, weights=w.double())
    assert_within(scaled, exact, exact, 1)
    dots = kernels.slot_dot(x, b, *args)
    assert dots.dtype == torch.float32
    dots_exact = ref.slot_dot_reference(x.double(), b.double(), *args)
    dots_bound = ref.slot_dot_reference(x.double().abs(), b.double().abs(), *args)
    assert_within(dots, dots_exact, dots_bound, D)

    # The fused unpermute backward: x plays the output gradient, b the expert outputs.
    grad_b, grad_w = kernels.unpermute_backward(x, b, *args, weights=w)
    assert grad_b.dtype == dtype
    assert grad_w.dtype == torch.float32
    assert_within(grad_b, exact, exact, 1)  # the same weighted permute, padding rows 0
    assert_within(grad_w, dots_exact, dots_bound, D)
    g64, w64 = ref.unpermute_backward_reference(x.double(), b.double(), *args, w.double())
    assert_within(grad_b, g64, g64, 1)
    assert_within(grad_w, w64, dots_bound, D)

    # int32 indices give the same bits (the kernels widen them before any multiply).
    args32 = (index.row_of_slot.int(), index.slot_of_row.int(), K)
    assert torch.equal(kernels.permute(x, *args32, weights=w), scaled)
    assert torch.equal(kernels.unpermute(b, *args32, weights=w), kernels.unpermute(b, *args, w))
    assert all(
        torch.equal(p, q)
        for p, q in zip(kernels.unpermute_backward(x, b, *args32, w), (grad_b, grad_w), strict=True)
    )


# ------------------------------------------------------------ properties


@SETTINGS
@given(tokens_st, st.integers(1, 64), dims_st, st.sampled_from(FLOATS), pad_st, st.integers(0, 99))
def test_unpermute_of_permute_is_identity_for_top1(T, E, D, dtype, pad_to, seed):
    routing = make_routing(make_experts(T, E, 1, "uniform", seed), E, seed)
    x = torch.randn(T, D).to(DEVICE, dtype).requires_grad_()
    dispatcher = TritonDispatcher(pad_to)
    grouped, layout = dispatcher.permute(x, routing)
    out = dispatcher.unpermute(grouped, layout, torch.ones_like(routing.weights))
    assert torch.equal(out, x)  # 1·v is exact in every dtype
    g = torch.randn_like(x)
    (g_x,) = torch.autograd.grad(out, x, g)
    assert torch.equal(g_x, g)


def test_deterministic_across_calls():
    E, K, D = 16, 8, 257
    experts_TK = make_experts(64, E, K, "one_expert", 0)
    routing = make_routing(experts_TK, E, 0)
    x = torch.randn(64, D, device=DEVICE, requires_grad=True)
    w = routing.weights.clone().requires_grad_()
    dispatcher = TritonDispatcher(pad_to=4)
    results = []
    for _ in range(3):
        grouped, layout = dispatcher.permute(x, routing)
        out = dispatcher.unpermute(grouped.sin(), layout, w)
        grads = torch.autograd.grad(out.square().sum(), (x, w))
        results.append(
            (grouped, out, *grads, *[getattr(layout, f) for f in ("row_of_slot", "slot_of_row")])
        )
    for again in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], again, strict=True))


def test_zero_tokens_and_empty_experts():
    dispatcher = TritonDispatcher(pad_to=8)
    routing = make_routing(torch.empty(0, 2, dtype=torch.long, device=DEVICE), 5, 0)
    x = torch.empty(0, 7, device=DEVICE, requires_grad=True)
    grouped, layout = dispatcher.permute(x, routing)
    assert grouped.shape == (0, 7)
    assert layout.counts.tolist() == [0] * 5
    assert layout.offsets.tolist() == [0] * 6
    w = routing.weights.clone().requires_grad_()
    out = dispatcher.unpermute(grouped, layout, w)
    g_x, g_w = torch.autograd.grad(out.sum(), (x, w), allow_unused=True)
    assert out.shape == (0, 7)
    assert g_x.shape == (0, 7)
    assert g_w.shape == (0, 2)


def test_gradcheck_float64():
    """Finite differences through every backward formula, including double backward."""
    T, E, K, D = 3, 3, 2, 2  # every kernel call is a Python loop: keep it tiny
    index = kernels.build_index(make_experts(T, E, K, "uniform", 3), E, pad_to=2)
    args = (index.row_of_slot, index.slot_of_row, K)
    R = index.slot_of_row.shape[0]
    x = torch.randn(T, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = torch.randn(R, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, device=DEVICE, requires_grad=True)
    for fn, inputs in [
        (lambda x, w: kernels.permute(x, *args, weights=w), (x, w)),
        (lambda y, w: kernels.unpermute(y, *args, weights=w), (y, w)),
        (lambda x, y: kernels.slot_dot(x, y, *args), (x, y)),
    ]:
        assert torch.autograd.gradcheck(fn, inputs)
        # Random projections instead of the full Jacobian of the Jacobian: far fewer calls.
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)
    # The fused backward's own backward (what a double backward of unpermute runs).
    g = torch.randn(T, D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    fused = lambda g, y, w: kernels.unpermute_backward(g, y, *args, weights=w)  # noqa: E731
    assert torch.autograd.gradcheck(fused, (g, y, w), fast_mode=True)


# ------------------------------------------------------- torch.library


@pytest.mark.parametrize("pad_to", [1, 4])
def test_opcheck(pad_to):
    T, E, K, D = 7, 5, 3, 11
    experts_TK = make_experts(T, E, K, "uniform", 1)
    index = kernels.build_index(experts_TK, E, pad_to)
    args = (index.row_of_slot, index.slot_of_row, K)
    x = torch.randn(T, D, device=DEVICE, requires_grad=True)
    w = torch.rand(T, K, device=DEVICE, requires_grad=True)
    y = torch.randn(index.slot_of_row.shape[0], D, device=DEVICE, requires_grad=True)
    ops = torch.ops.moeblocks
    torch.library.opcheck(ops.build_index.default, (experts_TK, E, pad_to))
    torch.library.opcheck(ops.permute.default, (x, w, *args))
    torch.library.opcheck(ops.unpermute.default, (y, w, *args))
    torch.library.opcheck(ops.slot_dot.default, (x, y, *args))
    g = torch.randn(T, D, device=DEVICE, requires_grad=True)
    torch.library.opcheck(ops.unpermute_backward.default, (g, y, w, *args))
    if pad_to == 1:
        torch.library.opcheck(ops.permute.default, (x, None, *args))
        torch.library.opcheck(ops.unpermute.default, (y, None, *args))


def _layer(
    x: torch.Tensor, experts_TK: torch.Tensor, w: torch.Tensor, E: int, pad_to: int
) -> torch.Tensor:
    # The ops directly: the dispatcher classes are wrapped by the test suite's beartype
    # import hook, which dynamo cannot trace.
    K = experts_TK.shape[1]
    index = kernels.build_index(experts_TK, E, pad_to)
    grouped = kernels.permute(x, index.row_of_slot, index.slot_of_row, K)
    return kernels.unpermute(grouped * 2.0, index.row_of_slot, index.slot_of_row, K, w)


def _two_layers(x: torch.Tensor, experts_TK: torch.Tensor, w: torch.Tensor, E: int) -> torch.Tensor:
    # Unpadded (static sizes) and padded (a data-dependent row count) in one graph.
    return _layer(x, experts_TK, w, E, 1) + _layer(x, experts_TK, w, E, 8)


def test_compile_fullgraph():
    """Custom ops with explicit fakes compile without graph breaks, padding included."""
    E, K = 6, 2
    experts_TK = make_experts(9, E, K, "few_experts", 5)
    w = torch.rand(9, K, device=DEVICE, requires_grad=True)
    x = torch.randn(9, 19, device=DEVICE, requires_grad=True)
    # dynamic=False: E and pad_to are a layer's constants, not symbolic sizes.
    compiled = torch.compile(_two_layers, fullgraph=True, dynamic=False)
    out = compiled(x, experts_TK, w, E)
    grads = torch.autograd.grad(out.square().sum(), (x, w))
    eager = _two_layers(x, experts_TK, w, E)
    grads_eager = torch.autograd.grad(eager.square().sum(), (x, w))
    assert torch.equal(out, eager)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_eager, strict=True))


# ------------------------------------------------------------ bad inputs


def _bad_calls():
    ex = torch.tensor([[0, 1], [1, 2]])
    idx = build_layout(ex, 3)
    x = torch.randn(2, 4)
    meta = torch.empty(4, dtype=torch.long, device="meta")
    args = (idx.row_of_slot, idx.slot_of_row)
    return [
        (lambda: kernels.build_index(ex.float(), 3), TypeError, "experts must hold integer ids"),
        (lambda: kernels.build_index(ex.bool(), 3), TypeError, "experts must hold integer ids"),
        (
            lambda: kernels.build_index(ex.flatten(), 3),
            ValueError,
            "experts must have 2 dimensions",
        ),
        (
            lambda: kernels.build_index(ex, 2),
            ValueError,
            r"ids in \[0, 2\).*got values in \[0, 2\]",
        ),
        (lambda: kernels.build_index(-ex, 3), ValueError, r"got values in \[-2, 0\]"),
        (
            lambda: kernels.build_index(ex, 3, pad_to=0),
            ValueError,
            "pad_to must be an int >= 1, got 0",
        ),
        (lambda: kernels.build_index(ex, 0), ValueError, "num_experts must be an int >= 1"),
        (
            lambda: kernels.permute(x[0], *args, 2),
            ValueError,
            r"x must have 2 dimensions, got shape \(4,\)",
        ),
        (lambda: kernels.permute(x.long(), *args, 2), TypeError, "x must be float16"),
        (lambda: kernels.permute(x, *args, 3), ValueError, "row_of_slot must have 6 rows"),
        (lambda: kernels.permute(x, *args, 0), ValueError, "top_k must be an int >= 1"),
        (
            lambda: kernels.permute(x, meta, idx.slot_of_row, 2),
            ValueError,
            "row_of_slot is on meta",
        ),
        (
            lambda: kernels.permute(x, *args, 2, weights=torch.ones(2, 3)),
            ValueError,
            r"weights must have shape \(T, K\) = \(2, 2\)",
        ),
        (lambda: kernels.unpermute(x, *args, 2), ValueError, "y must have R = 4 rows"),
        (
            lambda: kernels.slot_dot(x, torch.randn(4, 5), *args, 2),
            ValueError,
            r"b must have shape \(R, D\)",
        ),
        (
            lambda: kernels.unpermute_backward(x, torch.randn(3, 4), *args, 2, torch.ones(2, 2)),
            ValueError,
            r"y must have shape \(R, D\) = \(4, 4\)",
        ),
        (
            lambda: kernels.unpermute_backward(x, torch.randn(4, 4), *args, 2, torch.ones(2)),
            ValueError,
            "weights must have 2 dimensions",
        ),
        (lambda: TritonDispatcher(pad_to=0), ValueError, "pad_to"),
        (lambda: TritonDispatcher().permute(x[:1], make_routing(ex, 3, 0)), ValueError, "same T"),
        (
            lambda: TritonDispatcher().permute(x, make_routing(ex.to("meta"), 3, 0)),
            ValueError,
            "routing.experts is on meta",
        ),
        (  # K is read from weights: a wrong K must blame weights, not row_of_slot (issue 31)
            lambda: TritonDispatcher().unpermute(
                *TritonDispatcher().permute(x, make_routing(ex, 3, 0)), torch.ones(2, 3)
            ),
            ValueError,
            r"^weights must have shape \[T, K\] with T·K = 4 slots .*got \(2, 3\)",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_inputs_raise_clear_errors(case):
    call, error, message = _bad_calls()[case]
    with pytest.raises(error, match=message):
        call()


def test_refuses_cpu_tensors_for_compiled_kernels():
    """A kernel compiled for the GPU (no TRITON_INTERPRET) refuses CPU tensors by name."""
    from triton.runtime.jit import JITFunction

    from moeblocks.kernels._checks import check_launchable

    compiled_kernel = JITFunction(_layer)  # what triton.jit gives without the interpreter
    with pytest.raises(RuntimeError, match=r"x is a CPU tensor.*Set TRITON_INTERPRET=1"):
        check_launchable(compiled_kernel, torch.zeros(1), "x")
    with pytest.raises(RuntimeError, match="x is on device meta, where Triton cannot run"):
        check_launchable(compiled_kernel, torch.zeros(1, device="meta"), "x")


def test_without_triton_installed(monkeypatch):
    import moeblocks.triton_dispatch as triton_dispatch

    monkeypatch.setattr(triton_dispatch, "_triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match="needs the 'triton' package"):
        TritonDispatcher()
    auto = AutoDispatcher()  # still works: torch reference everywhere
    routing = make_routing(torch.tensor([[1], [0]]), 2, 0)
    _, layout = auto.permute(torch.randn(2, 3), routing)
    assert layout.counts.tolist() == [1, 1]


def test_auto_uses_torch_on_cpu():
    routing = make_routing(make_experts(6, 4, 2, "uniform", 0, device="cpu"), 4, 0)
    x = torch.randn(6, 5, dtype=torch.bfloat16)
    grouped, layout = AutoDispatcher(pad_to=2).permute(x, routing)
    out = AutoDispatcher(pad_to=2).unpermute(grouped, layout, routing.weights)
    expected = TorchDispatcher(pad_to=2)
    assert torch.equal(out, expected.unpermute(*expected.permute(x, routing), routing.weights))


# ------------------------------------------------------------------- GPU


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("pad_to", [1, 128])
def test_gpu_large_matches_torch(pad_to):
    T, E, K, D = 4096, 256, 8, 1000
    experts_TK = make_experts(T, E, K, "uniform", 0, device="cuda")
    routing = make_routing(experts_TK, E, 0)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    grouped, layout = TritonDispatcher(pad_to).permute(x, routing)
    grouped_ref, layout_ref = TorchDispatcher(pad_to).permute(x, routing)
    used = layout_ref.num_rows
    assert torch.equal(grouped[:used], grouped_ref)
    index = kernels.build_index(experts_TK, E, pad_to)
    assert_index_matches_layout(index, layout_ref, pad_to, E)  # N = 32768: 64 GPU scan steps
    out = TritonDispatcher(pad_to).unpermute(grouped, layout, routing.weights)
    index = (layout.row_of_slot, layout.slot_of_row, K)
    exact = ref.unpermute_reference(grouped.double(), *index, routing.weights.double())
    bound = ref.unpermute_reference(grouped.double().abs(), *index, routing.weights.double())
    assert_within(out, exact, bound, K)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("pad_to", [1, 16])
def test_gpu_dispatch_has_no_host_sync(pad_to):
    """Index build, permute, unpermute and both backward passes never sync the host."""
    E, K = 64, 4
    experts_TK = make_experts(2048, E, K, "uniform", 2, device="cuda")
    routing = make_routing(experts_TK, E, 2)
    x = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = routing.weights.clone().requires_grad_()
    dispatcher = TritonDispatcher(pad_to)

    def step():
        grouped, layout = dispatcher.permute(x, routing)
        out = dispatcher.unpermute(grouped * 2, layout, w)
        return torch.autograd.grad(out.float().square().sum(), (x, w))

    step()  # the autotuner times its tiles on the first launch (a sync, once per shape)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@gpu
def test_gpu_compile_and_auto():
    E, K = 64, 4
    experts_TK = make_experts(512, E, K, "one_expert", 1, device="cuda")
    routing = make_routing(experts_TK, E, 1)
    x = torch.randn(512, 300, device="cuda", requires_grad=True)
    compiled = torch.compile(_layer, fullgraph=True, dynamic=False)
    out = compiled(x, experts_TK, routing.weights, E, 16)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    eager = _layer(x, experts_TK, routing.weights, E, 16)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), x)
    assert torch.equal(out, eager)
    assert torch.equal(g, g_eager)
    grouped, layout = AutoDispatcher().permute(x, routing)
    out_auto = AutoDispatcher().unpermute(grouped, layout, routing.weights)
    assert torch.equal(out_auto, TritonDispatcher().unpermute(grouped, layout, routing.weights))
