"""Mutation testing: plant realistic single-point bugs one at a time; do the tests catch them?

Usage (from the repository root; see CONTRIBUTING.md, "Mutation testing")::

    python tests/mutation/run.py                  # every mutant
    python tests/mutation/run.py --only dispatch,kernels  # names starting so
    python tests/mutation/run.py --list           # print the list, run nothing

The library (``moeblocks/``, ``kernels/src/`` as ``moeblocks/kernels/``) and ``tests/``
are copied to a temporary folder once; each mutant replaces one exact piece of one file
there (the piece must occur exactly once), runs the few test files that cover it with
``-x`` in a fresh pytest started in the copy (whose root comes first on ``sys.path``, so
the copy is what is imported, also by the ranks of multi-process tests), and puts the
file back. The working tree is never touched. A mutant is *killed* when pytest fails;
an error in collection counts as killed too, which is why each mutant keeps the code
valid Python. The kill rate counts the mutants not marked ``equivalent`` (a change that
cannot alter behaviour: no test can kill it).

Not collected by pytest (no ``test_`` prefix) and not run in CI: a full run takes about
20-25 minutes on 2 busy cores. Add a mutant for every bug a review finds that the suite
missed, with the tests that should have caught it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 900  # per mutant: a hang (a rank waiting forever) counts as killed, and says so


@dataclass(frozen=True)
class Mutant:
    """One planted bug: replace ``old`` by ``new`` in ``path`` and run ``tests``."""

    name: str  # "<area>-<what>"
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    why: str  # the bug, in words
    equivalent: bool = False  # cannot change behaviour (excluded from the rate)


def _m(name: str, path: str, old: str, new: str, tests: str, why: str, **kw: object) -> Mutant:
    return Mutant(name, path, old, new, tuple(shlex.split(tests)), why, **kw)  # type: ignore[arg-type]


G, R, B, D = (
    "moeblocks/gating.py",
    "moeblocks/routers.py",
    "moeblocks/balancing.py",
    "moeblocks/dispatch.py",
)
L, X, Y = "moeblocks/losses.py", "moeblocks/experts.py", "moeblocks/layer.py"
REF = "tests/test_blocks_reference.py tests/test_layer_reference.py"
MUTANTS: list[Mutant] = [
    # --- routers and gating
    _m(
        "gating-renorm-detached",
        G,
        "total_T1 = gates.sum(dim=-1, keepdim=True)",
        "total_T1 = gates.sum(dim=-1, keepdim=True).detach()",
        f"tests/test_routers.py {REF}",
        "renormalisation without gradient through the sum",
    ),
    _m(
        "gating-renorm-k1",
        G,
        'self.renormalize == "k>1" and K > 1',
        'self.renormalize == "k>1" and K >= 1',
        f"tests/test_routers.py {REF}",
        "k>1 policy renormalises at K=1 (weight 1, no router gradient)",
    ),
    _m(
        "gating-softmax-topk-axis",
        G,
        "torch.softmax(logits.gather(1, experts), dim=-1)",
        "torch.softmax(logits.gather(1, experts), dim=0)",
        REF,
        "GPT-OSS softmax over tokens",
    ),
    _m(
        "gating-group-score-max",
        G,
        "key_TGS.topk(self.group_score_k, dim=-1).values.sum(-1)",
        "key_TGS.topk(self.group_score_k, dim=-1).values.amax(-1)",
        REF,
        "DeepSeek-V3 group score: max instead of the sum of the top scores",
    ),
    _m(
        "routers-cosine-unnormalised-anchors",
        R,
        "a_ED = F.normalize(self.anchors_ED.float(), dim=-1, eps=self.eps)",
        "a_ED = self.anchors_ED.float()",
        "tests/test_routers.py",
        "anchors not L2-normalised",
    ),
    _m(
        "routers-cosine-signed-tau",
        R,
        "self.temperature.float().abs() * (x_TD",
        "self.temperature.float() * (x_TD",
        f"tests/test_routers.py {REF}",
        "|τ| without the abs (differs for τ < 0 only)",
    ),
    _m(
        "routers-linear-no-bias",
        R,
        "self.weight_ED.to(dtype), bias)",
        "self.weight_ED.to(dtype), None)",
        f"tests/test_routers.py {REF} tests/test_hf_convert.py",
        "router bias dropped",
    ),
    # --- balancing
    _m(
        "balancing-sign",
        B,
        "torch.sign(load.mean() - load)",
        "torch.sign(load - load.mean())",
        "tests/test_balancing.py",
        "bias moves away from balance",
    ),
    _m(
        "balancing-no-reset",
        B,
        "        self.load.zero_()\n",
        "",
        "tests/test_balancing.py",
        "loads accumulate across updates",
    ),
    _m(
        "balancing-no-group-sum",
        B,
        "dist.all_reduce(load, group=self.group)",
        "load.mul_(1)",
        "tests/test_balancing.py",
        "each rank updates from its local loads",
    ),
    # --- dispatch (torch reference and Triton kernels)
    _m(
        "dispatch-padding-mask",
        D,
        "w_R1 = w_R1.masked_fill(slot_of_row_R < 0, 0).unsqueeze(1)",
        "w_R1 = w_R1.unsqueeze(1)",
        "tests/test_dispatch.py tests/test_padding_gradients.py",
        "padding rows get slot 0's weight in the unpermute backward (issue 33)",
    ),
    _m(
        "dispatch-permute-grad-first-copy",
        D,
        "return grad_TKD.sum(1), None, None, None",
        "return grad_TKD[:, 0], None, None, None",
        "tests/test_dispatch.py",
        "permute backward keeps only the first of K copies",
    ),
    _m(
        "dispatch-overpad",
        D,
        "group_sizes_E = (counts_E + pad_to - 1) // pad_to * pad_to",
        "group_sizes_E = (counts_E + pad_to) // pad_to * pad_to",
        "tests/test_dispatch.py tests/test_padding_gradients.py tests/test_layer.py",
        "a full segment gets pad_to extra rows",
    ),
    _m(
        "kernels-padding-not-zeroed",
        "kernels/src/_tiles.py",
        "padding = (rows < R) & (slot < 0)",
        "padding = (rows < R) & (slot < -1)",
        "tests/test_padding_gradients.py -k triton",
        "Triton kernels never zero padding rows",
    ),
    _m(
        "kernels-fused-backward-zeroes-y",
        "kernels/src/unpermute_backward.py",
        "slot_of_row_ptr, grad_y_ptr, block - tl.cdiv(T, BLOCK_ROWS)",
        "slot_of_row_ptr, y_ptr, block - tl.cdiv(T, BLOCK_ROWS)",
        "tests/test_padding_gradients.py -k triton",
        "fused unpermute backward zeroes the wrong tensor's padding rows",
    ),
    # --- experts and the grouped matmul
    _m(
        "experts-no-out-bias",
        X,
        "return _add_row_bias(out, self.b_out_ED, group_sizes)",
        "return out",
        f"tests/test_experts.py {REF}",
        "b_out never added",
    ),
    _m(
        "grouped-exclusive-offsets",
        "moeblocks/grouped.py",
        "offs_E = group_sizes_E.cumsum(0).to(torch.int32)",
        "offs_E = (group_sizes_E.cumsum(0) - group_sizes_E).to(torch.int32)",
        "tests/test_experts.py",
        "grouped_mm gets segment starts instead of ends",
    ),
    # --- losses
    _m(
        "losses-load-balance-no-E",
        L,
        "return E * (f_E.detach() * stats.mean_probs).sum()",
        "return (f_E.detach() * stats.mean_probs).sum()",
        "tests/test_losses.py",
        "Switch loss without E",
    ),
    _m(
        "losses-cv-unbiased",
        L,
        "P_E.var(unbiased=False)",
        "P_E.var(unbiased=True)",
        "tests/test_losses.py",
        "CV² with the sample variance",
    ),
    _m(
        "losses-bandpass-E",
        L,
        "penalty = P_E.shape[0] ** 2 *",
        "penalty = P_E.shape[0] *",
        "tests/test_losses.py",
        "bandpass scaled by E instead of E²",
    ),
    _m(
        "losses-z-unsquared",
        L,
        "dim=-1).square(), mask)",
        "dim=-1).abs(), mask)",
        "tests/test_losses.py",
        "z-loss of |logsumexp| instead of its square",
    ),
    _m(
        "losses-sequence-no-K",
        L,
        "f_BE = slots_TE.view(B, S, E).sum(1) * E / (K * n_B1)",
        "f_BE = slots_TE.view(B, S, E).sum(1) * E / n_B1",
        "tests/test_losses_arch.py",
        "sequence balance loss not divided by K",
    ),
    _m(
        "losses-dispersion-diagonal",
        L,
        "/ (E * (E - 1))",
        "/ (E * E)",
        "tests/test_losses.py",
        "dispersion averaged over the diagonal too",
    ),
    # --- the layer, shared experts, capacity
    _m(
        "layer-shared-replaces",
        Y,
        "out_TD = out_TD + self.shared(tokens_TD)",
        "out_TD = self.shared(tokens_TD)",
        f"{REF} tests/test_layer.py",
        "shared experts replace the routed output",
    ),
    _m(
        "layer-dropped-combined",
        Y,
        "kept_TK if routing.dropped is None else kept_TK.masked_fill(routing.dropped, 0)",
        "kept_TK",
        REF,
        "with input weighting, dropped copies still reach the output",
    ),
    _m(
        "capacity-floor",
        "moeblocks/capacity.py",
        "return math.ceil(self.factor * group_tokens * top_k / num_experts)",
        "return int(self.factor * group_tokens * top_k / num_experts)",
        f"{REF} tests/test_layer.py",
        "capacity rounded down",
    ),
    _m(
        "shared-ungated",
        "moeblocks/shared.py",
        "out_TD = torch.sigmoid(tokens @ self.gate_D.to(tokens.dtype))",
        "out_TD = (tokens @ self.gate_D.to(tokens.dtype))",
        f"{REF} tests/test_hf_convert.py",
        "shared gate without its sigmoid",
    ),
    # --- Hugging Face converter
    _m(
        "hf-gpt-oss-interleave",
        "moeblocks/hf/convert.py",
        "_copy(bank.w_in_EDF2, torch.cat([gu[..., 0::2], gu[..., 1::2]], dim=-1))",
        "_copy(bank.w_in_EDF2, torch.cat([gu[..., 1::2], gu[..., 0::2]], dim=-1))",
        "tests/test_hf_convert.py",
        "GPT-OSS gate and up swapped",
    ),
    _m(
        "hf-qwen-always-renormalise",
        "moeblocks/hf/convert.py",
        'router = _softmax_router(gate, "always" if gate.norm_topk_prob else "never")',
        'router = _softmax_router(gate, "always")',
        "tests/test_hf_convert.py",
        "Qwen-MoE norm_topk_prob=False ignored",
    ),
    _m(
        "hf-group-fill-ignored",
        G,
        "key.masked_fill(~allowed_TE, self.dropped_fill)",
        "key.masked_fill(~allowed_TE, -math.inf)",
        "tests/test_group_fill.py",
        "AXK-2's zero fill of the dropped groups treated as −inf",
    ),
    _m(
        "hf-routed-input-norm-skipped",
        Y,
        "routed_in = self.routed_input_norm(tokens_TD)",
        "routed_in = tokens_TD",
        "tests/test_branch_parts.py",
        "the routed experts see the raw tokens (Gemma-4's pre_feedforward_layernorm_2 lost)",
    ),
    _m(
        "hf-norm-gemma-weight-order",
        "moeblocks/norms.py",
        'if self.weight_dtype == "input":',
        'if self.weight_dtype != "weight":',  # the "compute" order takes the "input" one
        "tests/test_rms_norm.py",
        "Gemma's norm weight applied after the cast back (rounds apart in a float64 model)",
    ),
    _m(
        "hf-norm-llama-weight-order",
        "moeblocks/norms.py",
        "return scale.to(x.dtype) * normed.to(x.dtype)",
        "return (normed * scale.to(cdt)).to(x.dtype)",
        "tests/test_rms_norm.py",
        "AXK-1's (Llama's) norm weight applied before the cast back",
    ),
    _m(
        "hf-normed-experts-input-norm-ids",
        X,
        "grouped = self.input_norm(grouped, expert_R)",
        "grouped = self.input_norm(grouped, torch.zeros_like(expert_R))",
        "tests/test_branch_parts.py",
        "every row going in normalised with expert 0's scale",
    ),
    _m(
        "hf-inline-tap-records-logits",
        "moeblocks/hf/swap.py",
        'if self.family.inline.records == "probs":',
        'if self.family.inline.records == "logits":',
        "tests/test_hf_families_inline.py -k whole",
        "a swapped Gemma-4 reports logits where HF's router returned probabilities",
    ),
    # --- the SRA trainer
    _m(
        "train-decay-norms",
        "moeblocks/sra/train.py",
        "skip = p.ndim < 2 or bias",
        "skip = p.ndim < 1 or bias",
        "tests/test_sra_weight_decay.py tests/test_sra_official.py",
        "LayerNorm weights decay (issue 33)",
    ),
    _m(
        "train-decay-anchors",
        "moeblocks/sra/train.py",
        "or embedding or id(p) in cosine",
        "or embedding",
        "tests/test_sra_weight_decay.py tests/test_sra_official.py",
        "cosine anchors and τ decay",
    ),
    _m(
        "train-warmup-off-by-one",
        "moeblocks/sra/train.py",
        "return config.lr * (step + 1) / warmup",
        "return config.lr * step / warmup",
        "tests/test_sra_official.py",
        "warmup starts at lr 0",
    ),
    # --- the routing presets of the SRA decoder (issue 30)
    _m(
        "train-balancers-not-stepped",
        "moeblocks/sra/train.py",
        "        step_balancers(ctx.model)\n",
        "        pass\n",
        "tests/test_routing_presets.py -k 'deepseek_bias or deepseek_resume'",
        "the trainer never moves DeepSeek-V3's selection bias",
    ),
    _m(
        "train-dropped-uncounted",
        "moeblocks/sra/train.py",
        "self.log_dropped_2[0] += routing.num_dropped",
        "self.log_dropped_2[0] += 0",
        "tests/test_routing_presets.py -k switch_logs",
        "log.jsonl reports no dropped tokens for a capacity family",
    ),
    _m(
        "presets-qwen-renormalised",
        "moeblocks/sra/routing_presets.py",
        'WeightPolicy(renormalize="never"))\n    losses: dict[str, AuxLoss]',
        'WeightPolicy(renormalize="always"))\n    losses: dict[str, AuxLoss]',
        "tests/test_routing_presets.py -k qwen2_moe_preset",
        "Qwen2-MoE's top-k probabilities renormalised (norm_topk_prob=False ignored)",
    ),
    _m(
        "presets-switch-no-capacity",
        "moeblocks/sra/routing_presets.py",
        'capacity = Capacity(factor=1.25, per="batch")',
        "capacity = None",
        "tests/test_routing_presets.py -k 'switch_preset or switch_logs'",
        "Switch without its capacity factor (dropless)",
    ),
    _m(
        "presets-deepseek-unscaled",
        "moeblocks/sra/routing_presets.py",
        "scale=2.5, eps=1e-20",
        "scale=1.0, eps=1e-20",
        "tests/test_routing_presets.py -k deepseek_v3_preset",
        "DeepSeek-V3's routed scaling factor left out",
    ),
    _m(
        "presets-shared-width-off",
        "moeblocks/sra/routing_presets.py",
        "return Widths(k, routed, (units - k) * routed)",
        "return Widths(k, routed, (units - k) * routed + 1)",
        "tests/test_routing_presets.py -k 'active or preset_is'",
        "a shared expert one unit wider than the equal-active-size rule",
    ),
    # --- distributed glue
    _m(
        "distributed-allreduce-backward",
        "moeblocks/distributed/comm.py",
        "        out = grad.clone()\n        dist.all_reduce(out, group=ctx.group)",
        "        out = grad.clone()\n        out.mul_(1)",
        "tests/test_distributed.py -k P2",
        "the group sum's backward stays local",
    ),
    _m(
        "distributed-splits-swapped",
        "moeblocks/distributed/comm.py",
        "out, rows.contiguous(), list(recv_splits), list(send_splits), group=group",
        "out, rows.contiguous(), list(send_splits), list(recv_splits), group=group",
        "tests/test_distributed.py -k P2",
        "all-to-all with send and receive splits swapped",
    ),
    # --- checkpoints
    _m(
        "checkpoint-manifest-digest",
        "moeblocks/sra/checkpoint.py",
        'm["sha256"] == _digest(files)\n            and _known_layout',
        "_known_layout",
        "tests/test_sra_faults.py -k damage",
        "the manifest's own digest is not compared (issue 33)",
    ),
    _m(
        "checkpoint-size-only-long",
        "moeblocks/sra/checkpoint.py",
        'if size != want["bytes"]:',
        'if size > want["bytes"]:',
        "tests/test_sra_faults.py -k 'damage or verifies_names'",
        "a truncated file is reported only by its hash",
    ),
    # --- soft-capped SwiGLU, parameter-free and router-weighted shared experts
    _m(
        "activations-soft-cap-sigmoid-of-capped",
        "moeblocks/activations.py",
        "return (capped_gate * torch.sigmoid(gate) * capped_up).to(out_dtype)",
        "return (capped_gate * torch.sigmoid(capped_gate) * capped_up).to(out_dtype)",
        "tests/test_soft_capped_swiglu.py",
        "Inkling2's sigmoid sees the capped gate instead of the raw one",
    ),
    _m(
        "experts-zero-expert-identity",
        X,
        "return torch.zeros_like(grouped)",
        "return grouped",
        "tests/test_parameter_free_experts.py",
        "a zero (skip) expert passes its input through",
    ),
    _m(
        "gating-always-on-ranked",
        G,
        "chosen_TK = key[:, :routed].topk(k, dim=-1).indices",
        "chosen_TK = key[:, -k:].topk(k, dim=-1).indices",
        "tests/test_router_weighted_shared.py",
        "the routed experts are chosen among the last k ids",
    ),
    _m(
        "experts-scale-detached",
        X,
        "return out * self.scale.to(out.dtype)",
        "return out * self.scale.detach().to(out.dtype)",
        "tests/test_router_weighted_shared.py",
        "the learnable global scale gets no gradient",
    ),
    _m(
        "hf-longcat-unscaled",
        "moeblocks/hf/layouts.py",
        'weights=WeightPolicy("never", scale=float(r.routed_scaling_factor)),',
        'weights=WeightPolicy("never"),',
        "tests/test_hf_families_parameter_free.py",
        "LongCat-Flash's routed scaling factor is dropped",
    ),
    # --- layer structure of issue 27 : latent space, expert norms, routed maps
    _m(
        "structure-latent-down-bias",
        "moeblocks/latent.py",
        "F.linear(tokens, self.w_down_DL.t(), self.b_down_L)",
        "F.linear(tokens, self.w_down_DL.t())",
        "tests/test_structure_banks.py -k latent",
        "the latent down projection drops its bias",
    ),
    _m(
        "structure-norm-weight-float32",
        "moeblocks/norms.py",
        '(scale.to(cdt) if self.weight_dtype == "compute" else scale)',
        "scale.to(cdt)",
        "tests/test_hf_families_structure.py -k ergo",
        "Ergo's per-expert norm weight rounded to float32 in a float64 model",
    ),
    _m(
        "structure-routed-linear-unweighted",
        "moeblocks/routed_linear.py",
        "self.dispatcher.unpermute(out_RD, layout, routing.weights)",
        "self.dispatcher.unpermute(out_RD, layout, torch.ones_like(routing.weights))",
        "tests/test_routed_linear.py",
        "the mixture of attention heads sums its slots without the gates",
    ),
]


def make_copy(dest: Path) -> None:
    """The library, importable as the installed package, and the tests, under ``dest``.

    The kernels are linked in as ``moeblocks/kernels``: tests/conftest.py puts the shape
    checks on every module file under ``moeblocks/`` it finds, which must not include the
    kernels (Triton reads their source), and its search does not follow links.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    shutil.copytree(ROOT / "moeblocks", dest / "moeblocks", ignore=ignore)
    shutil.copytree(ROOT / "kernels" / "src", dest / "kernels_src", ignore=ignore)
    (dest / "moeblocks" / "kernels").symlink_to(Path("..") / "kernels_src")
    shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
    # What tests read besides the code: the README's and the docs' examples, CI's commands.
    shutil.copytree(ROOT / "docs", dest / "docs", ignore=ignore)
    shutil.copytree(ROOT / ".ci", dest / ".ci", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md", "mkdocs.yml"):
        shutil.copy(ROOT / name, dest / name)
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import moeblocks.kernels as k, moeblocks as m; print(m.__file__); print(k.__file__)",
        ],
        cwd=dest,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    # The copy must be what runs, or every mutant would survive.
    assert all(Path(w).resolve().is_relative_to(dest.resolve()) for w in where), where


def copy_path(rel: str) -> str:
    return rel.replace("kernels/src/", "kernels_src/", 1)


def run_tests(tests: tuple[str, ...], work: Path) -> tuple[bool, str]:
    """Run pytest on ``tests`` in the copy: ``(passed, the first failure or the summary)``."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", *tests]
    try:
        proc = subprocess.run(
            cmd, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return False, f"timed out after {TIMEOUT_S} s"
    lines = proc.stdout.strip().splitlines()
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return proc.returncode == 0, (failed or lines[-1:] or [""])[0]


def run_one(m: Mutant, work: Path) -> tuple[str, float, str]:
    """Plant ``m`` in the copy, run its tests, restore; ``(outcome, seconds, detail)``."""
    target = work / copy_path(m.path)
    original = target.read_text(encoding="utf-8")
    if original.count(m.old) != 1:
        return "stale", 0.0, f"{m.path}: the piece occurs {original.count(m.old)} times"
    target.write_text(original.replace(m.old, m.new), encoding="utf-8")
    start = time.monotonic()
    try:
        passed, detail = run_tests(m.tests, work)
    finally:
        target.write_text(original, encoding="utf-8")
    return ("survived" if passed else "killed"), time.monotonic() - start, detail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", default="", help="run the mutants whose name starts so (comma-separated)"
    )
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="first run each distinct test set unmutated: a failure there would count as a kill",
    )
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if m.name.startswith(tuple(args.only.split(",")))]
    if args.list:
        for m in chosen:
            print(f"{m.name:40} {m.path:36} {m.why}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="moeblocks-mutants-") as tmp:
        work = Path(tmp)
        make_copy(work)
        if args.baseline:
            for tests in dict.fromkeys(m.tests for m in chosen):
                passed, detail = run_tests(tests, work)
                print(f"baseline  {'passed' if passed else 'FAILED'}: {' '.join(tests)}  {detail}")
                if not passed:
                    return 1
        for m in chosen:
            outcome, seconds, detail = run_one(m, work)
            results.append((m, outcome))
            print(f"{outcome:9} {seconds:6.0f}s  {m.name:40} {detail}", flush=True)
    counted = [(m, o) for m, o in results if not m.equivalent and o != "stale"]
    killed = sum(o == "killed" for _, o in counted)
    print(f"\nkilled {killed} of {len(counted)} non-equivalent mutants", end="")
    print(f" ({100 * killed / len(counted):.0f} %)" if counted else "")
    for m, o in results:
        if o != "killed":
            print(f"  {o}: {m.name} ({m.path}): {m.why}")
    return 0 if all(o != "stale" for _, o in results) else 1


if __name__ == "__main__":
    sys.exit(main())
