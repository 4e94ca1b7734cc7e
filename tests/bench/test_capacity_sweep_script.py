"""scripts/capacity_sweep.py: a real (tiny, CPU) run of its bench commands, and its summary on synthetic rows."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from tests.bench.test_capacity import SLO25, SLO50, row

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "capacity_sweep.py"


def load_script():
    spec = importlib.util.spec_from_file_location("capacity_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_runs_its_bench_commands_and_the_policy_study(tmp_path):
    common = ["tiny-qwen2-vl", "--rates", "20", "--num-prompts", "3", "--num-warmups", "0", "--output-len", "3",
              "--prompt-len", "8", "--out-dir", str(tmp_path), "--engine-args",
              "--dtype float32 --kv-cache-memory-bytes 8388608 --encoder-cache-tokens 16384"]
    done = subprocess.run([sys.executable, str(SCRIPT), *common, "--workloads", "aspect-mix", "--modes", "time"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = subprocess.run([sys.executable, str(SCRIPT), *common, "--policy-study", "--policy-mode", "streams"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for path in ("aspect-mix", "text-only", "multi-image-skew")
            for line in (tmp_path / f"{path}.jsonl").read_text().splitlines()]
    assert {r["status"] for r in rows} == {"ok"}
    aspect = [r for r in rows if r["workload"] == "aspect-mix"]
    assert [SLO25.as_dict(), SLO50.as_dict()] == [r["slo"] for r in aspect] and aspect[0]["burstiness"] == 0.5
    skew = [r for r in rows if r["workload"] == "multi-image-skew"]
    assert {r["encoder_policy"] for r in skew} == {"fcfs", "twsrft"}
    assert {r["engine_settings"]["encoder"]["budget_tokens"] for r in skew} == {2048}
    summary = (tmp_path / "summary.md").read_text()
    assert "## aspect-mix" in summary and "## Encoder policy: FCFS vs TWSRFT" in summary
    assert (tmp_path / "capacity-aspect-mix.png").exists() and (tmp_path / "commands.txt").exists()


def test_summary_states_capacities_and_targets(tmp_path):
    rows = []
    allocator = {"allocator_lm_whole_decisions": 30, "allocator_split_decisions": 12, "allocator_lm_step_count": 40,
                 "allocator_lm_step_predicted_s": 0.2, "allocator_lm_step_actual_s": 0.22,
                 "allocator_lm_step_curve_count": 40, "allocator_lm_step_curve_predicted_s": 0.1,
                 "allocator_lm_step_curve_actual_s": 0.22, "allocator_tpot_violations": 3}
    for rate, space_att, time_att in ((4, 1.0, 1.0), (8, 0.97, 0.6), (12, 0.5, 0.1)):
        for slo in (SLO25, SLO50):
            rows.append(row("space", rate, slo, space_att, tpot=3.0, ttft=110.0)
                        | {"model": "m", "device": "d", "engine_counters": allocator})
            rows.append(row("time", rate, slo, time_att, tpot=30.0, ttft=100.0) | {"model": "m", "device": "d"})
        rows.append(row("time", rate, SLO50, 1.0, workload="text-only", p99_tpot=5.0) | {"model": "m", "device": "d"})
    lane = allocator | {"allocator_prefill_split_decisions": 5, "allocator_prefill_step_count": 4,
                        "allocator_prefill_step_predicted_s": 0.4, "allocator_prefill_step_actual_s": 0.2,
                        "allocator_lm_step_host_count": 200, "allocator_lm_step_host_excess_s": 0.3,
                        "prefill_lane_steps": 4}
    rows.append(row("space", 4, SLO25, 1.0, tpot=3.0, ttft=110.0) | {
        "model": "m", "device": "d", "engine_counters": lane,
        "engine_settings": {"engine_args": {"enable_prefill_split": True, "slo_tpot_ms": 50.0}}})
    (tmp_path / "image-mix.jsonl").write_text("\n".join(json.dumps(r) for r in rows if r["workload"] != "text-only"))
    (tmp_path / "text-only.jsonl").write_text("\n".join(json.dumps(r) for r in rows if r["workload"] == "text-only"))
    text = load_script().summarize(tmp_path)
    assert "| space/fcfs | 8 (~" in text and "| time/fcfs | 4 (~" in text
    assert "Targets (space/fcfs against time/fcfs):" in text
    assert "capacity at ttft<=2s,tpot<=25ms: space / time: 2.00 (target >= 1.5): met" in text
    assert "space TTFT p50 / time TTFT p50 at the lightest rate (4): 1.10 (target <= 1.2): met" in text
    assert "time mean TPOT / space mean TPOT at the highest rate (12): 10.00 (target >= 10): met" in text
    assert "space p99 TPOT / text-only p99 TPOT" in text and "1.20" in text
    # the allocator's table: decisions, measured / predicted with and without the learned correction
    assert "| space/fcfs | 4 | 30/12/0/0 | 1.10 (40) | 2.20 (40) | - | - | - | 3 | - | - |" in text
    assert "| space-prefill-split/fcfs | 4 | 30/12/0/5 | 1.10 (40) | 2.20 (40) | - | 0.50 (4) | - | 3 | 1.50 | 4 |" in text
    assert "Targets (space-prefill-split/fcfs against time/fcfs):" in text
    assert "| time/fcfs | 4 | 30/" not in text
    assert load_script().parse_rates("4:5", 1.15) == [4.0, 4.6, 5.29]
