"""Result rows: one JSON object per (mode, rate) run with where, what and how it ran; appended as JSON lines and
printed as a table."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from spaceserve.bench.metrics import SLO, metric_field_names

_REPO_ROOT = Path(__file__).resolve().parents[2]

RUN_FIELDS = (
    "timestamp",
    "label",
    "spaceserve_version",
    "git_commit",
    "git_dirty",
    "backend",
    "base_url",
    "device",
    "model",
    "multiplex",
    "encoder_policy",
    "engine_settings",
    "engine_counters",  # in-process: preemptions and prefix-cache tokens during the run
    "workload",
    "workload_options",
    "request_rate",
    "burstiness",
    "num_prompts",
    "num_warmups",
    "warmup_failed",
    "max_concurrency",
    "slo",
    "status",
    "error",
)


def row_fields() -> list[str]:
    """Every key of a result row, in order; a failed run carries them all, its metrics null."""
    return [*RUN_FIELDS, *metric_field_names()]


def make_row(run: dict[str, Any], metrics: dict[str, Any] | None, error: str | None = None) -> dict[str, Any]:
    unknown = set(run) - set(RUN_FIELDS)
    if unknown:
        raise ValueError(f"unknown run fields {sorted(unknown)}")
    row = {name: run.get(name) for name in RUN_FIELDS}
    row["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    row["status"] = "ok" if error is None else "failed"
    row["error"] = error
    row["request_rate"] = rate_to_json(run["request_rate"])
    for name in metric_field_names():
        row[name] = None if metrics is None else metrics[name]
    return row


def rate_to_json(rate: float) -> float | str:
    """JSON has no infinity: an all-at-once run records its rate as the string "inf"."""
    return "inf" if math.isinf(rate) else rate


def rate_from_json(value: float | str) -> float:
    return float(value)


def append_jsonl(path: str | os.PathLike[str], row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(row, default=_jsonable) + "\n")


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    return str(value)


# ---- where and what ran -------------------------------------------------------------------------------------------


def spaceserve_version() -> str | None:
    """The installed version; from this checkout's pyproject.toml where it runs uninstalled (the GPU machine)."""
    try:
        return metadata.version("spaceserve")
    except metadata.PackageNotFoundError:
        pass
    try:
        with open(_REPO_ROOT / "pyproject.toml", "rb") as file:
            return tomllib.load(file)["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, tree has uncommitted changes) of this checkout. SPACESERVE_COMMIT, when set, wins: a copy of the tree
    shipped to another machine may carry a stale .git."""
    if os.environ.get("SPACESERVE_COMMIT"):
        return os.environ["SPACESERVE_COMMIT"], None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SPACESERVE_COMMIT") or None, None


def device_name(device: str) -> str:
    """The accelerator's name for a CUDA device, the CPU's model name otherwise."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model_name()


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


# ---- on screen ----------------------------------------------------------------------------------------------------

_TABLE_COLUMNS = (
    ("mode", lambda r: f"{r['multiplex']}/{r['encoder_policy']}"),
    ("rate", lambda r: str(r["request_rate"])),
    ("ok", lambda r: _fmt(r["completed"], "d")),
    ("fail", lambda r: _fmt(r["failed"], "d")),
    ("req/s", lambda r: _fmt(r["request_throughput"], ".2f")),
    ("tok/s", lambda r: _fmt(r["output_throughput"], ".1f")),
    ("TTFT p50", lambda r: _fmt(r["p50_ttft_ms"], ".1f")),
    ("TTFT p99", lambda r: _fmt(r["p99_ttft_ms"], ".1f")),
    ("TTFT sent p50", lambda r: _fmt(r.get("p50_ttft_send_ms"), ".1f")),
    ("TPOT mean", lambda r: _fmt(r["mean_tpot_ms"], ".2f")),
    ("TPOT p99", lambda r: _fmt(r["p99_tpot_ms"], ".2f")),
    ("ITL p99", lambda r: _fmt(r["p99_itl_ms"], ".2f")),
    ("E2E p50", lambda r: _fmt(r["p50_e2el_ms"], ".1f")),
    ("enc.q p50", lambda r: _fmt(r["p50_encoder_queue_ms"], ".1f")),
    ("goodput", lambda r: _fmt(r["goodput"], ".2f")),
)


# shown when a run decoded videos (in-process): TTFT split into video decode, encode and prefill
_TTFT_SPLIT_COLUMNS = tuple(
    (f"{label} {stat}", lambda r, key=f"{stat}_ttft_{part}_ms": _fmt(r.get(key), ".1f"))
    for part, label in (("video_decode", "dec"), ("encode", "enc"), ("prefill", "pre"), ("overlap", "ovl"))
    for stat in ("p50", "p99")
)


# shown when the rows carry SLOs: which one the goodput is for
_SLO_COLUMN = ("slo", lambda r: SLO.from_dict(r["slo"]).label() if r.get("slo") else "-")


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table of the runs (latencies in ms); failed runs show their error below."""
    columns = _TABLE_COLUMNS
    if any(row.get("slo") for row in rows):
        columns += (_SLO_COLUMN,)
    if any(row.get("p50_ttft_video_decode_ms") is not None for row in rows):
        columns += _TTFT_SPLIT_COLUMNS
    header = [name for name, _ in columns]
    body = [[cell(row) for _, cell in columns] for row in rows]
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    for row, line in zip(rows, body):
        lines.append("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if row["error"]:
            lines.append(f"    failed: {row['error']}")
        for message, count in (row.get("errors") or {}).items():
            lines.append(f"    {count} request(s) failed: {message}")
    return "\n".join(lines)


def print_table(rows: Sequence[dict[str, Any]], file: TextIO | None = None) -> None:
    print(format_table(rows), file=file, flush=True)
