"""Issue 14's GPU check, in one run on one H200 (a few minutes): the encoder in a process of its own, under MPS.

    python3 scripts/mps_check.py --out DIR                     # everything below
    python3 scripts/mps_check.py --out DIR --sections bench    # some of it: ceilings,concurrency,tests,bench
    python3 scripts/mps_check.py --summarize DIR               # rebuild DIR/summary.md from its files

It starts its own MPS daemon (scripts/mps_daemon.sh, a private directory) and stops it in a `finally`, on SIGTERM,
SIGINT and SIGHUP, and at exit; it also stops one a killed earlier run left in that directory before it starts.
It never initialises CUDA itself (a context made before the daemon would not be an MPS client): every measurement
runs in a child process.

1. ceilings: copy bandwidth and the bf16 matmul rate (profile/hardware.py).
2. concurrency, without a daemon and under one: an LM-like decode loop (a CUDA graph of memory-bound GEMMs at batch
   64 over ~2.8 GB of 2B-sized weights) and the Qwen2-VL-2B vision tower (2 images of 896x896, eager), in two
   processes: each alone, then both together. "combined" = the sum of each process's throughput together as a
   fraction of its throughput alone: ~1.0 means they time-slice, ~2.0 that they run fully concurrently. Under MPS
   the loops run at the mps mode's percentages (LM 100-p, encoder p).
3. tests under the daemon: the CUDA IPC ring and its interprocess events between two processes, and greedy tokens
   identical across time, space, mps and space across processes (pytest -m gpu).
4. `spaceserve bench` of MODEL image-mix at RATE req/s: time and space (in this process's engine core) without the
   daemon, mps and space --encoder-process under it: the paper's table (TPOT at 10 req/s, MPS against SM
   partitions) in this engine, with the loop counters (LM host time per step with the encoder out of process, GPU
   gaps between LM steps, encoder launch time per batch, the ring copy-out per batch).

Results: DIR/ceilings.json, concurrency.json, bench.jsonl (+ one log per run), tests.log, summary.json, summary.md.
Sections that would overrun --time-budget-s are skipped (and said so); a second call with the same --out and other
--sections adds to the same files, so the whole check can be split over two device calls:

    python3 scripts/mps_check.py --out DIR --sections ceilings,bench
    python3 scripts/mps_check.py --out DIR --sections concurrency,tests
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from spaceserve.bench.sweep import measure_ceilings_in_child  # noqa: E402
from spaceserve.child_pythonpath import child_pythonpath  # noqa: E402
from spaceserve.profile.process_concurrency import measure_concurrency  # noqa: E402
DAEMON = REPO / "scripts" / "mps_daemon.sh"
SECTIONS = ("ceilings", "concurrency", "tests", "bench")
PREDICTIONS = """Predicted before the run:
- concurrency: without a daemon the two processes time-slice (combined ~1.0-1.1); under MPS they overlap (combined
  >= 1.6; the LM loop is memory-bound, the tower compute-bound, so they share the device well).
- bench at 10 req/s: space (in-process) ~5 ms mean TPOT (benchmarks/results/multiplex-2b-h200: 5.0 ms); space across
  processes about the same or lower (no GIL shared with the encoder); mps between space and time: the LM capped at
  ~64% of the SMs and sharing them with a busy tower with no fence, so TPOT spikes while images encode (the paper:
  MPS 132 ms against 40.7 ms for partitions, at its scale).
- LM host time per step lower with the encoder out of process than in it (no encoder thread taking the GIL).
- ring copy-out: tens of microseconds per batch (a few MB at TB/s, one sync)."""


# ---- the MPS daemon ---------------------------------------------------------------------------------------------

def child_environment() -> dict[str, str]:
    """This process's environment for the runs' children: unbuffered, importing this spaceserve, and without an MPS
    thread cap inherited from the caller (each mode sets its own)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": child_pythonpath(os.environ.get("PYTHONPATH"))}
    env.pop("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", None)
    return env


def _daemon(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(DAEMON), command], env=env, capture_output=True, text=True, timeout=60)


@contextmanager
def mps_daemon(base_env: dict[str, str]):
    """Start a daemon for the block; yields the environment its clients need. Stopped however the block ends."""
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            result = _daemon("stop", base_env)
            print(f"mps daemon: {result.stderr.strip()}", flush=True)

    atexit.register(stop)  # before the start: a start that fails or times out may still leave a daemon running
    try:
        started = _daemon("start", base_env)
    except subprocess.TimeoutExpired:
        stop()
        raise RuntimeError("the MPS daemon did not answer within 60 s; stopped it") from None
    if started.returncode != 0:
        stop()
        raise RuntimeError(f"the MPS daemon did not start: {started.stderr.strip()}")
    env = dict(base_env)
    for word in started.stdout.split():
        if "=" in word:
            name, value = word.split("=", 1)
            env[name] = value
    previous = {}

    def on_signal(signum, _frame):
        raise SystemExit(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        previous[signum] = signal.signal(signum, on_signal)
    try:
        print(f"mps daemon: {started.stderr.strip()}", flush=True)
        yield env
    finally:
        stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ---- the run ----------------------------------------------------------------------------------------------------

def _bench(args, out: Path, mode: str, label: str, extra: list[str], env: dict[str, str], limit_s: float) -> dict:
    command = [
        sys.executable, "-m", "spaceserve.cli", "bench", args.model, "--load-format", "dummy", "--dtype", "bfloat16",
        "--workload", "image-mix", "--image-sizes", args.image_sizes, "--multiplex", mode,
        "--request-rate", str(args.rate), "--num-prompts", str(args.num_prompts), "--num-warmups", "8",
        "--output-len", str(args.output_len), "--slo", "ttft=2,tpot=0.05", "--out", str(out / "bench.jsonl"),
        "--label", label, "--disable-tqdm", *extra, *args.engine_args.split(),
    ]  # fmt: skip
    print(f"bench {label}: {' '.join(command)}", flush=True)
    started = time.monotonic()
    with open(out / f"bench-{label}.log", "w") as log:
        try:
            code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit_s,
                                  cwd=str(REPO)).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return {"label": label, "rc": code, "seconds": round(time.monotonic() - started, 1), "command": command}


def run_checks(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.time_budget_s
    sections = set(filter(None, args.sections.split(",")))
    bench_modes = set(filter(None, args.bench_modes.split(",")))
    env = child_environment()
    stale = _daemon("stop", env)  # one a killed earlier run may have left in the private directory
    print(f"mps daemon before the run: {stale.stderr.strip()}", flush=True)
    earlier = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    report: dict[str, Any] = {"commit": _commit(), "model": args.model, "rate": args.rate,
                              "runs": earlier.get("runs", []), "encoder_mps_percentage": args.encoder_mps_percentage}
    if "tests_rc" in earlier:
        report["tests_rc"] = earlier["tests_rc"]
    machine = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_mode",
                              "--format=csv,noheader"], capture_output=True, text=True)
    report["gpu"] = machine.stdout.strip() or machine.stderr.strip()
    percentages = (100 - args.encoder_mps_percentage, args.encoder_mps_percentage)
    concurrency: dict[str, Any] = (json.loads((out / "concurrency.json").read_text())
                                   if (out / "concurrency.json").exists() else {})

    def left() -> float:
        return deadline - time.monotonic()

    if "ceilings" in sections:
        try:
            ceilings = measure_ceilings_in_child(env)
        except RuntimeError as exc:
            ceilings = {"error": str(exc)}
        (out / "ceilings.json").write_text(json.dumps(ceilings))
    if "concurrency" in sections and left() > 60:
        concurrency["no_mps"] = measure_concurrency(args.model, env, args.concurrency_s, None)
        (out / "concurrency.json").write_text(json.dumps(concurrency, indent=1))
    if "bench" in sections:
        for mode in [m for m in ("time", "space") if m in bench_modes]:
            if left() < 90:
                print(f"skipping bench {mode}: {left():.0f} s left", flush=True)
                continue
            report["runs"].append(_bench(args, out, mode, mode, [], env, min(left() - 30, 240)))
    if sections & {"concurrency", "tests", "bench"}:
        try:
            with mps_daemon(env) as mps_env:
                if "concurrency" in sections and left() > 60:
                    concurrency["mps"] = measure_concurrency(args.model, mps_env, args.concurrency_s, percentages)
                    (out / "concurrency.json").write_text(json.dumps(concurrency, indent=1))
                if "bench" in sections:
                    for mode, label, extra in (
                        ("mps", "mps", ["--encoder-mps-percentage", str(args.encoder_mps_percentage)]),
                        ("space", "space-process", ["--encoder-process"]),
                    ):
                        if label not in bench_modes:
                            continue
                        if left() < 90:
                            print(f"skipping bench {label}: {left():.0f} s left", flush=True)
                            continue
                        report["runs"].append(_bench(args, out, mode, label, extra, mps_env, min(left() - 30, 240)))
                if "tests" in sections and left() > 60:
                    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                               "tests/runtime/test_embedding_ring.py", "tests/engine/test_encoder_process.py"]
                    with open(out / "tests.log", "w") as log:
                        try:
                            code = subprocess.run(command, env=mps_env, stdout=log, stderr=subprocess.STDOUT,
                                                  timeout=min(left() - 30, 200), cwd=str(REPO)).returncode
                        except subprocess.TimeoutExpired:
                            code = "timeout"
                    report["tests_rc"] = code
        except RuntimeError as exc:  # the daemon did not start, or a load process did not: recorded, then summarized
            print(f"mps phase failed: {exc}", flush=True)
            report["mps_error"] = str(exc)
    (out / "run.json").write_text(json.dumps(report, indent=1))
    summary = summarize(out)
    print(summary, flush=True)
    failed_runs = [r["label"] for r in report["runs"] if r["rc"] != 0]
    return 1 if failed_runs or report.get("tests_rc", 0) != 0 or "mps_error" in report else 0


def _commit() -> str:
    if os.environ.get("SPACESERVE_COMMIT"):
        return os.environ["SPACESERVE_COMMIT"]
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=str(REPO))
    return result.stdout.strip() or "unknown"


# ---- summary ----------------------------------------------------------------------------------------------------

def _rows(out: Path) -> list[dict[str, Any]]:
    path = out / "bench.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _per(counters: dict[str, float], total: str, count: str, scale: float = 1e3) -> float | None:
    n = counters.get(count) or 0
    return counters.get(total, 0.0) / n * scale if n else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summarize(out: Path) -> str:
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    lines = [f"# The encoder in a process of its own: MPS against SM partitions ({run.get('model', '?')}, commit "
             f"{run.get('commit', '?')})", "", f"GPU: {run.get('gpu', '?')}"]
    if (out / "ceilings.json").exists():
        ceilings = json.loads((out / "ceilings.json").read_text())
        copy = (ceilings.get("copy_bandwidth") or {}).get("best")
        matmul = (ceilings.get("matmul_bf16") or {}).get("best")
        if copy and matmul:
            lines.append(f"Ceilings measured in the run: copy {copy / 1e12:.2f} TB/s, bf16 matmul {matmul:.0f} "
                         f"TFLOP/s, {ceilings.get('sms')} SMs, torch {ceilings.get('torch')}")
        else:
            lines.append(f"Ceilings: `{json.dumps(ceilings)[:300]}`")
    lines += ["", f"## TPOT at {run.get('rate', '?')} req/s (image-mix), with the loop counters", "",
              "| mode | done/failed | mean TPOT ms | p99 TPOT ms | p50 TTFT ms | p99 TTFT ms | mean batch "
              "| LM host ms/step | LM wait ms/step | GPU gap / LM GPU | encoder launch ms/batch | encoder batches "
              "| ring copy-out us/batch |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    summary_rows = []
    for row in _rows(out):
        c = row.get("engine_counters") or {}
        steps = c.get("lm_steps") or 0
        launch = _per(c, "encoder_launch_s", "encoder_batches") or _per(c, "encoder_inline_s", "encoder_inline_batches")
        entry = {
            "mode": row.get("label") or row.get("multiplex"),
            "completed": row.get("completed"), "failed": row.get("failed"),
            "mean_tpot_ms": row.get("mean_tpot_ms"), "p99_tpot_ms": row.get("p99_tpot_ms"),
            "p50_ttft_ms": row.get("p50_ttft_ms"), "p99_ttft_ms": row.get("p99_ttft_ms"),
            "mean_batch": c.get("lm_rows", 0) / steps if steps else None,
            "lm_host_ms_per_step": c.get("lm_host_s", 0) / steps * 1e3 if steps else None,
            "lm_wait_ms_per_step": c.get("lm_wait_s", 0) / steps * 1e3 if steps else None,
            "gpu_gap_fraction": c["lm_gpu_gap_s"] / c["lm_gpu_s"] if c.get("lm_gpu_s") else None,
            "encoder_launch_ms_per_batch": launch,
            "encoder_batches": c.get("encoder_batches", c.get("encoder_inline_batches")),
            "copy_out_us_per_batch": _per(c, "encoder_copy_out_s", "encoder_batches", 1e6),
        }  # fmt: skip
        summary_rows.append(entry)
        gap = "-" if entry["gpu_gap_fraction"] is None else f"{entry['gpu_gap_fraction'] * 100:.1f}%"
        lines.append(
            f"| {entry['mode']} | {entry['completed']}/{entry['failed']} | {_fmt(entry['mean_tpot_ms'])} | "
            f"{_fmt(entry['p99_tpot_ms'])} | {_fmt(entry['p50_ttft_ms'], 0)} | {_fmt(entry['p99_ttft_ms'], 0)} | "
            f"{_fmt(entry['mean_batch'], 1)} | {_fmt(entry['lm_host_ms_per_step'])} | "
            f"{_fmt(entry['lm_wait_ms_per_step'])} | "
            f"{gap} | "
            f"{_fmt(entry['encoder_launch_ms_per_batch'])} | {entry['encoder_batches']} | "
            f"{_fmt(entry['copy_out_us_per_batch'], 1)} |"
        )  # fmt: skip
    for failed in (r for r in run.get("runs", []) if r.get("rc") != 0):
        lines.append(f"\n{failed['label']} did not finish (rc {failed['rc']}): see bench-{failed['label']}.log")
    if (out / "concurrency.json").exists():
        concurrency = json.loads((out / "concurrency.json").read_text())
        lines += ["", "## Two processes on one GPU: an LM-like decode loop and the vision tower", "",
                  "| condition | LM ms/iter alone | together | encoder ms/iter alone | together "
                  "| combined throughput |",
                  "|---|---|---|---|---|---|"]
        for name, result in concurrency.items():
            caps = result.get("percentages")
            label = "no MPS daemon" if name == "no_mps" else f"MPS, LM {caps[0]}% / encoder {caps[1]}%"
            a, t = result["alone"], result["together"]
            lines.append(f"| {label} | {a['lm']['ms_per_iteration']:.2f} | {t['lm']['ms_per_iteration']:.2f} | "
                         f"{a['encoder']['ms_per_iteration']:.2f} | {t['encoder']['ms_per_iteration']:.2f} | "
                         f"{result['combined']:.2f} |")
        lines.append("\ncombined: 1.0 = the processes time-slice the GPU, 2.0 = they run fully concurrently.")
    if "tests_rc" in run:
        lines.append(f"\nGPU tests under MPS (tests.log): rc {run['tests_rc']}")
    if "mps_error" in run:
        lines.append(f"\nThe MPS phase failed: {run['mps_error']}")
    lines += ["", PREDICTIONS]
    (out / "summary.json").write_text(json.dumps({"rows": summary_rows, **run}, indent=1))
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "mps-check"))
    parser.add_argument("--summarize", metavar="DIR")
    parser.add_argument("--model", default="Qwen/Qwen2-VL-2B-Instruct")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    parser.add_argument("--bench-modes", default="time,space,mps,space-process",
                        help="the bench runs to make (labels), e.g. mps,space-process")
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--image-sizes", default="448x448,896x896,1344x1344")
    parser.add_argument("--encoder-mps-percentage", type=int, default=36)
    parser.add_argument("--concurrency-s", type=float, default=4.0)
    parser.add_argument("--engine-args", default="", help="extra engine flags for every bench run")
    parser.add_argument("--time-budget-s", type=float, default=560.0)
    args = parser.parse_args()
    if args.summarize:
        print(summarize(Path(args.summarize)))
        return 0
    return run_checks(args)


if __name__ == "__main__":
    sys.exit(main())
