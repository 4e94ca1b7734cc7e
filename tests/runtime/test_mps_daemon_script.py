"""scripts/mps_daemon.sh against a stand-in for nvidia-cuda-mps-control (a process that listens on the pipe
directory's control socket and quits on `quit`, as the daemon does): start prints the exports, status says whether it
answers, stop leaves nothing running, and the commands are safe to repeat."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "mps_daemon.sh"

FAKE_CONTROL = textwrap.dedent("""\
    #!/usr/bin/env python3
    import os, socket, sys
    control = os.path.join(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"), "control")
    if sys.argv[1:] == ["-d"]:
        if os.fork():
            sys.exit(0)  # like the daemon: the caller returns at once, the daemon runs on
        os.setsid()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(control)
        server.listen(8)
        with open(os.path.join(os.environ["CUDA_MPS_LOG_DIRECTORY"], "control.log"), "a") as log:
            log.write(f"[2026-01-01 00:00:00.000 Control {os.getpid()}] Starting control daemon using socket {control}\\n")
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        while True:
            connection, _ = server.accept()
            command = connection.recv(64).strip()
            connection.close()
            if command == b"quit":
                os.unlink(control)
                sys.exit(0)
    else:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(control)
        client.sendall(sys.stdin.read().strip().encode())
        client.close()
""")


@pytest.fixture
def env():
    with tempfile.TemporaryDirectory(prefix="mpsd", dir="/tmp") as root:
        bin_dir = Path(root) / "bin"
        bin_dir.mkdir()
        fake = bin_dir / "nvidia-cuda-mps-control"
        fake.write_text(FAKE_CONTROL)
        fake.chmod(0o755)
        (bin_dir / "python3").symlink_to(sys.executable)
        yield {"PATH": f"{bin_dir}:/usr/bin:/bin", "SPACESERVE_MPS_DIR": f"{root}/d", "MPS_WAIT_S": "5", "HOME": root}


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
