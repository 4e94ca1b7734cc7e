"""`spaceserve bench` end to end on the tiny preset, in-process: the JSON rows, failures, the plot."""

import os
import random

import pytest

from spaceserve.bench.metrics import STATISTICS
from spaceserve.bench.report import read_jsonl, row_fields
from spaceserve.bench.runner import SweepConfig, WorkloadSet
from spaceserve.bench.workloads import IntRange, PromptTextMaker, WorkloadOptions
from spaceserve.cli import main

# small images and short outputs keep a run at a few seconds on two CPU cores
TINY_RUN = [
    "tiny-qwen2-vl",
    "--kv-cache-memory-bytes", str(64 << 20),
    "--image-sizes", "56x56,112x112",
    "--prompt-len", "12",
    "--output-len", "6",
    "--num-prompts", "5",
    "--num-warmups", "2",
    "--disable-tqdm",
]


def test_inprocess_run_writes_every_field(tmp_path):
    out, png = tmp_path / "results.jsonl", tmp_path / "plot.png"
    seed = str(random.randrange(1 << 20))
    code = main(
        ["bench", *TINY_RUN, "--seed", seed, "--request-rate", "20,inf", "--slo", "ttft=60,tpot=10",
         "--label", "ci", "--out", str(out), "--plot", str(png)]
    )
    assert code == 0
    rows = read_jsonl(out)
    assert [row["request_rate"] for row in rows] == [20.0, "inf"]
    for row in rows:
        assert list(row) == row_fields()
        # null by meaning here: no error, no server, no limit, no video to decode; and whether the tree is dirty is
        # unknown where the commit comes from SPACESERVE_COMMIT (a copy of the tree without a trustworthy .git)
        unset = ("error", "base_url", "max_concurrency")
        unset += tuple(f"{s}_ttft_{part}_ms" for s in STATISTICS for part in ("video_decode", "overlap"))
        if os.environ.get("SPACESERVE_COMMIT"):
            unset += ("git_dirty",)
        missing = [name for name, value in row.items() if value is None and name not in unset]
        assert not missing, f"fields without a value: {missing}"
        assert row["status"] == "ok" and row["completed"] == 5 and row["failed"] == 0
        assert row["backend"] == "inprocess" and row["multiplex"] == "time" and row["encoder_policy"] == "fcfs"
        assert row["num_warmups"] == 2 and row["warmup_failed"] == 0 and row["label"] == "ci"
        assert row["total_output_tokens"] == 5 * 6 and row["output_len_mismatches"] == 0
        assert row["goodput"] == pytest.approx(row["request_throughput"])  # limits no CPU run can miss
        assert row["p50_ttft_ms"] <= row["p99_ttft_ms"] <= row["p99_e2el_ms"]
        assert row["mean_encoder_queue_ms"] >= 0
        assert row["workload"] == "image-mix" and row["workload_options"]["image_sizes"] == ["56x56", "112x112"]
        settings = row["engine_settings"]
        assert settings["scheduler"]["max_num_batched_tokens"] == 8192 and settings["encoder"]["budget_tokens"] > 0
        assert settings["num_kv_blocks"] > 0 and settings["engine_args"]["kv_cache_memory_bytes"] == 64 << 20
        assert row["spaceserve_version"] and row["device"]
        # each rate point sends its own requests: nothing is served from the previous run's prefix cache beyond
        # the chat template's shared system prompt
        counters = row["engine_counters"]
        assert counters["num_preemptions"] == 0 and counters["prefix_cache_query_tokens"] == row["total_input_tokens"]
        assert counters["prefix_cache_hit_tokens"] < row["total_input_tokens"] // 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unavailable_mode_fails_its_rows_and_bad_requests_are_counted(tmp_path):
    out = tmp_path / "results.jsonl"
    while True:  # a seed whose requests include some with two images (refused) and some without
        seed = random.randrange(1 << 20)
        config = SweepConfig("custom", WorkloadOptions(5, seed, ((56, 56), (112, 112)), IntRange(0, 2),
                                                       IntRange(12, 12), IntRange(6, 6)), (float("inf"),))
        specs, _ = WorkloadSet(config, PromptTextMaker(None)).rate_point(0)
        too_many = sum(len(spec.media) > 1 for spec in specs)
        if 0 < too_many < 5:
            break
    args = [*TINY_RUN, "--seed", str(seed), "--workload", "custom", "--images-per-request", "0:2",
            "--limit-mm-per-prompt", "image=1", "--num-warmups", "0"]
    code = main(["bench", *args, "--multiplex", "time,space", "--out", str(out)])
    assert code == 1  # a failed mode makes the exit status say so
    time_row, space_row = read_jsonl(out)

    assert time_row["status"] == "ok"
    assert time_row["failed"] == too_many and time_row["completed"] == 5 - too_many
    (message,) = time_row["errors"]
    assert "InvalidInputError" in message and "image" in message
    assert space_row["status"] == "failed" and "space" in space_row["error"]
    assert list(space_row) == row_fields() and space_row["completed"] is None


def test_bad_flags_are_refused(capsys):
    assert main(["bench", "tiny-qwen2-vl", "--workload", "image-mix", "--images-per-request", "2"]) == 2
    assert "custom" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "tiny-qwen2-vl", "--image-sizes", "448"])
