"""scripts/mps_check.py on the CPU: the daemon it starts is stopped however its block ends (an exception, a
signal), and its summary builds the table from result files."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from scripts.mps_check import mps_daemon, summarize
from tests.runtime.fake_mps import fake_mps_environment


def _daemon_pid(env: dict) -> int:
    log = Path(env["SPACESERVE_MPS_DIR"]) / "log" / "control.log"
    return int(re.findall(r"Control (\d+)\]", log.read_text())[-1])


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("ending", ["exception", "sigterm"])
def test_the_daemon_is_stopped_however_the_run_ends(ending):
    with fake_mps_environment() as env:
        env = {**os.environ, **env}
        handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises((RuntimeError, SystemExit)):
            with mps_daemon(env) as mps_env:
                pid = _daemon_pid(env)
                assert mps_env["CUDA_MPS_PIPE_DIRECTORY"] == f"{env['SPACESERVE_MPS_DIR']}/pipe"
                assert os.path.exists(f"{mps_env['CUDA_MPS_PIPE_DIRECTORY']}/control")
                if ending == "exception":
                    raise RuntimeError("a bench run broke")
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        assert _gone(pid), "the MPS daemon was left running"
        assert signal.getsignal(signal.SIGTERM) == handler  # the run's own handler is undone


def test_the_summary_has_the_papers_table_and_the_loop_counters(tmp_path):
    counters = {"lm_steps": 200, "lm_rows": 3000, "lm_host_s": 0.3, "lm_wait_s": 0.9, "lm_gpu_s": 1.0,
                "lm_gpu_gap_s": 0.05, "encoder_batches": 20, "encoder_launch_s": 0.04, "encoder_copy_out_s": 0.0004}
    rows = [{"label": label, "multiplex": mode, "completed": 100, "failed": 0, "mean_tpot_ms": tpot,
             "p99_tpot_ms": tpot * 2, "p50_ttft_ms": 150.0, "p99_ttft_ms": 500.0, "engine_counters": counters}
            for label, mode, tpot in (("time", "time", 40.0), ("mps", "mps", 30.5), ("space-process", "space", 4.9))]
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "run.json").write_text(json.dumps({"model": "m", "commit": "abc", "rate": 10.0, "gpu": "H200",
                                                   "runs": [{"label": "space", "rc": "timeout"}], "tests_rc": 0}))
    load = {"ms_per_iteration": 2.0}
    (tmp_path / "concurrency.json").write_text(json.dumps({"mps": {
        "percentages": [64, 36], "alone": {"lm": load, "encoder": {"ms_per_iteration": 30.0}},
        "together": {"lm": {"ms_per_iteration": 2.2}, "encoder": {"ms_per_iteration": 33.0}},
        "combined": 2.0 / 2.2 + 30.0 / 33.0}}))
    text = summarize(tmp_path)
    assert "| mps | 100/0 | 30.50 | 61.00 |" in text
    assert "| space-process | 100/0 | 4.90 |" in text
    assert "| 15.0 | 1.50 | 4.50 | 5.0% | 2.00 | 20 | 20.0 |" in text  # batch, host, wait, gap, launch, copy-out
    assert "space did not finish (rc timeout)" in text
    assert "| MPS, LM 64% / encoder 36% | 2.00 | 2.20 | 30.00 | 33.00 | 1.82 |" in text
    assert json.loads((tmp_path / "summary.json").read_text())["rows"][1]["mode"] == "mps"
