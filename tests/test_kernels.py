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


@SETTINGS
@given(routed(skews=st.sampled_from(["uniform", "one_expert", "few_experts", "repeats"])), pad_st)
def test_index_equals_build_layout_exactly(case, pad_to):
    T, E, K, skew, seed = case
    experts_TK = make_experts(T, E, K, skew, seed)
    got = kernels.build_index(experts_TK, E, pad_to)
    want = build_layout(experts_TK, E, pad_to)
    for name in ("row_of_slot", "slot_of_row", "counts", "group_sizes", "offsets"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype, name
        assert torch.equal(g, w), name
    for g, w in zip(got, ref.build_index_reference(experts_TK.cpu(), E, pad_to), strict=True):
        assert torch.equal(g.cpu(), w)
    assert int(got.counts.sum()) == T * K
    assert bool((got.group_sizes % pad_to == 0).all())


# ------------------------------------------------- dispatcher vs reference


@SETTINGS
# Float tests keep E <= 64: with many experts padding multiplies the rows (every expert
# rounds up to pad_to), and the interpreter pays for every row. One 1024-expert example.
@given(routed(experts=st.integers(1, 64)), dims_st, st.sampled_from(FLOATS), pad_st)
@example((33, 1024, 8, "uniform", 0), 100, torch.bfloat16, 2)
def test_dispatcher_matches_torch_and_reference(case, D, dtype, pad_to):
    T, E, K, skew, seed = case
    experts_TK = make_experts(T, E, K, skew, seed)
    routing = make_routing(experts_TK, E, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(T, D, generator=gen).to(DEVICE, dtype).requires_grad_()
    w = routing.weights.clone().requires_grad_()

    grouped, layout = TritonDispatcher(pad_to).permute(x, routing)
    grouped_ref, layout_ref = TorchDispatcher(pad_to).permute(x, routing)
    # Permute only copies: bitwise equal in every dtype.
    assert torch.equal(grouped, grouped_ref)
    assert torch.equal(layout.slot_of_row, layout_ref.slot_of_row)

    # Expert outputs: something per row, so a wrong row shows up.
    y = (grouped * 1.5 + 0.25).detach().requires_grad_()
    out = TritonDispatcher(pad_to).unpermute(y, layout, w)
    out_torch = TorchDispatcher(pad_to).unpermute(y, layout, w)
    if dtype == torch.float32:
        assert torch.equal(out, out_torch)
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
    (g_x_torch,) = torch.autograd.grad(grouped_ref, x, g_grouped)
    g_x64 = ref.unpermute_reference(g_grouped.double(), *index)
    g_x_bound = ref.unpermute_reference(g_grouped.double().abs(), *index)
    assert_within(g_x, g_x64, g_x_bound, K)
    if dtype == torch.float32:
        # The torch reference adds the same K copies in another order: same bound.
        assert_within(g_x_torch, g_x64, g_x_bound, K)


@SETTINGS
@given(routed(experts=st.integers(1, 64)), dims_st, st.sampled_from(FLOATS), pad_st)
def test_weighted_permute_and_slot_dot_match_reference(case, D, dtype, pad_to):
    """The two ops only the backward passes use, called directly."""
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
    assert_within(
        dots,
        ref.slot_dot_reference(x.double(), b.double(), *args),
        ref.slot_dot_reference(x.double().abs(), b.double().abs(), *args),
        D,
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
        (lambda: TritonDispatcher(pad_to=0), ValueError, "pad_to"),
        (lambda: TritonDispatcher().permute(x[:1], make_routing(ex, 3, 0)), ValueError, "same T"),
        (
            lambda: TritonDispatcher().permute(x, make_routing(ex.to("meta"), 3, 0)),
            ValueError,
            "routing.experts is on meta",
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
    assert torch.equal(grouped, grouped_ref)
    for name in ("row_of_slot", "slot_of_row", "counts", "group_sizes", "offsets"):
        assert torch.equal(getattr(layout, name), getattr(layout_ref, name)), name
    out = TritonDispatcher(pad_to).unpermute(grouped, layout, routing.weights)
    index = (layout.row_of_slot, layout.slot_of_row, K)
    exact = ref.unpermute_reference(grouped.double(), *index, routing.weights.double())
    bound = ref.unpermute_reference(grouped.double().abs(), *index, routing.weights.double())
    assert_within(out, exact, bound, K)


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
