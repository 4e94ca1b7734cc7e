"""What the sweep scripts (scripts/multiplex_bench.py, capacity_sweep.py, host_overhead_bench.py) share: their
results-directory flags, the directory with the device's ceilings measured into it, running one `spaceserve bench`
command within the time left, logged to the directory's commands.txt, and reading the result rows back."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from spaceserve.bench.report import read_jsonl
from spaceserve.child_pythonpath import child_pythonpath


def add_results_arguments(parser: argparse.ArgumentParser, out_name: str, time_budget_s: float) -> None:
    """--engine-args (the same for every run), --out-dir (default $OUT/<out_name>) and --time-budget-s."""
    parser.add_argument("--engine-args", default="", help="more engine flags, the same for every run")
    parser.add_argument("--out-dir", default=os.path.join(os.environ.get("OUT", "."), out_name))
    parser.add_argument("--time-budget-s", type=float, default=time_budget_s)


CEILINGS_CHILD = "import json; from spaceserve.profile.hardware import measure_ceilings; print(json.dumps(measure_ceilings()))"


def measure_ceilings_in_child(env: dict[str, str] | None = None) -> dict[str, Any]:
    """profile/hardware.measure_ceilings in a child process (in `env`, this process's by default), so the caller
    never holds a CUDA context of its own: one would keep memory from the engines it starts and, made before an MPS
    daemon, would not be one of its clients. Raises RuntimeError with the child's error if it fails."""
    env = {**(os.environ if env is None else env)}
    env["PYTHONPATH"] = child_pythonpath(env.get("PYTHONPATH"))
    child = subprocess.run([sys.executable, "-c", CEILINGS_CHILD], capture_output=True, text=True, timeout=300, env=env)
    if child.returncode != 0:
        raise RuntimeError(f"measuring the ceilings failed: {child.stderr.strip()[-2000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def prepare_results(args: argparse.Namespace, keep_ceilings: bool = False) -> tuple[Path, float]:
    """Make --out-dir and measure the device's ceilings into its ceilings.json (with `keep_ceilings`, only if a
    call before did not), in a child process; returns the directory and the monotonic deadline of
    --time-budget-s."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.time_budget_s
    if not (keep_ceilings and (out / "ceilings.json").exists()):
        (out / "ceilings.json").write_text(json.dumps(measure_ceilings_in_child(), indent=1))
    return out, deadline


def run_logged(command: list[str], out: Path, timeout_s: float, cwd: Path, what: str,
               env: dict[str, str] | None = None) -> int:
    """Run `command` (its first element the interpreter; in `env`, this process's by default), appending it to
    out/commands.txt as `python3 ...`; the return code, 1 if it ran past `timeout_s`."""
    print("$", shlex.join(command[1:]), flush=True)
    with open(out / "commands.txt", "a") as log:
        log.write(shlex.join(["python3", *command[1:]]) + "\n")
    try:
        return subprocess.run(command, cwd=cwd, timeout=timeout_s, env=env).returncode
    except subprocess.TimeoutExpired:
        print(f"timed out: {what}", flush=True)
        return 1


def result_rows(directory: Path, completed_only: bool = True) -> list[dict[str, Any]]:
    """Every row of directory/*.jsonl; with `completed_only`, those of runs that succeeded with completions."""
    rows = [row for path in sorted(directory.glob("*.jsonl")) for row in read_jsonl(path)]
    if not completed_only:
        return rows
    return [r for r in rows if r.get("status") == "ok" and r.get("completed")]
