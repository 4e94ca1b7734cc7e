"""Dataclass fields that are also CLI flags: `cli_field` puts the help line and argparse settings in a field's
metadata, `add_dataclass_args` makes one flag per such field (so a default is written once, as vLLM's EngineArgs
does), `flags_in_message` names flags in errors meant for the CLI; plus the flag value parsers they share."""

from __future__ import annotations

import argparse
import json
import re
import typing
from dataclasses import MISSING, field, fields
from typing import Any


def cli_field(default: Any, help: str, *, hash: bool | None = None, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a CLI flag `--field-name`: `help` is its help line (the default is added),
    `argparse_kwargs` (type, choices, nargs, metavar) go to add_argument. Booleans become store_true flags, or
    --flag/--no-flag when they default to True."""
    return field(default=default, hash=hash, metadata={"help": help, "argparse": argparse_kwargs})


def parse_csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def add_dataclass_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One flag per field of `cls` that has cli_field metadata."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if "help" not in f.metadata:
            continue
        kwargs = dict(f.metadata["argparse"])
        default = None if f.default is MISSING else f.default
        help_text = f.metadata["help"]
        if default is not None and default != () and "(default:" not in help_text:
            help_text += f" (default: {_show(default)})"
        flags = ["--" + f.name.replace("_", "-"), *kwargs.pop("aliases", ())]
        if isinstance(default, bool) and "type" not in kwargs:
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(*flags, dest=f.name, action=action, default=default, help=help_text)
            continue
        if "type" not in kwargs and "action" not in kwargs:
            kwargs["type"] = _scalar_type(hints[f.name])
        if kwargs.get("nargs", "") is None:
            del kwargs["nargs"]
        parser.add_argument(*flags, dest=f.name, default=default, help=help_text, **kwargs)


def _scalar_type(hint: Any) -> Any:
    """int / float / str from `int | None` and friends; tuples take a per-item type from their nargs flag."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    for candidate in (int, float, str):
        if candidate in args:
            return candidate
    origin = typing.get_origin(args[0])
    if origin is tuple:
        item_args = typing.get_args(args[0])
        return item_args[0] if item_args else str
    return str


def _show(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"{value} = {value >> 20} MiB"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def flags_in_message(message: str, *classes: type) -> str:
    """An error message for the CLI: `load_format='dummy'` becomes `--load-format dummy` and a bare field name
    its flag, for every cli_field of `classes` (the engine's errors name the Python keywords LLM(...) takes)."""
    names = sorted((f.name for cls in classes for f in fields(cls) if "help" in f.metadata), key=len, reverse=True)
    if not names:
        return message
    alternatives = "|".join(map(re.escape, names))

    def with_value(match: re.Match) -> str:
        flag = "--" + match.group(1).replace("_", "-")
        value = match.group(3)
        return f"{flag} {value}" if value not in ("True", "'True'") else flag

    message = re.sub(rf"\b({alternatives})=(['\"]?)([^\s,;)'\"]+)\2", with_value, message)
    return re.sub(rf"(?<![-\w])({alternatives})\b(?!=)", lambda m: "--" + m.group(1).replace("_", "-"), message)


def parse_limits(text: str) -> dict[str, int]:
    """--limit-mm-per-prompt: image=4,video=1 or vLLM's JSON form {"image": 4, "video": 1}."""
    if text.strip().startswith("{"):
        try:
            limits = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"--limit-mm-per-prompt is not valid JSON: {exc}") from None
        if not isinstance(limits, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in limits.values()
        ):
            raise argparse.ArgumentTypeError('expected a JSON object of counts like {"image": 4, "video": 1}')
        return {str(k): v for k, v in limits.items()}
    limits = {}
    for item in text.split(","):
        modality, _, count = item.partition("=")
        if not count.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected modality=count pairs like image=4,video=1, got {text!r}")
        limits[modality.strip()] = int(count)
    return limits


def json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(size) for size in text.split(",") if size.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4,8, got {text!r}") from None
