"""scripts/vision_graph_check.py end to end in its CPU smoke mode (tiny towers, the eager_replay seam): it runs, every
model row lands in summary.json with graphed batches equal to eager, and the table is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "vision_graph_check.py"


def test_smoke_run_writes_every_row(tmp_path):
    out = tmp_path / "smoke"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--skip-checks", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["head_split"] in ("padded", "split", "split32")
    assert [m["model"] for m in summary["models"]] == ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
    for model in summary["models"]:
        assert "error" not in model, model.get("traceback")
        for label in ("9216", "mixed"):
            row = model["batches"][label]
            assert row["graph_bucket"] >= row["patches"]
            assert row["eager_vs_graph"]["finite"] and row["eager_vs_graph"]["relative_error"] < 1e-5
            for kind in ("eager", "graph"):
                assert row[kind]["host_ms"] > 0 and row[kind]["gpu_ms"] > 0
    assert summary["models"][0]["default_ladder"]["streams"]
    assert "| tiny-qwen2.5-vl | mixed |" in (out / "summary.md").read_text()
