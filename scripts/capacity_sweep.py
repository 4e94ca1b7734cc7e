"""SLO capacity sweep (issue 13): `spaceserve bench` over execution modes and request rates in steps of at most 15%,
every run scored against each SLO (TTFT <= 2 s with TPOT <= 25 ms, and with TPOT <= 50 ms), the text-only decode
baseline at the same rates, and a summary with each mode's SLO capacity (the highest rate at which >= 90% of the
requests meet the SLO) and the issue's targets checked. Optionally the encoder-policy study: FCFS against TWSRFT
on multi-image-skew with a small encoder budget, same requests.

    # on the GPU, split across calls as the time allows (rows append to DIR/<workload>.jsonl):
    python3 scripts/capacity_sweep.py Qwen/Qwen2-VL-2B-Instruct --workloads image-mix --modes time --rates 4:30 \
        --out-dir $OUT/capacity-2b
    python3 scripts/capacity_sweep.py Qwen/Qwen2-VL-2B-Instruct --workloads aspect-mix --modes space --no-text-only \
        --rates 2:20 --out-dir $OUT/capacity-2b
    python3 scripts/capacity_sweep.py Qwen/Qwen2-VL-2B-Instruct --policy-study --rates 4,8 --out-dir $OUT/capacity-2b
    # anywhere: rebuild summary.md and the plots from the rows
    python3 scripts/capacity_sweep.py --summarize benchmarks/results/capacity-2b-h200

Workloads: image-mix (448/896/1344 squares, one per request, Poisson) and aspect-mix (0-3 non-square images per
request, bursty: gamma shape 0.5); 64-token prompts, 128 output tokens (ignore_eos) unless --prompt-len /
--output-len say otherwise. Every mode runs with the same engine flags (vLLM v1's defaults unless --engine-args).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spaceserve.bench.sweep import add_results_arguments, prepare_results, result_rows, run_logged  # noqa: E402

from spaceserve.bench.capacity import (  # noqa: E402
    ATTAINMENT_THRESHOLD,
    attainment,
    capacities,
    check_targets,
    geometric_rates,
    series_name,
    slo_label,
)

SLOS = ("ttft=2,tpot=0.025", "ttft=2,tpot=0.05")
BURSTINESS = {"image-mix": 1.0, "aspect-mix": 0.5, "multi-image-skew": 0.3}
POLICY_STUDY_BUDGET_TOKENS = 2048


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--summarize", metavar="DIR", help="only rebuild DIR/summary.md and the plots")
    parser.add_argument("--workloads", default="image-mix,aspect-mix")
    parser.add_argument("--modes", default="time,streams,space")
    parser.add_argument("--policies", default="fcfs")
    parser.add_argument("--rates", default="2:30", help="lo:hi (steps of --step) or a comma list")
    parser.add_argument("--step", type=float, default=1.15)
    parser.add_argument("--slo", action="append", default=None, help=f"repeatable; default {' and '.join(SLOS)}")
    parser.add_argument("--no-text-only", action="store_true")
    parser.add_argument("--policy-study", action="store_true", help="only FCFS vs TWSRFT on multi-image-skew")
    parser.add_argument("--policy-mode", default="space")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--num-warmups", type=int, default=8)
    parser.add_argument("--prompt-len", default="64")
    parser.add_argument("--output-len", default="128")
    add_results_arguments(parser, "capacity", 560.0)
    args = parser.parse_args()
    if args.summarize:
        print(summarize(Path(args.summarize)))
        return 0
    if not args.model:
        parser.error("give a model (or --summarize DIR)")
    rates = parse_rates(args.rates, args.step)
    out, deadline = prepare_results(args, keep_ceilings=True)
    slos = args.slo or list(SLOS)
    runs: list[tuple[str, str, str, list[str]]] = []
    if args.policy_study:
        runs.append(("multi-image-skew", args.policy_mode, "fcfs,twsrft",
                     ["--encoder-budget-tokens", str(POLICY_STUDY_BUDGET_TOKENS)]))
    else:
        if not args.no_text_only:
            runs.append(("text-only", "time", "fcfs", []))
        runs += [(w, args.modes, args.policies, []) for w in args.workloads.split(",") if w]
    code = 0
    for workload, modes, policies, extra in runs:
        left = deadline - time.monotonic()
        if left < 30:
            print(f"skipping {workload} {modes}/{policies}: {left:.0f} s left", flush=True)
            code = 1
            continue
        command = [
            sys.executable, "-m", "spaceserve.cli", "bench", args.model,
            "--load-format", "dummy", "--dtype", "bfloat16",
            "--workload", workload, "--multiplex", modes, "--encoder-policy", policies,
            "--request-rate", ",".join(f"{r:g}" for r in rates), "--burstiness", str(BURSTINESS.get(workload, 1.0)),
            "--num-prompts", str(args.num_prompts), "--num-warmups", str(args.num_warmups),
            "--prompt-len", args.prompt_len, "--output-len", args.output_len,
            *[flag for slo in slos for flag in ("--slo", slo)],
            "--out", str(out / f"{workload}.jsonl"), "--disable-tqdm", *extra, *shlex.split(args.engine_args),
        ]  # fmt: skip
        code |= run_logged(command, out, left, REPO, f"{workload} {modes}/{policies}")
    print(summarize(out))
    return code


def parse_rates(text: str, step: float) -> list[float]:
    if ":" in text:
        low, high = (float(x) for x in text.split(":"))
        return geometric_rates(low, high, step)
    return sorted(float(x) for x in text.split(",") if x)


# ---- summary ------------------------------------------------------------------------------------------------


def summarize(directory: Path) -> str:
    rows = [r for r in result_rows(directory, completed_only=False) if r.get("request_rate") != "inf"]
    if not rows:
        return f"no rows in {directory}"
    first = rows[0]
    lines = [f"# SLO capacity: {first['model']} on {first['device']}", ""]
    commits = sorted({str(r.get("git_commit")) for r in rows})
    lines += [f"Commits: {', '.join(commits)}; requests per point: "
              f"{sorted({(r.get('completed') or 0) + (r.get('failed') or 0) for r in rows})}; capacity = highest rate "
              f"with >= {ATTAINMENT_THRESHOLD:.0%} of requests meeting the SLO at it and every lighter rate", ""]
    ceilings = directory / "ceilings.json"
    c = json.loads(ceilings.read_text()) if ceilings.exists() else {}
    if "copy_bandwidth" in c:
        lines += [f"Ceilings measured on the machine: copy {c['copy_bandwidth']['best'] / 1e12:.2f} TB/s, bf16 "
                  f"matmul {c['matmul_bf16']['best']:.0f} TFLOP/s, {c['sms']} SMs", ""]
    text_only = [r for r in rows if r["workload"] == "text-only"]
    workloads = sorted({r["workload"] for r in rows} - {"text-only", "multi-image-skew"})
    for workload in workloads:
        wrows = [r for r in rows if r["workload"] == workload]
        lines += _workload_section(directory, workload, wrows, text_only)
    skew = [r for r in rows if r["workload"] == "multi-image-skew"]
    if skew:
        lines += _policy_section(skew)
    text = "\n".join(lines) + "\n"
    (directory / "summary.md").write_text(text)
    return text


def _workload_section(directory: Path, workload: str, rows: list[dict], text_only: list[dict]) -> list[str]:
    settings = next((r.get("engine_settings") for r in rows if r.get("engine_settings")), {}) or {}
    lines = [f"## {workload} (burstiness {rows[0].get('burstiness')})", "",
             f"scheduler {settings.get('scheduler')}; encoder {settings.get('encoder')}", ""]
    caps = capacities(rows + text_only)
    slos = sorted({slo_label(r) for r in rows if r.get("slo")})
    series = sorted({series_name(r) for r in rows + text_only})
    lines += ["| series | " + " | ".join(f"capacity at {s} (req/s)" for s in slos) + " |",
              "|---" * (len(slos) + 1) + "|"]
    for name in series:
        cells = []
        for slo in slos:
            cap = caps.get((name, slo))
            cells.append("-" if cap is None else f"{cap.rate:g} (~{cap.interpolated:.1f}){'' if cap.reached else '+'}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "(~ the interpolated crossing; + not reached by the heaviest rate swept)", ""]
    rates = sorted({float(r["request_rate"]) for r in rows})
    for slo in slos:
        lines += [f"Attainment at {slo}:", "", "| series | " + " | ".join(f"{r:g}" for r in rates) + " |",
                  "|---" * (len(rates) + 1) + "|"]
        for name in series:
            by_rate = {float(r["request_rate"]): attainment(r) for r in rows + text_only
                       if series_name(r) == name and slo_label(r) == slo}
            lines.append(f"| {name} | " + " | ".join(_pct(by_rate.get(rate)) for rate in rates) + " |")
        lines.append("")
    lines += ["| series | rate | mean TPOT | p99 TPOT | p50 TTFT | p99 TTFT | completed req/s |",
              "|---|---|---|---|---|---|---|"]
    seen = set()
    for r in sorted(rows + text_only, key=lambda r: (series_name(r), float(r["request_rate"]))):
        key = (series_name(r), float(r["request_rate"]))
        if key in seen or r.get("status") != "ok" or not r.get("completed"):
            continue
        seen.add(key)
        lines.append(f"| {key[0]} | {key[1]:g} | {_f(r.get('mean_tpot_ms'))} | {_f(r.get('p99_tpot_ms'))} | "
                     f"{_f(r.get('p50_ttft_ms'), 0)} | {_f(r.get('p99_ttft_ms'), 0)} | "
                     f"{_f(r.get('request_throughput'), 2)} |")
    lines += _allocator_table(rows)
    for space in sorted({series_name(r) for r in rows if r["multiplex"] == "space"}) or ["space/fcfs"]:
        lines += ["", f"Targets ({space} against time/fcfs):", ""]
        lines += [c.line() for c in check_targets(rows + text_only, space=space)] + [""]
    try:
        _plot(directory, workload, rows + text_only, slos)
        lines += [f"![capacity](capacity-{workload}.png)", f"![latency](latency-{workload}.png)", ""]
    except Exception as exc:  # noqa: BLE001 - a missing plot never hides the numbers
        lines += [f"(no plot: {exc})", ""]
    return lines


def _allocator_table(rows: list[dict]) -> list[str]:
    """What the SM allocator decided in each space run, and its predictions against the measured times (measured /
    predicted of the run's sums; `curve`: the LM steps against the bare curve, before the learned correction)."""
    lines, seen = [], set()
    for r in sorted(rows, key=lambda r: (series_name(r), float(r["request_rate"]))):
        counters = r.get("engine_counters") or {}
        key = (series_name(r), float(r["request_rate"]))
        if key in seen or not counters.get("allocator_lm_whole_decisions") and not counters.get(
                "allocator_split_decisions"):
            continue
        seen.add(key)
        decisions = "/".join(str(int(counters.get(f"allocator_{p}_decisions", 0)))
                             for p in ("lm_whole", "split", "encoder_whole", "prefill_split"))
        kinds = ("lm_step", "lm_step_curve", "encoder_batch", "prefill_step", "decode_gap")
        ratios = [_ratio(counters, kind) for kind in kinds]
        gaps = counters.get("allocator_lm_step_host_count")
        host = f"{counters['allocator_lm_step_host_excess_s'] / gaps * 1e3:.2f}" if gaps else "-"
        lane = f"{int(counters['prefill_lane_steps'])}" if "prefill_lane_steps" in counters else "-"
        lines.append(f"| {key[0]} | {key[1]:g} | {decisions} | " + " | ".join(ratios)
                     + f" | {int(counters.get('allocator_tpot_violations', 0))} | {host} | {lane} |")
    if not lines:
        return []
    return ["", "SM allocator (space rows): decisions LM whole / split / encoder whole / prefill split; measured / "
            "predicted time, summed over the run (steps counted); host ms: the mean excess of a decode gap over its "
            "step's GPU time that the engine learned from (`allocator_lm_step_host_*`); lane steps: prefill steps "
            "run beside the decode steps (`--enable-prefill-split`)", "",
            "| series | rate | decisions | LM step | LM step vs bare curve | encoder batch | prefill step (lane) | "
            "decode gap | gaps > TPOT SLO | host ms | lane steps |", "|---|---|---|---|---|---|---|---|---|---|---|",
            *lines]


def _ratio(counters: dict, kind: str) -> str:
    predicted, count = counters.get(f"allocator_{kind}_predicted_s"), counters.get(f"allocator_{kind}_count")
    if not predicted or not count:
        return "-"
    return f"{counters[f'allocator_{kind}_actual_s'] / predicted:.2f} ({int(count)})"


def _policy_section(rows: list[dict]) -> list[str]:
    lines = ["## Encoder policy: FCFS vs TWSRFT on multi-image-skew (same requests)", "",
             "| mode/policy | rate | encoder budget | TTFT p50 | TTFT p90 | TTFT p99 | encoder queue p50 | completed |",
             "|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in sorted(rows, key=lambda r: (float(r["request_rate"]), series_name(r))):
        key = (series_name(r), float(r["request_rate"]))
        if key in seen or r.get("status") != "ok":
            continue
        seen.add(key)
        budget = ((r.get("engine_settings") or {}).get("encoder") or {}).get("budget_tokens")
        lines.append(f"| {key[0]} | {key[1]:g} | {budget} | {_f(r.get('p50_ttft_ms'), 0)} | "
                     f"{_f(r.get('p90_ttft_ms'), 0)} | {_f(r.get('p99_ttft_ms'), 0)} | "
                     f"{_f(r.get('p50_encoder_queue_ms'), 0)} | {r['completed']} |")
    return lines + [""]


def _plot(directory: Path, workload: str, rows: list[dict], slos: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spaceserve.bench.plot import plot_rows

    figure, axes = plt.subplots(1, len(slos), figsize=(6 * len(slos), 4.2), squeeze=False)
    for axis, slo in zip(axes[0], slos):
        for index, name in enumerate(sorted({series_name(r) for r in rows})):
            points = sorted((float(r["request_rate"]), attainment(r)) for r in rows
                            if series_name(r) == name and slo_label(r) == slo)
            xs = [p[0] for p in points]
            ys = [float("nan") if p[1] is None else p[1] for p in points]
            axis.plot(xs, ys, "-o", color=f"C{index}", label=name, markersize=3)
        axis.axhline(ATTAINMENT_THRESHOLD, color="grey", linestyle="--", linewidth=1)
        axis.set_title(slo, fontsize=9)
        axis.set_xlabel("request rate (req/s)")
        axis.set_ylabel("share of requests meeting the SLO")
        axis.set_ylim(0, 1.05)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle(f"{rows[0]['model']} {workload}: SLO attainment, {rows[0]['device']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(directory / f"capacity-{workload}.png", dpi=110)
    plt.close(figure)
    one_slo = [r for r in rows if slo_label(r) == slos[0] and r.get("status") == "ok"]
    labelled = [{**r, "multiplex": series_name(r), "encoder_policy": ""} for r in one_slo]
    plot_rows(labelled, directory / f"latency-{workload}.png", title=f"{rows[0]['model']} {workload} vs text-only")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _f(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    raise SystemExit(main())
