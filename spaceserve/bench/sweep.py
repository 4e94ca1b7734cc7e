"""What the sweep scripts (scripts/multiplex_bench.py, capacity_sweep.py, host_overhead_bench.py) share: running one
`spaceserve bench` command within the time left, logged to the results directory's commands.txt, and reading the
result rows back."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

from spaceserve.bench.report import read_jsonl


def run_logged(command: list[str], out: Path, timeout_s: float, cwd: Path, what: str) -> int:
    """Run `command` (its first element the interpreter), appending it to out/commands.txt as `python3 ...`; the
    return code, 1 if it ran past `timeout_s`."""
    print("$", shlex.join(command[1:]), flush=True)
    with open(out / "commands.txt", "a") as log:
        log.write(shlex.join(["python3", *command[1:]]) + "\n")
    try:
        return subprocess.run(command, cwd=cwd, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        print(f"timed out: {what}", flush=True)
        return 1


def result_rows(directory: Path, completed_only: bool = True) -> list[dict[str, Any]]:
    """Every row of directory/*.jsonl; with `completed_only`, those of runs that succeeded with completions."""
    rows = [row for path in sorted(directory.glob("*.jsonl")) for row in read_jsonl(path)]
    if not completed_only:
        return rows
    return [r for r in rows if r.get("status") == "ok" and r.get("completed")]
