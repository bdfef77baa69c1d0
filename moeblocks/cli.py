"""The ``moeblocks`` command line: ``demo``, ``train`` and ``eval`` of the SRA transformer.

``inspect`` comes from :mod:`moeblocks.inspect.cli`, ``experiment`` from
:mod:`moeblocks.sra.cli`; ``inspect --hf
DIR`` (a Hugging Face checkpoint) is handled here, with :mod:`moeblocks.hf.report`.

Bad input (a missing data path, an unknown preset, a checkpoint from another config or
one that does not verify...) prints one line to stderr and exits with status 2. Ctrl-C,
SIGTERM or SIGUSR1 during training save a checkpoint and exit with status 128 + the
signal number (130, 143, 138); a run that diverges (too many non-finite steps in a row)
exits with status 3, its earlier checkpoints kept.

Every command run from the shell sets its CPU threads with
:func:`moeblocks.threads.configure_threads`: ``--threads N``, else ``OMP_NUM_THREADS``,
else the CPUs this process may use that other processes do not keep busy; in that last
case ``train`` and ``demo`` look at the load again every few seconds.
``main(argv)`` called from Python changes threads only when ``--threads`` is given.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from moeblocks._version import __version__

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT; other signals exit with 128 + their number


def _error(message: str) -> int:
    print(f"moeblocks: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The run config: preset (or the checkpoint's, when resuming) plus CLI overrides."""
    from moeblocks.sra.checkpoint import find_checkpoint
    from moeblocks.sra.config import preset

    ckpt = find_checkpoint(Path(args.out)) if args.resume and Path(args.out).is_dir() else None
    if args.preset is None:
        base = ckpt.config if ckpt is not None else preset("tiny")
    else:
        base = preset(args.preset)
    changes = {
        name: getattr(args, name)
        for name in ("steps", "seed", "ffn", "keep_checkpoints", "max_skipped_steps")
        if getattr(args, name) is not None
    }
    return base.replace(**changes)


def _train(args: argparse.Namespace) -> int:
    from moeblocks.sra.train import train

    result = train(
        _config(args),
        args.data,
        Path(args.out),
        resume=args.resume,
        device=args.device,
        progress=not args.quiet,
        expert_parallel=args.expert_parallel,
        encoding=args.encoding,
        tune_threads=args.tune_threads,
    )
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return 0
    print(
        f"step {result.step}: validation perplexity {result.val_ppl:.2f} "
        f"(loss {result.val_loss:.4f}); checkpoint in {result.run_dir}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from moeblocks.sra.evaluate import evaluate_run, format_run_eval, load_run, run_corpus
    from moeblocks.sra.tokenizer import encode

    model, tok, ckpt = load_run(Path(args.run), args.device, args.data, args.encoding)
    import torch

    tokens = torch.from_numpy(encode(tok, run_corpus(ckpt).valid))
    ev = evaluate_run(model, tokens, ckpt, max_tokens=args.max_tokens)
    print(format_run_eval(ev, ckpt.config.k_final))
    return 0


def _inspect_hf(args: argparse.Namespace) -> int:
    """``moeblocks inspect --hf DIR``: the routing report of a local HF MoE checkpoint."""
    from moeblocks.hf.report import (
        CheckpointError,
        format_hf_inspection,
        inspect_hf,
        write_hf_report,
    )
    from moeblocks.inspect.probe import load_probes
    from moeblocks.sra.config import UsageError
    from moeblocks.sra.data import load_corpus
    from moeblocks.sra.train import resolve_device

    if args.seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {args.seq_len}")
    corpus = load_corpus(args.data or "pydoc")
    probes = load_probes(args.probes) if args.probes else None
    try:
        hins = inspect_hf(
            Path(args.hf),
            corpus.valid,
            data_name=corpus.name,
            text=args.text,
            max_tokens=args.max_tokens,
            seq_len=args.seq_len,
            device=resolve_device(args.device),
            k_sweep=not args.no_k_sweep,
            probes=probes,
        )
    except CheckpointError as err:
        raise UsageError(str(err)) from err
    print(format_hf_inspection(hins))
    out = Path(args.out) if args.out else Path(args.hf) / "inspect"
    print(f"report: {write_hf_report(hins, out)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import torch

    from moeblocks.sra.config import preset
    from moeblocks.sra.evaluate import (
        evaluate_run,
        expert_top_tokens,
        format_run_eval,
        load_run,
        run_corpus,
    )
    from moeblocks.sra.report import ExpertTokens, format_expert_tokens, write_report
    from moeblocks.sra.tokenizer import encode
    from moeblocks.sra.train import run_summary, train

    start = time.perf_counter()
    out = Path(args.out)
    config = preset("tiny")
    if args.steps is not None:
        config = config.replace(steps=args.steps)
    print(
        f"training the `tiny` SRA model ({config.n_layers} layers, {config.num_experts} "
        f"cosine-routed experts, k {config.k_start}->{config.k_final}) on CPython's pydoc "
        f"topics for {config.steps} steps"
    )
    train(
        config, "pydoc", out, device=args.device, progress=not args.quiet, overwrite=True,
        tune_threads=args.tune_threads,
    )  # fmt: skip

    model, tok, ckpt = load_run(out, args.device)
    tokens = torch.from_numpy(encode(tok, run_corpus(ckpt).valid))
    ev = evaluate_run(model, tokens, ckpt)
    print(format_run_eval(ev, config.k_final))

    # A few experts of the last MoE layer, spread from the busiest to the quietest.
    layer = len(model.moe_layers) - 1
    top = expert_top_tokens(model, tokens, layer, config.batch_size, n=6)
    counts_E = ev.result.counts[layer]
    order = counts_E.argsort(descending=True).tolist()
    picks = [
        order[i] for i in sorted({0, 1, len(order) // 4, len(order) // 2, 3 * len(order) // 4})
    ]
    total = max(1, int(counts_E.sum()))
    experts = [
        ExpertTokens(layer, e, int(counts_E[e]) / total, [(tok.decode([i]), c) for i, c in top[e]])
        for e in picks
    ]
    print("tokens routed most often to a few experts:")
    print(format_expert_tokens(experts))
    seconds = time.perf_counter() - start
    report = write_report(out, ev, run_summary(out)["train"], experts, seconds)
    print(f"report: {report}   (demo took {seconds:.0f} s)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeblocks", description="Mixture-of-Experts blocks: the reference SRA model's CLI."
    )
    parser.add_argument("--version", action="version", version=f"moeblocks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="train the tiny SRA model on CPython's docs and report (~2 min, 2-core CPU)"
    )
    demo.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the tiny preset's)"
    )
    demo.add_argument(
        "--out", default="runs/demo", help="run folder (default: runs/demo; rewritten)"
    )
    demo.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_demo)

    tr = sub.add_parser("train", help="train an SRA model")
    tr.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    tr.add_argument(
        "--preset",
        default=None,
        help="tiny, small or paper (default: tiny, or the checkpoint's with --resume)",
    )
    tr.add_argument(
        "--data",
        default=None,
        help="pydoc (default), synthetic, a text file, or a folder with train/valid files "
        "(with --resume: needed again when it lies outside --out)",
    )
    tr.add_argument(
        "--steps", type=int, default=None, help="total training steps (default: the preset's)"
    )
    tr.add_argument("--seed", type=int, default=None, help="seed of the init and the data order")
    tr.add_argument(
        "--ffn",
        default=None,
        choices=["cosine", "linear", "dense"],
        help="FFN kind: cosine-routed MoE (SRA), linear-routed MoE, or dense baseline",
    )
    tr.add_argument(
        "--encoding",
        default=None,
        help="text encoding of --data files (default: utf-8, or the checkpoint's with --resume)",
    )
    tr.add_argument(
        "--keep-checkpoints",
        type=int,
        default=None,
        metavar="N",
        help="verified checkpoints to keep (default: 2)",
    )
    tr.add_argument(
        "--max-skipped-steps",
        type=int,
        default=None,
        metavar="N",
        help="stop after N steps in a row with a non-finite loss or gradient (default: 3)",
    )
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --out that verifies",
    )
    tr.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    tr.add_argument(
        "--expert-parallel",
        type=int,
        default=None,
        metavar="P",
        help="spread the experts over P ranks; launch with torchrun --nproc-per-node W, "
        "P dividing W (default under torchrun: P = W)",
    )
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(handler=_train)

    ev = sub.add_parser("eval", help="validation perplexity, dead experts and k-sweep of a run")
    ev.add_argument("run", help="run folder (or a checkpoint folder)")
    ev.add_argument(
        "--data",
        default=None,
        help="the run's data (needed when it lies outside the run folder; must hold the same text)",
    )
    ev.add_argument("--encoding", default=None, help="text encoding of --data (default: the run's)")
    ev.add_argument(
        "--max-tokens", type=int, default=0, help="evaluate only this many tokens (0 = all)"
    )
    ev.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    ev.set_defaults(handler=_eval)

    # `inspect` (moeblocks.inspect imports torch only) and `experiment` (SRA side).
    from moeblocks.inspect.cli import add_inspect_commands
    from moeblocks.sra.cli import add_experiment_command

    add_inspect_commands(sub, hf_handler=_inspect_hf)
    add_experiment_command(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--threads",
            type=_positive,
            default=None,
            metavar="N",
            help="CPU threads (default: OMP_NUM_THREADS, else the usable CPUs not kept busy "
            "by other processes)",
        )
    return parser


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return n


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moeblocks`` console script; returns the exit status.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``). Given from Python, the
            process's threads change only with ``--threads`` (see the module docstring).
    """
    args = _parser().parse_args(argv)
    if argv is None or getattr(args, "threads", None) is not None:
        from moeblocks.threads import configure_threads

        configure_threads(getattr(args, "threads", None))
    # A count picked from the load is looked at again during training (ThreadTuner).
    args.tune_threads = (
        argv is None
        and getattr(args, "threads", None) is None
        and not os.environ.get("OMP_NUM_THREADS")
    )
    from moeblocks.sra.config import UsageError
    from moeblocks.sra.guards import DivergedError

    try:
        return args.handler(args)
    except UsageError as err:
        return _error(str(err))
    except DivergedError as err:
        print(f"moeblocks: error: {err}", file=sys.stderr)
        return EXIT_DIVERGED
    except ImportError as err:
        if "moeblocks[" not in str(err):  # not a missing extra: a real bug, keep the trace
            raise
        return _error(str(err))
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        print(f"\nmoeblocks: interrupted ({name}){_resume_hint(args)}", file=sys.stderr)
        return 128 + signum


def _resume_hint(args: argparse.Namespace) -> str:
    from moeblocks.sra.checkpoint import find_checkpoint
    from moeblocks.sra.config import UsageError

    out = getattr(args, "out", None)
    try:
        ckpt = find_checkpoint(Path(out)) if out and Path(out).is_dir() else None
    except UsageError:
        ckpt = None
    if ckpt is None:
        return " before the first checkpoint"
    data = f" --data {ckpt.data}" if getattr(args, "data", None) else ""
    return f"; step {ckpt.step} saved (continue: moeblocks train --out {out} --resume{data})"


if __name__ == "__main__":
    sys.exit(main())
