"""scripts/mps_daemon.sh against a stand-in for nvidia-cuda-mps-control (a process that listens on the pipe
directory's control socket and quits on `quit`, as the daemon does): start prints the exports, status says whether it
answers, stop leaves nothing running, and the commands are safe to repeat."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.runtime.fake_mps import fake_mps_environment

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "mps_daemon.sh"


@pytest.fixture(params=["socket", "seqpacket", "fifo", "hidden"])
def env(request):
    """The daemon's control as a stream or a packet UNIX socket, as a named pipe (the MPS docs name pipes and
    sockets, not their kind), and as a socket only the daemon's own client reaches (on the H200 a raw connect to a
    running daemon's socket failed)."""
    with fake_mps_environment() as environment:
        yield {**environment, "FAKE_MPS_CONTROL": request.param}


def _run(command: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=60)


def _daemon_pid(env: dict) -> int:
    log = Path(env["SPACESERVE_MPS_DIR"]) / "log" / "control.log"
    return int(re.findall(r"Control (\d+)\]", log.read_text())[-1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_status_stop_leave_nothing_running(env):
    assert _run("status", env).returncode == 1
    started = _run("start", env)
    assert started.returncode == 0, started.stderr
    pipe = f"{env['SPACESERVE_MPS_DIR']}/pipe"
    assert started.stdout.strip() == (f"export CUDA_MPS_PIPE_DIRECTORY={pipe} "
                                      f"CUDA_MPS_LOG_DIRECTORY={env['SPACESERVE_MPS_DIR']}/log")
    pid = _daemon_pid(env)
    try:
        assert _alive(pid) and os.path.exists(f"{pipe}/control")
        status = _run("status", env)
        assert status.returncode == 0 and f"pid {pid}" in status.stderr
        again = _run("start", env)
        assert again.returncode == 0 and "already running" in again.stderr and _daemon_pid(env) == pid
        stopped = _run("stop", env)
        assert stopped.returncode == 0 and "stopped" in stopped.stderr, stopped.stderr
        assert _run("status", env).returncode == 1 and not os.path.exists(f"{pipe}/control")
        assert _run("stop", env).returncode == 0  # nothing to stop: still fine
    finally:
        if _alive(pid):
            os.kill(pid, 9)
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


@pytest.mark.skipif(shutil.which("nvidia-cuda-mps-control", path="/usr/bin:/bin") is not None,
                    reason="the real binary is installed here")
def test_start_without_the_mps_binary_says_so(env):
    env = {**env, "PATH": "/usr/bin:/bin"}
    result = _run("start", env)
    assert result.returncode == 2 and "nvidia-cuda-mps-control is not on PATH" in result.stderr
    assert _run("bogus", env).returncode == 2
