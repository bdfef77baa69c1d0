"""The ``moeblocks`` command line: ``demo``, ``train``, ``eval`` and ``generate`` of the SRA model.

``inspect`` comes from :mod:`moeblocks.inspect.cli`, ``experiment`` from
:mod:`moeblocks.sra.cli`; ``inspect --hf
DIR`` (a Hugging Face checkpoint) is handled here, with :mod:`moeblocks.hf.report`.

Every field of :class:`~moeblocks.sra.config.SRAConfig` can be set for ``train``: a
preset, then ``--config FILE.json`` (an object of fields), then ``--set key=value``
(repeatable, each value parsed by the field's type), then the named flags (``--steps``,
``--seed``, ``--ffn``...), each overriding the one before.

Reports of a run go to ``RUN/reports/``: ``eval.json`` (``eval``, ``demo``), ``demo.md``,
``inspect.md``, ``generate.md`` + ``generate.json``, and their plots
(``<command>-<concept>.png``, ``training-*.png``); see :mod:`moeblocks.sra.evaluate`.
Long commands show a progress bar on stderr (a line every 10 % without tqdm) unless
``--quiet``.

Bad input (a missing data path, an unknown preset, a checkpoint from another config or
one that does not verify...) prints one line to stderr and exits with status 2. Ctrl-C,
SIGTERM or SIGUSR1 during training save a checkpoint and exit with status 128 + the
signal number (130, 143, 138); a run that diverges (too many non-finite steps in a row)
exits with status 3, its earlier checkpoints kept.

Every command run from the shell sets its CPU threads with
:func:`moeblocks.threads.configure_threads`: ``--threads N``, else ``OMP_NUM_THREADS``,
else the CPUs this process may use that other processes do not keep busy; in that last
case ``train`` and ``demo`` look at the load again every few seconds.
It also lets glibc's malloc keep freed memory for reuse
(:func:`moeblocks.malloc.configure_malloc`), unless the environment sets the allocator's
own ``MALLOC_*_`` variables or preloads another allocator. ``main(argv)`` called from
Python changes threads only when ``--threads`` is given, and leaves the allocator alone.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from moeblocks._argtypes import non_negative_float, positive_int, probability
from moeblocks._version import __version__

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT; other signals exit with 128 + their number


def _error(message: str) -> int:
    print(f"moeblocks: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The run config: preset (or the checkpoint's, when resuming) < --config < --set < flags."""
    from moeblocks.sra.checkpoint import find_checkpoint
    from moeblocks.sra.config import preset

    ckpt = find_checkpoint(Path(args.out)) if args.resume and Path(args.out).is_dir() else None
    if args.preset is None:
        base = ckpt.config if ckpt is not None else preset("tiny")
    else:
        base = preset(args.preset)
    changes = _config_file(args.config) if args.config else {}
    changes.update(_set_values(args.set or []))
    changes.update(
        {
            name: getattr(args, name)
            for name in ("steps", "seed", "ffn", "keep_checkpoints", "max_skipped_steps")
            if getattr(args, name) is not None
        }
    )
    return base.replace(**changes)


# --- config fields from the command line (--set key=value, --config FILE.json) ---------

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _field_kinds() -> dict[str, Any]:
    """Each SRAConfig field's type: int, float, bool, str or a Literal of choices."""
    import dataclasses
    import typing

    from moeblocks.sra.config import SRAConfig

    hints = typing.get_type_hints(SRAConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(SRAConfig)}


def _kind_name(kind: Any) -> str:
    import typing

    if typing.get_origin(kind) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(kind)))
    return {bool: "true or false", int: "an integer", float: "a number"}.get(kind, kind.__name__)


def _field_name(key: str, where: str) -> str:
    import difflib

    kinds = _field_kinds()
    name = key.strip().replace("-", "_")
    if name in kinds:
        return name
    close = difflib.get_close_matches(name, list(kinds), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise _usage(
        f"{where}: unknown config field {key!r} ({hint}`moeblocks train --help` lists them)"
    )


def _usage(message: str) -> Exception:
    from moeblocks.sra.config import UsageError

    return UsageError(message)


def _parse_field(name: str, value: Any, where: str, from_text: bool) -> Any:
    """``value`` as the type of field ``name``: parsed from --set text, or a JSON value checked."""
    import typing

    kind = _field_kinds()[name]
    text = from_text and isinstance(value, str)
    wrong = _usage(f"{where}: {name} expects {_kind_name(kind)}, got {value!r}")
    if typing.get_origin(kind) is typing.Literal:
        if value not in typing.get_args(kind):
            raise wrong
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise wrong
    if isinstance(value, bool):  # JSON true/false is not a number here
        raise wrong
    try:
        if kind is int:
            if text:
                return int(value)
            if isinstance(value, int):
                return value
            raise wrong
        if kind is float:
            if text and "/" in value:  # e.g. warmup=400/5000: N steps of 5000
                num, den = value.split("/", 1)
                return float(num) / float(den)
            if text or isinstance(value, (int, float)):
                return float(value)
            raise wrong
    except (ValueError, ZeroDivisionError):
        raise wrong from None
    if not isinstance(value, str):
        raise wrong
    return value


def _set_values(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _usage(f"--set expects key=value (e.g. --set seq_len=256), got {item!r}")
        name = _field_name(key, f"--set {item}")
        out[name] = _parse_field(name, value.strip(), f"--set {item}", from_text=True)
    return out


def _config_file(path: str) -> dict[str, Any]:
    """The fields of a JSON config file: an object of fields (or one under ``"config"``)."""
    import json

    try:
        blob = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise _usage(f"--config {path}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise _usage(f"--config {path} is not valid JSON: {err}") from None
    if isinstance(blob, dict) and isinstance(blob.get("config"), dict):
        blob = blob["config"]  # e.g. an eval.json or ablation.json
    if not isinstance(blob, dict):
        raise _usage(f"--config {path} must hold a JSON object of config fields")
    where = f"--config {path}"
    return {
        (name := _field_name(key, where)): _parse_field(name, value, where, from_text=False)
        for key, value in blob.items()
    }


def _fields_epilog() -> str:
    """The config fields with their type, tiny-preset value and the comment in config.py."""
    import inspect
    import re
    import textwrap

    from moeblocks.sra.config import PRESETS, SRAConfig

    try:
        source = inspect.getsource(SRAConfig)
    except (OSError, TypeError):  # no source (frozen app): list the fields bare
        source = ""
    notes = dict(re.findall(r"^    (\w+): [^=\n]+=[^#\n]+#\s*(.+)$", source, re.M))
    tiny = PRESETS["tiny"]
    lines = ["config fields for --set / --config (value in the tiny preset, meaning):"]
    for name, kind in _field_kinds().items():
        value = getattr(tiny, name)
        if isinstance(value, bool):
            shown = str(value).lower()  # as --set takes it
        elif isinstance(value, float):
            shown = format(value, ".4g")
        else:
            shown = str(value)
        head = f"  {name}={shown}".ljust(30)
        kind_text = _kind_name(kind)
        note = notes.get(name, "")
        text = f"{kind_text}; {note}" if note else kind_text
        wrapped = textwrap.wrap(text, 92 - 30) or [""]
        lines.append(head + " " + wrapped[0])
        lines += [" " * 31 + w for w in wrapped[1:]]
    return "\n".join(lines)


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
        parallel=args.parallel,
    )
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the run
        return 0
    print(
        f"step {result.step}: validation perplexity {result.val_ppl:.2f} "
        f"(loss {result.val_loss:.4f}); checkpoint in {result.run_dir}"
    )
    return 0


def _command_line() -> str:
    """The command as typed, for the records reports keep (empty when called from Python)."""
    import shlex

    return "moeblocks " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""


def _eval(args: argparse.Namespace) -> int:
    from moeblocks.sra.evaluate import (
        evaluate_run,
        format_run_eval,
        load_run,
        report_dir,
        run_corpus,
        write_eval_json,
    )
    from moeblocks.sra.tokencache import encode_split

    model, tok, ckpt = load_run(Path(args.run), args.device, args.data, args.encoding)
    import torch

    tokens = torch.from_numpy(encode_split(tok, run_corpus(ckpt), "valid"))
    ev = evaluate_run(model, tokens, ckpt, max_tokens=args.max_tokens or 0,
                      progress=not args.quiet)  # fmt: skip
    print(format_run_eval(ev, ckpt.config.k_final))
    out = Path(args.out) if args.out else report_dir(Path(args.run))
    print(f"eval.json: {write_eval_json(ev, out, _command_line())}")
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
    md, js = write_generation(gen, out, _command_line())
    print(f"trace: {md} and {js.name}")
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
    # HF's own forward runs here; a bar would only show the k-sweep, so none.
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
    out = Path(args.out) if args.out else Path(args.hf) / "reports"
    print(f"report: {write_hf_report(hins, out, args.format)}")
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
    from moeblocks.sra.tokencache import encode_split
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
    tokens = torch.from_numpy(encode_split(tok, run_corpus(ckpt), "valid"))
    ev = evaluate_run(model, tokens, ckpt, progress=not args.quiet)
    print(format_run_eval(ev, config.k_final))
    write_eval_json(ev, report_dir(out), _command_line())

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


def _parser() -> argparse.ArgumentParser:
    from moeblocks.sra.config import PRESETS

    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="moeblocks",
        description="Mixture-of-Experts blocks: train, evaluate, inspect and sample the "
        "reference SRA (Semantic Resonance Architecture) transformer.",
        epilog=_MAIN_EXAMPLES,
        formatter_class=raw,
    )
    parser.add_argument("--version", action="version", version=f"moeblocks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train the tiny SRA model on CPython's docs and report (~2 min, 2-core CPU)",
        description="Train the `tiny` preset on CPython's pydoc topics, evaluate it and "
        "write RUN/reports/demo.md with eval.json, training curves and utilisation plots.",
        epilog="examples:\n  moeblocks demo\n  moeblocks demo --steps 100 --out runs/quick "
        "--format svg\n",
        formatter_class=raw,
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
    demo.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    demo.add_argument(
        "--format", default="png", choices=["png", "svg", "pdf"], help="plot format (default: png)"
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo)

    tr = sub.add_parser(
        "train",
        help="train an SRA model",
        description="Train an SRA model into a run folder (checkpoints, log.jsonl, "
        "tokenizer.json). The config is a preset, then --config FILE.json, then --set "
        "key=value, then the named flags, each overriding the one before. Ctrl-C saves a "
        "checkpoint; --resume continues from it.",
        epilog=_TRAIN_EXAMPLES + "\n" + _fields_epilog(),
        formatter_class=raw,
    )
    tr.add_argument("--out", required=True, help="run folder, e.g. runs/NAME")
    tr.add_argument(
        "--preset",
        default=None,
        choices=list(PRESETS),
        help="base config (default: tiny, or the checkpoint's with --resume)",
    )
    tr.add_argument(
        "--config",
        default=None,
        metavar="FILE.json",
        help="a JSON object of config fields, over the preset (e.g. a run's config.json)",
    )
    tr.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="set one config field (repeatable), over --config; e.g. --set seq_len=256 "
        "--set warmup=0.05 (fields below)",
    )
    tr.add_argument(
        "--data",
        default=None,
        help="pydoc (default), synthetic, a text file, or a folder with train/valid files "
        "(with --resume: needed again when it lies outside --out)",
    )
    tr.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="total training steps (default: the preset's)",
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
    tr.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
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
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(handler=_train)

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
        formatter_class=raw,
    )
    ev.add_argument("run", help="run folder (or a checkpoint folder)")
    ev.add_argument(
        "--data",
        default=None,
        help="the run's data (needed when it lies outside the run folder; must hold the same text)",
    )
    ev.add_argument("--encoding", default=None, help="text encoding of --data (default: the run's)")
    ev.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="evaluate only the first N validation tokens (default: all)",
    )
    ev.add_argument("--out", default=None, help="folder for eval.json (default: RUN/reports)")
    ev.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(handler=_eval)

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
        formatter_class=raw,
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
    gen.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    gen.set_defaults(handler=_generate)

    # `inspect` (moeblocks.inspect imports torch only) and `experiment` (SRA side).
    from moeblocks.inspect.cli import add_inspect_commands
    from moeblocks.sra.cli import add_experiment_command

    add_inspect_commands(sub, hf_handler=_inspect_hf)
    add_experiment_command(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--threads",
            type=positive_int,
            default=None,
            metavar="N",
            help="CPU threads (default: OMP_NUM_THREADS, else the usable CPUs not kept busy "
            "by other processes)",
        )
    return parser


_MAIN_EXAMPLES = """examples:
  moeblocks demo                                     train the tiny model and report (~2 min)
  moeblocks train --out runs/a --preset small --set seq_len=512 --set lr=1e-3
  moeblocks eval runs/a                              perplexity, dead experts, k-sweep
  moeblocks inspect runs/a --text "the cat sat"      routing metrics and plots
  moeblocks generate runs/a --prompt "The" --seed 1  sample text, trace the experts
  moeblocks experiment routing-ablation --seeds 0 1 2

reports go to RUN/reports/: eval.json, demo.md, inspect.md, generate.md/.json and plots.
`moeblocks COMMAND --help` describes each command.
"""

_TRAIN_EXAMPLES = """examples:
  moeblocks train --out runs/a                                 the tiny preset on pydoc
  moeblocks train --out runs/b --preset small --data path/to/wikitext-103 --device cuda
  moeblocks train --out runs/c --set seq_len=256 --set batch_size=8 --set warmup=0.05
  moeblocks train --out runs/d --config my-config.json --steps 2000
  moeblocks train --out runs/a --resume --steps 1200           continue, extend the run

--set takes a fraction as a/b (e.g. --set warmup=400/5000); booleans as true/false.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moeblocks`` console script; returns the exit status.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``). Given from Python, the
            process's threads change only with ``--threads`` (see the module docstring).
    """
    args = _parser().parse_args(argv)
    if argv is None:  # the process is ours: keep freed memory for reuse
        from moeblocks.malloc import configure_malloc

        configure_malloc()
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
