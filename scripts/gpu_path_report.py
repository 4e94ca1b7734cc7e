"""Issue 4's GPU-path report in one device call: the GPU tests, then the hardware ceilings and the performance
table (decode, prefill, vision tower, KV planning, optional end-to-end bench), as results.json + results.md.

    python3 scripts/gpu_path_report.py --out benchmarks/results/<run-name>
    python3 scripts/gpu_path_report.py --smoke --skip-tests --out /tmp/report      # tiny, on CPU, for CI

Every section is skippable (--only, --skip, --skip-tests); an exception in one is recorded in the JSON and the rest
still run. The results are rewritten after every section, so a run cut off by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from spaceserve.profile import sections as S  # noqa: E402
from spaceserve.profile.report import write_results  # noqa: E402

MEASURED = ("ceilings", "decode", "prefill", "vision", "kv_plan", "bench")
ALL_SECTIONS = ("tests",) + MEASURED
NEEDS_CEILINGS = {"decode", "prefill", "vision"}
BENCH_MODEL = "Qwen/Qwen2-VL-2B-Instruct"
BENCH_WORKLOADS = ("text-only", "image-mix")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="results folder, e.g. benchmarks/results/<run-name>")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on CPU: checks the script, measures nothing")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the GPU tests first")
    parser.add_argument("--full-suite", action="store_true", help="after the GPU tests, run the whole test suite too")
    parser.add_argument("--only", type=_names, default=None, help=f"run only these sections: {','.join(ALL_SECTIONS)}")
    parser.add_argument("--skip", type=_names, default=(), help="sections to leave out")
    parser.add_argument("--tests-timeout-s", type=float, default=240.0)
    parser.add_argument("--bench-prompts", type=int, default=48, help="measured requests per bench workload")
    parser.add_argument("--bench-timeout-s", type=float, default=120.0, help="per bench workload")
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=570.0,
        help="whole-run budget: subprocess timeouts shrink to fit it, and sections that would start past it are skipped",
    )
    return parser.parse_args(argv)


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(set(names) - set(ALL_SECTIONS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown sections {unknown}; known: {', '.join(ALL_SECTIONS)}")
    return names


def selected_sections(args: argparse.Namespace) -> list[str]:
    chosen = list(args.only) if args.only else list(ALL_SECTIONS)
    if args.skip_tests and "tests" in chosen:
        chosen.remove("tests")
    chosen = [s for s in chosen if s not in args.skip]
    if NEEDS_CEILINGS & set(chosen) and "ceilings" not in chosen and "ceilings" not in args.skip:
        chosen.insert(0, "ceilings")
    return [s for s in ALL_SECTIONS if s in chosen]


# ---- run description ------------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _nvidia_smi() -> str | None:
    query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,memory.used,memory.total"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def describe_run(args: argparse.Namespace, argv: list[str]) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available() and not args.smoke
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "name": args.out.name,
        "command": shlex.join(["python3", "scripts/gpu_path_report.py", *argv]),
        "smoke": args.smoke,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("SPACESERVE_COMMIT") or _git("rev-parse", "HEAD"),
        "tree_dirty": None if status is None else bool(status),
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "device_count": torch.cuda.device_count() if cuda else 0,
        "nvidia_smi_before": _nvidia_smi() if cuda else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
    }


# ---- sections run as subprocesses ------------------------------------------------------------------------------


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def run_tests(args: argparse.Namespace, section: dict, deadline: float) -> None:
    commands = [[sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"]]
    if args.full_suite:
        commands.append([sys.executable, "-m", "pytest", "-q", "tests"])
    section["runs"], failed = [], False
    for command in commands:
        begin = time.perf_counter()
        # the performance table is what the run is for: the tests get at most half of what is left
        timeout = min(args.tests_timeout_s, (deadline - begin) / 2)
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            output, returncode = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            returncode = None
        summary = next((line for line in reversed(output.splitlines()) if _COUNT.search(line)), "")
        counts = {kind: int(n) for n, kind in _COUNT.findall(summary)}
        section["runs"].append(
            {
                "command": shlex.join(command[1:]),
                "returncode": returncode,
                "timed_out": returncode is None,
                "seconds": round(time.perf_counter() - begin, 1),
                "counts": counts,
                "tail": output[-4000:],
            }
        )
        failed |= returncode not in (0, 5)  # 5: nothing collected
    first = section["runs"][0]
    section["counts"], section["tail"] = first["counts"], "\n\n".join(r["tail"][-2500:] for r in section["runs"])
    section["status_hint"] = "failed" if failed else "ok"


def run_bench(args: argparse.Namespace, section: dict, out_dir: Path, device_name: str, deadline: float) -> None:
    if args.smoke:
        section["status_hint"] = "skipped"
        section["notes"].append("--smoke: the end-to-end bench needs a real-size model on a GPU")
        return
    base = [sys.executable, "-m", "spaceserve.cli", "bench"]
    probe = subprocess.run([*base, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    if probe.returncode != 0 or "--workload" not in probe.stdout:
        section["status_hint"] = "skipped"
        section["notes"].append("`spaceserve bench` is not available in this build: " + probe.stderr.strip()[-300:])
        return
    for index, workload in enumerate(BENCH_WORKLOADS):
        timeout = min(args.bench_timeout_s, (deadline - time.perf_counter()) / (len(BENCH_WORKLOADS) - index))
        if timeout < 30:
            section["rows"].append({"workload": workload, "skipped": f"{timeout:.0f} s left in the time budget"})
            continue
        jsonl = out_dir / f"bench_{workload}.jsonl"
        jsonl.unlink(missing_ok=True)
        command = [
            *base, BENCH_MODEL, "--load-format", "dummy", "--dtype", "bfloat16", "--multiplex", "time",
            "--workload", workload, "--num-prompts", str(args.bench_prompts), "--num-warmups", "4",
            "--request-rate", "inf", "--out", str(jsonl), "--device-label", device_name, "--disable-tqdm",
        ]  # fmt: skip
        row = {"workload": workload, "command": shlex.join(command[1:]), "file": jsonl.name}
        section["rows"].append(row)
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            row["returncode"], row["tail"] = done.returncode, (done.stdout + done.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            row["returncode"], row["note"] = None, f"timed out after {timeout:.0f} s"
        rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()] if jsonl.exists() else []
        row["rows"] = len(rows)
        row["results"] = rows
        row["pass"] = row["returncode"] == 0 and bool(rows)
    if not all(r.get("pass") for r in section["rows"]):
        section["status_hint"] = "failed"


# ---- driver ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU check", file=sys.stderr)
        return 2
    settings = S.smoke_settings() if args.smoke else S.gpu_settings()
    if args.smoke:
        torch.set_num_threads(1)  # tiny shapes: more threads only contend on a shared CI machine
    out_dir = args.out if args.out.is_absolute() else REPO / args.out
    report = {"run": describe_run(args, argv), "settings": _jsonable(settings), "ceilings": {}, "sections": {}}
    holder, context, started = S.EngineHolder(settings), {}, time.perf_counter()
    deadline = started + args.time_budget_s
    wanted = selected_sections(args)
    for name in ALL_SECTIONS:
        section = {"status": "skipped", "notes": [], "rows": []}
        report["sections"][name] = section
        if name not in wanted:
            section["notes"].append("not selected")
            continue
        if time.perf_counter() > deadline:
            section["notes"].append(f"time budget of {args.time_budget_s:.0f} s spent before this section")
            continue
        if name in NEEDS_CEILINGS and "bandwidth" not in context:
            section["notes"].append("no ceilings measured, nothing to compare with")
            continue
        if name == "bench":
            holder.free()  # the bench builds its own engine in a subprocess
        print(f"[{time.perf_counter() - started:6.1f} s] {name}", flush=True)
        begin = time.perf_counter()
        try:
            if name == "tests":
                run_tests(args, section, deadline)
            elif name == "bench":
                run_bench(args, section, out_dir, report["run"]["device"], deadline)
            elif name == "ceilings":
                S.run_ceilings(settings, section, context)
            else:
                getattr(S, f"run_{name}")(settings, holder, section, context)
            section["status"] = section.pop("status_hint", None) or _status_from_rows(section["rows"])
            for row in section["rows"]:
                if section.get("target"):
                    row.setdefault("target", section["target"])
        except Exception as exc:
            section["status"] = "error"
            section["error"] = "".join(traceback.format_exception(exc))[-6000:]
            print(section["error"], file=sys.stderr, flush=True)
            holder.free()
        section["seconds"] = round(time.perf_counter() - begin, 1)
        if name == "ceilings":
            report["ceilings"] = {
                "copy_bandwidth_bytes_per_s": context.get("bandwidth"),
                "matmul_tflops": context.get("matmul_tflops"),
            }
        report["run"]["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        write_results(out_dir, report)
    holder.free()
    if torch.cuda.is_available() and not args.smoke:
        report["run"]["nvidia_smi_after"] = _nvidia_smi()
    report["run"]["seconds"] = round(time.perf_counter() - started, 1)
    json_path, md_path = write_results(out_dir, report)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


def _status_from_rows(rows: list[dict]) -> str:
    if any("error" in r for r in rows):
        return "error"
    verdicts = [r.get("pass") for r in rows if "skipped" not in r]
    if any(v is False for v in verdicts):
        return "missed"
    return "ok"


def _jsonable(settings) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(settings), default=str))


if __name__ == "__main__":
    sys.exit(main())
