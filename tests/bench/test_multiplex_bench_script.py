"""scripts/multiplex_bench.py on the CPU: the encoder-process modes get series of their own in the summary, next to
space in the same call, with the ring's copy-out per batch in the loop table."""

from __future__ import annotations

import json
import random

from scripts.multiplex_bench import series_name, summarize


def _row(rng: random.Random, multiplex: str, rate: float, *, encoder_process: bool = False,
         workload: str = "image-mix") -> dict:
    counters = {"lm_steps": 400, "lm_host_s": 0.8, "lm_wait_s": 1.2, "encoder_batches": 50,
                "encoder_launch_s": 0.2, "encoder_busy_s": 1.0, "encoder_full_device_batches": 3}
    if encoder_process:
        counters["encoder_copy_out_s"] = 0.0125
    return {"workload": workload, "multiplex": multiplex, "encoder_policy": "fcfs", "request_rate": rate,
            "status": "ok", "completed": 100, "failed": 0, "model": "m", "device": "H200", "git_commit": "abc",
            "engine_settings": {"engine_args": {"encoder_process": encoder_process}},
            "mean_tpot_ms": rng.uniform(4, 40), "p99_tpot_ms": rng.uniform(40, 80),
            "p50_ttft_ms": rng.uniform(100, 900), "p99_ttft_ms": rng.uniform(900, 3000),
            "goodput": rng.uniform(1, rate), "engine_counters": counters}


def test_space_across_processes_is_its_own_series_compared_with_space(tmp_path):
    rng = random.Random(7)
    rows = [_row(rng, mode, rate, encoder_process=process)
            for rate in (4.0, 10.0) for mode, process in (("time", False), ("space", False), ("mps", False),
                                                         ("space", True))]
    (tmp_path / "image-mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [series_name(r) for r in rows[:4]] == ["time/fcfs", "space/fcfs", "mps/fcfs", "space-process/fcfs"]
    text = summarize(tmp_path)
    space, mps, process = rows[5], rows[6], rows[7]  # rate 10
    assert (f"- rate 10: mps / space: mean TPOT {mps['mean_tpot_ms'] / space['mean_tpot_ms']:.2f}x, "
            f"p50 TTFT {mps['p50_ttft_ms'] / space['p50_ttft_ms']:.2f}x") in text
    assert f"- rate 10: space-process / space: mean TPOT {process['mean_tpot_ms'] / space['mean_tpot_ms']:.2f}x" in text
    assert "| space-process/fcfs | 10 | 2.000 | 3.000 | 4.0 | 20.0 | 3 | 250.0 |" in text
    assert "| space/fcfs | 10 | 2.000 | 3.000 | 4.0 | 20.0 | 3 | - |" in text


def test_unknown_modes_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    import sys

    import pytest

    from scripts import multiplex_bench

    monkeypatch.setattr(sys, "argv", ["multiplex_bench.py", "m", "--modes", "time,mpss", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        multiplex_bench.main()
    assert "unknown modes ['mpss']" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # not even the ceilings were measured


def test_the_encoder_process_modes_run_under_a_daemon_that_is_stopped_after(tmp_path, monkeypatch):
    import os
    import sys
    import time

    from scripts import multiplex_bench
    from tests.runtime.fake_mps import fake_mps_environment

    ran: list[tuple[list[str], dict | None]] = []

    def fake_run(command, out, timeout_s, cwd, what, env=None):
        alive = env is not None and os.path.exists(os.path.join(env["CUDA_MPS_PIPE_DIRECTORY"], "control"))
        ran.append((command, env, alive))
        return 0

    monkeypatch.setattr(multiplex_bench, "run_logged", fake_run)
    monkeypatch.setattr(multiplex_bench, "prepare_results", lambda args: (tmp_path, time.monotonic() + 100))
    with fake_mps_environment() as fake:
        for name, value in fake.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(sys, "argv", ["multiplex_bench.py", "m", "--modes", "time,space,mps,space-process",
                                          "--rates", "4,10", "--out-dir", str(tmp_path)])
        multiplex_bench.main()
        assert not os.path.exists(os.path.join(fake["SPACESERVE_MPS_DIR"], "pipe", "control")), "daemon left running"
    plain = [(c, alive) for c, env, alive in ran if env is None]
    under_daemon = [(c, alive) for c, env, alive in ran if env is not None]
    assert [c[c.index("--workload") + 1] for c, _ in plain] == ["text-only", "image-mix"]
    assert plain[1][0][plain[1][0].index("--multiplex") + 1] == "time,space"
    assert [(c[c.index("--multiplex") + 1], c[-2:] if c[-2] == "--encoder-mps-percentage" else c[-1:])
            for c, _ in under_daemon] == [("mps", ["--encoder-mps-percentage", "36"]), ("space", ["--encoder-process"])]
    assert all(alive for _, alive in under_daemon)
