"""The GPU-path report script end to end in its CPU smoke mode: every section and field lands in results.json, a
failing section is recorded while the others still run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_path_report.py"
SECTIONS = ["tests", "ceilings", "decode", "prefill", "vision", "kv_plan", "bench"]
DECODE_FIELDS = ["model", "batch", "context", "graphed", "step_ms", "floor_ms", "ratio", "weight_bytes", "kv_read_bytes",
                 "cpu_ms", "cpu_share", "cpu_method", "ratio_pass", "cpu_pass", "pass", "target"]  # fmt: skip
RATE_FIELDS = ["ms", "flops", "achieved_tflops", "ratio", "pass", "target"]


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_path_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_every_section_and_field(tmp_path):
    out = tmp_path / "smoke-run"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--skip-tests", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    run = report["run"]
    for key in ("name", "command", "commit", "device", "torch", "triton", "cuda", "started", "finished", "seconds"):
        assert key in run, key
    assert run["name"] == "smoke-run" and run["smoke"] is True
    assert report["ceilings"]["copy_bandwidth_bytes_per_s"] > 0 and report["ceilings"]["matmul_tflops"] > 0
    assert list(report["sections"]) == SECTIONS
    sections = report["sections"]
    assert sections["tests"]["status"] == "skipped"
    assert sections["bench"]["status"] == "skipped"
    for name in ("ceilings", "decode", "prefill", "vision", "kv_plan"):
        assert sections[name]["status"] not in ("skipped", "error"), (name, sections[name].get("error"))

    settings = report["settings"]
    decode = sections["decode"]["rows"]
    assert len(decode) == len(settings["decode_batches"]) * len(settings["decode_contexts"])
    for row in decode:
        assert all(field in row for field in DECODE_FIELDS), sorted(row)
        assert row["floor_ms"] > 0 and row["step_ms"] > 0
        assert row["ratio"] == pytest.approx(row["step_ms"] / row["floor_ms"])
    for name, expected in (("prefill", len(settings["prefill_cases"])), ("vision", len(settings["vision_cases"]))):
        rows = sections[name]["rows"]
        assert len(rows) == expected
        for row in rows:
            assert all(field in row for field in RATE_FIELDS), (name, sorted(row))
            assert row["flops"] > 0
    kv_row = sections["kv_plan"]["rows"][0]
    assert kv_row["num_kv_blocks"] > 0 and "memory_plan" in kv_row

    markdown = (out / "results.md").read_text()
    for name in SECTIONS:
        assert f"## {name}:" in markdown
    assert "--smoke" in markdown


def test_a_failing_section_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    script = _load_script()

    def broken(*args, **kwargs):
        raise RuntimeError("injected prefill failure")

    monkeypatch.setattr(script.S, "run_prefill", broken)
    out = tmp_path / "broken"
    assert script.main(["--smoke", "--skip-tests", "--only", "prefill,vision", "--out", str(out)]) == 0
    sections = json.loads((out / "results.json").read_text())["sections"]
    assert sections["prefill"]["status"] == "error"
    assert "injected prefill failure" in sections["prefill"]["error"]
    assert sections["ceilings"]["status"] == "ok"  # prefill and vision need the ceilings, so they ran first
    assert sections["vision"]["status"] not in ("error", "skipped")
    assert sections["decode"]["status"] == "skipped" and sections["kv_plan"]["status"] == "skipped"


def test_unknown_section_names_are_refused():
    script = _load_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--out", "x", "--only", "decode,warp-drive"])
