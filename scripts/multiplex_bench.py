"""The spatial-multiplexing benchmark (issue 5): `spaceserve bench` over execution modes and request rates, the
text-only decode baseline at the same rates, the device's ceilings measured in the same run, and a summary that
checks the targets.

    # on the GPU: one call per model (or split modes across calls with --modes / --no-text-only)
    python3 scripts/multiplex_bench.py Qwen/Qwen2-VL-2B-Instruct --rates 4,12,24,36 --out-dir $OUT/2b
    # anywhere: rebuild the summary and the plot from result files (several runs' jsonl merged)
    python3 scripts/multiplex_bench.py --summarize benchmarks/results/multiplex-2b-h200

Every mode runs with the same engine settings (vLLM v1's defaults: max_num_batched_tokens 8192, encoder budget per
step max(8192, the largest item)); the rows record them. Targets (space against time, streams and text-only):
see `summarize`.

Modes `mps` (encoder and LM processes under an MPS daemon, capped by active-thread percentages) and `space-process`
(`space --encoder-process`: the same processes on the two sides of a green-context split) run under a daemon this
script starts for them and stops however the run ends (scripts/mps_daemon.sh); the other modes run without one.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.mps_check import child_environment, mps_daemon  # noqa: E402
from spaceserve.bench.capacity import series_name  # noqa: E402
from spaceserve.bench.sweep import add_results_arguments, prepare_results, result_rows, run_logged  # noqa: E402

SLO = "ttft=2,tpot=0.05"
IN_PROCESS_MODES = ("time", "streams", "space")
MPS_MODES = {"mps": "mps", "space-process": "space"}  # series -> --multiplex, run under an MPS daemon


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--summarize", metavar="DIR", help="only rebuild summary.md / plot.png from DIR/*.jsonl")
    parser.add_argument("--rates", default="4,12,24,36")
    parser.add_argument("--modes", default="time,streams,space")
    parser.add_argument("--policies", default="fcfs", help="encoder policies for every mode")
    parser.add_argument("--extra-policy-modes", default="", help="also run these modes with twsrft, e.g. space")
    parser.add_argument("--no-text-only", action="store_true", help="skip the text-only baseline")
    parser.add_argument("--num-prompts", type=int, default=300)
    parser.add_argument("--num-warmups", type=int, default=8)
    parser.add_argument("--output-len", default="128")
    parser.add_argument("--encoder-sms", type=int, default=None)
    parser.add_argument("--encoder-mps-percentage", type=int, default=36, help="the mps mode's encoder share")
    add_results_arguments(parser, "multiplex", 560.0)
    args = parser.parse_args()
    if args.summarize:
        print(summarize(Path(args.summarize)))
        return 0
    if not args.model:
        parser.error("give a model (or --summarize DIR)")
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in IN_PROCESS_MODES and m not in MPS_MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}: choose from {', '.join([*IN_PROCESS_MODES, *MPS_MODES])}")
    out, deadline = prepare_results(args)

    in_process = ",".join(m for m in modes if m in IN_PROCESS_MODES)
    runs: list[tuple[str, str, str, list[str]]] = []
    if not args.no_text_only:
        runs.append(("text-only", "time", "fcfs", []))
    if in_process:
        runs.append(("image-mix", in_process, args.policies, []))
    for mode in filter(None, args.extra_policy_modes.split(",")):
        runs.append(("image-mix", mode, "twsrft", []))
    mps_runs = [("image-mix", MPS_MODES[m], args.policies,
                 ["--encoder-mps-percentage", str(args.encoder_mps_percentage)] if m == "mps" else ["--encoder-process"])
                for m in modes if m in MPS_MODES]  # fmt: skip

    def bench(workload: str, multiplex: str, policies: str, extra: list[str], env: dict[str, str] | None) -> int:
        left = deadline - time.monotonic()
        if left < 30:
            print(f"skipping {workload} {multiplex}/{policies} {extra}: {left:.0f} s left", flush=True)
            return 1
        command = [
            sys.executable, "-m", "spaceserve.cli", "bench", args.model, "--load-format", "dummy", "--dtype", "bfloat16",
            "--workload", workload, "--multiplex", multiplex, "--encoder-policy", policies,
            "--request-rate", args.rates, "--num-prompts", str(args.num_prompts), "--num-warmups", str(args.num_warmups),
            "--output-len", args.output_len, "--slo", SLO,
            "--out", str(out / f"{workload}.jsonl"), "--disable-tqdm",
            *(["--encoder-sms", str(args.encoder_sms)] if args.encoder_sms else []),
            *extra, *shlex.split(args.engine_args),
        ]  # fmt: skip
        return run_logged(command, out, left, REPO, f"{workload} {multiplex}/{policies} {extra}", env)

    code = 0
    for run in runs:
        code |= bench(*run, None)
    if mps_runs:
        try:
            with mps_daemon(child_environment()) as mps_env:
                for run in mps_runs:
                    code |= bench(*run, mps_env)
        except RuntimeError as exc:  # the daemon did not start: said, and the run fails
            print(f"mps modes not run: {exc}", flush=True)
            code = 1
    print(summarize(out))
    return code


# ---- summary ------------------------------------------------------------------------------------------------


def summarize(directory: Path) -> str:
    rows = result_rows(directory)
    if not rows:
        return f"no successful rows in {directory}"
    by_series: dict[str, dict[float, dict[str, Any]]] = {}
    for row in rows:
        by_series.setdefault(series_name(row), {})[float(row["request_rate"])] = row
    rates = sorted({float(r["request_rate"]) for r in rows})
    first = rows[0]
    settings = first.get("engine_settings") or {}
    lines = [
        f"# {first['model']} on {first['device']}, commit {first.get('git_commit')}",
        "",
        f"{len(rows)} rate points; requests per point: {sorted({r['completed'] + r.get('failed', 0) for r in rows})}; "
        f"scheduler {settings.get('scheduler')}; encoder {settings.get('encoder')}",
        "",
    ]
    ceilings = directory / "ceilings.json"
    c = json.loads(ceilings.read_text()) if ceilings.exists() else {}
    if "copy_bandwidth" in c:
        lines += [
            f"Ceilings measured in the run: copy {c['copy_bandwidth']['best'] / 1e12:.2f} TB/s, bf16 matmul "
            f"{c['matmul_bf16']['best']:.0f} TFLOP/s, {c['sms']} SMs",
            "",
        ]
    splits = {
        json.dumps(r["engine_settings"]["execution"], sort_keys=True)
        for r in rows
        if (r.get("engine_settings") or {}).get("execution", {}) and r["multiplex"] == "space"
    }
    for split in sorted(splits):
        lines.append(f"space split: {split}")
    lines += ["", "| series | rate | mean TPOT | p99 TPOT | p50 TTFT | p99 TTFT | goodput | completed |", "|---|---|---|---|---|---|---|---|"]
    for name in sorted(by_series):
        for rate in rates:
            row = by_series[name].get(rate)
            if row is not None:
                lines.append(
                    f"| {name} | {rate:g} | {fmt(row['mean_tpot_ms'])} | {fmt(row['p99_tpot_ms'])} | "
                    f"{fmt(row['p50_ttft_ms'])} | {fmt(row['p99_ttft_ms'])} | {fmt(row.get('goodput'), 2)} | "
                    f"{row['completed']} |"
                )
    lines += ["", "## Targets", ""] + targets(by_series, rates)
    lines += ["", "## Host time per loop (GIL pressure)", ""] + loop_table(by_series, rates)
    text = "\n".join(lines) + "\n"
    (directory / "summary.md").write_text(text)
    try:
        from spaceserve.bench.plot import plot_rows

        labelled = [{**r, "multiplex": series_name(r), "encoder_policy": ""} for r in rows]
        plot_rows(labelled, directory / "plot.png", title=f"{first['model']} image-mix vs text-only, {first['device']}")
    except Exception as exc:  # noqa: BLE001 - a missing plot never hides the numbers
        text += f"\n(no plot: {exc})\n"
    return text


def targets(by_series: dict[str, dict[float, dict[str, Any]]], rates: list[float]) -> list[str]:
    space, time_, streams, text = (by_series.get(k, {}) for k in ("space/fcfs", "time/fcfs", "streams/fcfs", "text-only"))
    out = []
    for rate in rates:
        if rate in space and rate in text:
            ratio = space[rate]["p99_tpot_ms"] / text[rate]["p99_tpot_ms"]
            out.append(f"- rate {rate:g}: space p99 TPOT / text-only p99 TPOT = {ratio:.2f} (target <= 1.3): {ok(ratio <= 1.3)}")
    common = [r for r in rates if r in space and r in time_]
    if common:
        top, low = common[-1], common[0]
        ratio = time_[top]["mean_tpot_ms"] / space[top]["mean_tpot_ms"]
        out.append(f"- rate {top:g}: time mean TPOT / space mean TPOT = {ratio:.2f} (target >= 10): {ok(ratio >= 10)}")
        if top in streams:
            ratio = streams[top]["mean_tpot_ms"] / space[top]["mean_tpot_ms"]
            out.append(f"- rate {top:g}: streams mean TPOT / space mean TPOT = {ratio:.2f} (target >= 3): {ok(ratio >= 3)}")
        ratio = space[low]["p50_ttft_ms"] / time_[low]["p50_ttft_ms"]
        out.append(f"- rate {low:g}: space p50 TTFT / time p50 TTFT = {ratio:.2f} (target <= 1.5): {ok(ratio <= 1.5)}")
        for rate in common[1:]:
            ratio = space[rate]["p50_ttft_ms"] / time_[rate]["p50_ttft_ms"]
            out.append(f"- rate {rate:g}: space p50 TTFT / time p50 TTFT = {ratio:.2f} (target < 1 once time saturates)")
        good_space, good_time = space[top].get("goodput") or 0.0, time_[top].get("goodput") or 0.0
        ratio = math.inf if good_time == 0 and good_space > 0 else (good_space / good_time if good_time else math.nan)
        out.append(
            f"- rate {top:g}: goodput space {good_space:.2f} / time {good_time:.2f} req/s = {ratio:.2f} (target >= 3): "
            f"{ok(ratio >= 3)}"
        )
    return out + process_comparison(by_series, rates)


def process_comparison(by_series: dict[str, dict[float, dict[str, Any]]], rates: list[float]) -> list[str]:
    """The paper's comparison (MPS against SM partitions) and the encoder out of process against in it, per rate:
    mean TPOT and p50 TTFT of each against space's (in-process) from the same call. No target: figures."""
    space = by_series.get("space/fcfs", {})
    out = []
    for name in ("mps/fcfs", "space-process/fcfs"):
        other = by_series.get(name, {})
        for rate in (r for r in rates if r in other and r in space):
            tpot = other[rate]["mean_tpot_ms"] / space[rate]["mean_tpot_ms"]
            ttft = other[rate]["p50_ttft_ms"] / space[rate]["p50_ttft_ms"]
            out.append(f"- rate {rate:g}: {name.split('/')[0]} / space: mean TPOT {tpot:.2f}x, p50 TTFT {ttft:.2f}x, "
                       f"goodput {fmt(other[rate].get('goodput'), 2)} vs {fmt(space[rate].get('goodput'), 2)} req/s")
    return out


def loop_table(by_series: dict[str, dict[float, dict[str, Any]]], rates: list[float]) -> list[str]:
    out = ["| series | rate | LM host ms/step | LM wait ms/step | encoder launch ms/batch | encoder busy ms/batch "
           "| whole-device batches | ring copy-out us/batch |", "|---|---|---|---|---|---|---|---|"]
    for name in sorted(by_series):
        for rate in rates:
            c = (by_series[name].get(rate) or {}).get("engine_counters") or {}
            steps, batches = c.get("lm_steps") or 0, c.get("encoder_batches") or 0
            if not steps:
                continue
            out.append(
                f"| {name} | {rate:g} | {1e3 * c['lm_host_s'] / steps:.3f} | {1e3 * c['lm_wait_s'] / steps:.3f} | "
                f"{fmt(1e3 * c['encoder_launch_s'] / batches if batches else None)} | "
                f"{fmt(1e3 * c['encoder_busy_s'] / batches if batches else None)} | "
                f"{c.get('encoder_full_device_batches', '-')} | "
                f"{fmt(1e6 * c['encoder_copy_out_s'] / batches if batches and 'encoder_copy_out_s' in c else None)} |"
            )
    return out


def fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ok(condition: bool) -> str:
    return "met" if condition else "**missed**"


if __name__ == "__main__":
    raise SystemExit(main())
