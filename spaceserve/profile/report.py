"""Writing a GPU-path report: results.json (everything) and results.md (one readable table per section)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# section -> (column key, header) shown in the markdown table; every key of every row is in the JSON anyway
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "ceilings": [("name", "ceiling"), ("best", "best"), ("median", "median"), ("unit", "unit"), ("method", "method")],
    "decode": [
        ("model", "model"),
        ("batch", "batch"),
        ("context", "context"),
        ("graphed", "graphed"),
        ("step_ms", "step ms (median)"),
        ("step_p90_ms", "p90 ms"),
        ("floor_ms", "floor ms"),
        ("ratio", "step / floor"),
        ("cpu_ms", "CPU ms"),
        ("cpu_share", "CPU share"),
        ("pass", "pass"),
        ("note", "note"),
    ],
    "prefill": [
        ("model", "model"),
        ("new_tokens", "new tokens"),
        ("cached_tokens", "cached prefix"),
        ("ms", "ms (median)"),
        ("tflop", "TFLOP"),
        ("achieved_tflops", "TFLOP/s"),
        ("ratio", "of matmul rate"),
        ("pass", "pass"),
    ],
    "vision": [
        ("model", "model"),
        ("case", "input"),
        ("patches", "patches"),
        ("ms", "ms (median)"),
        ("tflop", "TFLOP"),
        ("achieved_tflops", "TFLOP/s"),
        ("ratio", "of matmul rate"),
        ("path", "path"),
        ("pass", "pass"),
    ],
    "kv_plan": [
        ("model", "model"),
        ("total_gib", "total GiB"),
        ("weights_gib", "weights GiB"),
        ("peak_activation_gib", "peak act. GiB"),
        ("other_gib", "other reserved GiB"),
        ("expected_kv_gib", "left for KV GiB"),
        ("kv_cache_gib", "KV allocated GiB"),
        ("num_kv_blocks", "blocks"),
        ("ratio", "allocated / left"),
        ("pass", "pass"),
        ("note", "note"),
    ],
    "bench": [("workload", "workload"), ("returncode", "exit"), ("rows", "rows"), ("file", "file"), ("note", "note")],
}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(header for _, header in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if "skipped" in row:
            described = ", ".join(f"{k}={row[k]}" for k, _ in columns[:3] if k in row)
            lines.append(f"| {described} | skipped: {_cell(row['skipped'])} |" + " |" * (len(columns) - 2))
            continue
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    run = report["run"]
    out = [
        f"# GPU path report: {run.get('name', '')}",
        "",
        f"- command: `{run['command']}`",
        f"- device: {run.get('device')}; torch {run.get('torch')}, triton {run.get('triton')}, CUDA {run.get('cuda')}",
        f"- commit: {run.get('commit')}",
        f"- started {run.get('started')}, finished {run.get('finished')}",
        "",
    ]
    for name, section in report["sections"].items():
        out.append(f"## {name}: {section['status']}")
        out.append("")
        if section.get("target"):
            out.append(f"Target: {section['target']}")
            out.append("")
        for note in section.get("notes", []):
            out.append(f"- {note}")
        if section.get("notes"):
            out.append("")
        if name == "tests":
            counts = section.get("counts") or {}
            out.append("counts: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"))
            if section.get("tail"):
                out += ["", "```", section["tail"].rstrip(), "```"]
        elif section.get("rows"):
            out.append(markdown_table(section["rows"], COLUMNS.get(name) or [(k, k) for k in section["rows"][0]]))
        if section.get("error"):
            out += ["", "```", section["error"].rstrip(), "```"]
        out.append("")
    return "\n".join(out)


def write_results(out_dir: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path
