"""The commands on SRA runs: ``demo``, ``train``, ``eval`` and ``generate``.

Each ``add_*`` function declares one command on the ``moeblocks`` subparsers and sets its
handler, a function ``(args) -> exit status``. Heavy imports happen inside the handlers,
so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from moeblocks.cli.config_args import fields_epilog, run_config
from moeblocks.cli.options import (
    RAW,
    add_device,
    add_max_tokens,
    add_plot_format,
    add_quiet,
    non_negative_float,
    positive_int,
    probability,
)

__all__ = ["add_demo", "add_eval", "add_generate", "add_train", "command_line"]


def command_line() -> str:
    """The command as typed, for the records reports keep (empty when called from Python)."""
    return "moeblocks " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""


def _train(args: argparse.Namespace) -> int:
    from moeblocks.sra.train import train

    result = train(
        run_config(args),
        args.data,
        Path(args.out),
        resume=args.resume,
        device=args.device,
        progress=not args.quiet,
        expert_parallel=args.expert_parallel,
        encoding=args.encoding,
        tune_threads=args.tune_threads,
        parallel=args.parallel,
    )
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return 0
    print(
        f"step {result.step}: validation perplexity {result.val_ppl:.2f} "
        f"(loss {result.val_loss:.4f}); checkpoint in {result.run_dir}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from moeblocks.sra.evaluate import (
        evaluate_run,
        format_run_eval,
        load_run,
        report_dir,
        run_corpus,
        write_eval_json,
    )
    from moeblocks.sra.routing_presets import trained_k
    from moeblocks.sra.tokencache import encode_split

    model, tok, ckpt = load_run(Path(args.run), args.device, args.data, args.encoding)
    import torch

    tokens = torch.from_numpy(encode_split(tok, run_corpus(ckpt), "valid"))
    ev = evaluate_run(model, tokens, ckpt, max_tokens=args.max_tokens or 0,
                      progress=not args.quiet)  # fmt: skip
    print(format_run_eval(ev, trained_k(ckpt.config)))
    out = Path(args.out) if args.out else report_dir(Path(args.run))
    print(f"eval.json: {write_eval_json(ev, out, command_line())}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from moeblocks.sra.evaluate import load_run, report_dir
    from moeblocks.sra.generate import format_generation, generate, write_generation

    model, tok, ckpt = load_run(Path(args.run), args.device, need_data=False)
    gen = generate(
        model,
        tok,
        args.prompt,
        tokens=args.tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        k=args.k,
        run=str(args.run),
        step=ckpt.step,
    )
    print(format_generation(gen))
    out = Path(args.out) if args.out else report_dir(Path(args.run))
    md, js = write_generation(gen, out, command_line())
    print(f"trace: {md} and {js.name}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import torch

    from moeblocks.sra.config import preset
    from moeblocks.sra.evaluate import (
        evaluate_run,
        expert_top_tokens,
        format_run_eval,
        load_run,
        report_dir,
        run_corpus,
        write_eval_json,
    )
    from moeblocks.sra.report import ExpertTokens, format_expert_tokens, write_report
    from moeblocks.sra.rundir import run_summary
    from moeblocks.sra.tokencache import encode_split
    from moeblocks.sra.train import train

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
    tokens = torch.from_numpy(encode_split(tok, run_corpus(ckpt), "valid"))
    ev = evaluate_run(model, tokens, ckpt, progress=not args.quiet)
    print(format_run_eval(ev, config.k_final))
    write_eval_json(ev, report_dir(out), command_line())

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
    report = write_report(out, ev, run_summary(out)["train"], experts, seconds, args.format)
    print(f"report: {report}   (demo took {seconds:.0f} s)")
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``demo``: train the tiny model, evaluate it and write its report."""
    demo = sub.add_parser(
        "demo",
        help="train the tiny SRA model on CPython's docs and report (~2 min, 2-core CPU)",
        description="Train the `tiny` preset on CPython's pydoc topics, evaluate it and "
        "write RUN/reports/demo.md with eval.json, training curves and utilisation plots.",
        epilog="examples:\n  moeblocks demo\n  moeblocks demo --steps 100 --out runs/quick "
        "--format svg\n",
        formatter_class=RAW,
    )
    demo.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="training steps (default: the tiny preset's)",
    )
    demo.add_argument(
        "--out", default="runs/demo", help="run folder (default: runs/demo; rewritten)"
    )
    add_device(demo)
    add_plot_format(demo)
    add_quiet(demo, "no progress bars")
    demo.set_defaults(handler=_demo)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that choose the run config (see :mod:`moeblocks.cli.config_args`)."""
    from moeblocks.sra.config import FFN_CHOICES, PRESETS

    parser.add_argument(
        "--preset",
        default=None,
        choices=list(PRESETS),
        help="base config (default: tiny, or the checkpoint's with --resume)",
    )
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE.json",
        help="a JSON object of config fields, over the preset (e.g. a run's config.json)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="set one config field (repeatable), over --config; e.g. --set seq_len=256 "
        "--set warmup=0.05 (fields below)",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="total training steps (default: the preset's)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of the init and the data order"
    )
    parser.add_argument(
        "--ffn",
        default=None,
        choices=list(FFN_CHOICES),
        help="FFN kind: cosine-routed MoE (SRA), linear-routed MoE, dense baseline, or a "
        "family's routing at equal active size (the same as --set ffn=NAME)",
    )


def add_train(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``train``: train an SRA model into a run folder."""
    tr = sub.add_parser(
        "train",
        help="train an SRA model",
        description="Train an SRA model into a run folder (checkpoints, log.jsonl, "
        "tokenizer.json). The config is a preset, then --config FILE.json, then --set "
        "key=value, then the named flags, each overriding the one before. Ctrl-C saves a "
        "checkpoint; --resume continues from it.",
        epilog=_TRAIN_EXAMPLES + "\n" + fields_epilog(),
        formatter_class=RAW,
    )
    tr.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    _add_config_arguments(tr)
    tr.add_argument(
        "--data",
        default=None,
        help="pydoc (default), synthetic, a text file, or a folder with train/valid files "
        "(with --resume: needed again when it lies outside --out)",
    )
    tr.add_argument(
        "--encoding",
        default=None,
        help="text encoding of --data files (default: utf-8, or the checkpoint's with --resume)",
    )
    tr.add_argument(
        "--keep-checkpoints",
        type=positive_int,
        default=None,
        metavar="N",
        help="verified checkpoints to keep (default: 2)",
    )
    tr.add_argument(
        "--max-skipped-steps",
        type=positive_int,
        default=None,
        metavar="N",
        help="stop after N steps in a row with a non-finite loss or gradient (default: 3)",
    )
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --out that verifies",
    )
    add_device(tr)
    tr.add_argument(
        "--expert-parallel",
        type=int,
        default=None,
        metavar="P",
        help="spread the experts over P ranks; launch with torchrun --nproc-per-node W, "
        "P dividing W (default under torchrun: P = W)",
    )
    tr.add_argument(
        "--parallel",
        choices=("fsdp", "ddp"),
        default="fsdp",
        help="under torchrun: FSDP2 shards parameters, gradients and optimizer state; "
        "DDP replicates them (default: fsdp)",
    )
    add_quiet(tr)
    tr.set_defaults(handler=_train)


def add_eval(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``eval``: perplexity, dead experts and k-sweep of a run."""
    ev = sub.add_parser(
        "eval",
        help="validation perplexity, dead experts and k-sweep of a run (writes eval.json)",
        description="Evaluate the newest checkpoint that verifies on the run's validation "
        "split (all of it unless --max-tokens): perplexity, dead experts per layer and the "
        "inference-time k-sweep. Prints the tables and writes RUN/reports/eval.json "
        "(perplexity, loss, token count, dead experts, expert counts, k-sweep, checkpoint "
        "step, command).",
        epilog="examples:\n  moeblocks eval runs/demo\n  moeblocks eval runs/NAME --data "
        "path/to/corpus.txt --max-tokens 65536\n",
        formatter_class=RAW,
    )
    ev.add_argument("run", help="run folder (or a checkpoint folder)")
    ev.add_argument(
        "--data",
        default=None,
        help="the run's data (needed when it lies outside the run folder; must hold the same text)",
    )
    ev.add_argument("--encoding", default=None, help="text encoding of --data (default: the run's)")
    add_max_tokens(ev, None, "evaluate only the first N validation tokens (default: all)")
    ev.add_argument("--out", default=None, help="folder for eval.json (default: RUN/reports)")
    add_device(ev)
    add_quiet(ev)
    ev.set_defaults(handler=_eval)


def add_generate(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``generate``: sample text and trace the experts of every token."""
    gen = sub.add_parser(
        "generate",
        help="sample text from a run and show the experts every token is routed to",
        description="Continue --prompt with the newest checkpoint of a run and print, for "
        "every token, the experts each MoE layer routed it to (expert:weight, first choice "
        "first). The same --seed gives the same text. Writes RUN/reports/generate.md and "
        "generate.json.",
        epilog='examples:\n  moeblocks generate runs/demo --prompt "The built-in"\n'
        '  moeblocks generate runs/demo --prompt "def " --tokens 60 --temperature 0 '
        "--k 3\n",
        formatter_class=RAW,
    )
    gen.add_argument("run", help="run folder (or a checkpoint folder)")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument(
        "--tokens",
        type=positive_int,
        default=40,
        metavar="N",
        help="tokens to generate (default 40)",
    )
    gen.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.8,
        metavar="T",
        help="softmax temperature; 0 = always the most likely token (default 0.8)",
    )
    gen.add_argument(
        "--top-p",
        type=probability,
        default=0.95,
        metavar="P",
        help="sample from the smallest set of tokens holding P of the mass (default 0.95)",
    )
    gen.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    gen.add_argument(
        "--k",
        type=positive_int,
        default=None,
        help="experts per token in every layer (default: the run's k at its last step)",
    )
    gen.add_argument("--out", default=None, help="folder for the trace (default: RUN/reports)")
    add_device(gen)
    gen.set_defaults(handler=_generate)


_TRAIN_EXAMPLES = """examples:
  moeblocks train --out runs/a                                 the tiny preset on pydoc
  moeblocks train --out runs/b --preset small --data path/to/wikitext-103 --device cuda
  moeblocks train --out runs/c --set seq_len=256 --set batch_size=8 --set warmup=0.05
  moeblocks train --out runs/d --config my-config.json --steps 2000
  moeblocks train --out runs/a --resume --steps 1200           continue, extend the run

--set takes a fraction as a/b (e.g. --set warmup=400/5000); booleans as true/false.
"""
