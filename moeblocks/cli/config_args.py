"""The run config from the command line: preset < ``--config FILE.json`` < ``--set`` < flags.

Every field of :class:`~moeblocks.sra.config.SRAConfig` can be set; values are parsed by
the field's type, and the help lists the fields with the help text they carry.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from moeblocks.runtime.errors import UsageError

__all__ = ["fields_epilog", "run_config"]


def run_config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
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
    raise UsageError(
        f"{where}: unknown config field {key!r} ({hint}`moeblocks train --help` lists them)"
    )


def _parse_field(name: str, value: Any, where: str, from_text: bool) -> Any:
    """``value`` as the type of field ``name``: parsed from --set text, or a JSON value checked."""
    import typing

    kind = _field_kinds()[name]
    text = from_text and isinstance(value, str)
    wrong = UsageError(f"{where}: {name} expects {_kind_name(kind)}, got {value!r}")
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
            raise UsageError(f"--set expects key=value (e.g. --set seq_len=256), got {item!r}")
        name = _field_name(key, f"--set {item}")
        out[name] = _parse_field(name, value.strip(), f"--set {item}", from_text=True)
    return out


def _config_file(path: str) -> dict[str, Any]:
    """The fields of a JSON config file: an object of fields (or one under ``"config"``)."""
    import json

    try:
        blob = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise UsageError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise UsageError(f"--config {path} is not valid JSON: {err}") from None
    if isinstance(blob, dict) and isinstance(blob.get("config"), dict):
        blob = blob["config"]  # e.g. an eval.json or ablation.json
    if not isinstance(blob, dict):
        raise UsageError(f"--config {path} must hold a JSON object of config fields")
    where = f"--config {path}"
    return {
        (name := _field_name(key, where)): _parse_field(name, value, where, from_text=False)
        for key, value in blob.items()
    }


def fields_epilog() -> str:
    """The config fields with their type, tiny-preset value and the help the field carries."""
    import textwrap

    from moeblocks.sra.config import PRESETS, field_help, fields_where

    resumable = fields_where("may_change_on_resume")
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
        note = field_help(name) + ("; may change on --resume" if name in resumable else "")
        text = f"{kind_text}; {note}"
        wrapped = textwrap.wrap(text, 92 - 30) or [""]
        lines.append(head + " " + wrapped[0])
        lines += [" " * 31 + w for w in wrapped[1:]]
    return "\n".join(lines)
