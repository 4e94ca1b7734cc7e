"""scripts/video_ttft_check.py in its CPU smoke form (tiny model, a small clip): every run lands in the summary with
its TTFT split, the checks compare the pipelined runs with the baseline, and the pipelined requests were chunked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "video_ttft_check.py"


def test_smoke_run_reports_every_run_and_check(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--models", "tiny-qwen2-vl", "--resolutions", "96x64", "--seconds", "4",
               "--clip-dir", str(tmp_path / "clips"), "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 2), done.stderr[-3000:]  # 2: a target missed (a CPU decodes slowly)
    summary = json.loads((out / "summary.json").read_text())
    (model,) = summary["models"]
    runs = [(row["mode"], row["run"]) for row in model["rows"]]
    assert runs == [("pipelined", "first"), ("unpipelined", "first"), ("baseline", "frames given"),
                    ("pipelined", "steady"), ("unpipelined", "steady")]  # fmt: skip
    for row in model["rows"]:
        assert row["ttft_s"] > 0 and row["encode_s"] > 0 and row["prefill_s"] > 0 and row["overlap_s"] >= 0
        assert row["video_chunks"] == (1 if row["mode"] != "pipelined" else 3)
        assert (row["decode"]["backend"] == "frames given") == (row["mode"] == "baseline")
    assert [c["run"] for c in model["checks"]] == ["first", "steady"]
    assert all(c["met"] == (c["ratio"] <= 1.15) for c in model["checks"])
    assert "x baseline" in (out / "summary.md").read_text() and summary["environment"]["commit"]
