"""A stand-in for nvidia-cuda-mps-control, for testing scripts/mps_daemon.sh and what runs it on the CPU: `-d`
forks a process that listens on the pipe directory's control socket, logs its pid as the daemon does, and quits
(removing the socket) on `quit`; without arguments it sends its stdin to that socket, as the control client does.
FAKE_MPS_CONTROL picks the control's kind: a stream socket (default), a packet socket, a named pipe, or `hidden`: a
socket file nobody accepts on, the daemon listening elsewhere for its own client only (a raw connect fails, the
client's `get_server_list` answers)."""

from __future__ import annotations

import sys
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FAKE_CONTROL = textwrap.dedent("""\
    #!/usr/bin/env python3
    import os, socket, sys
    control = os.path.join(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"), "control")
    fifo = os.environ.get("FAKE_MPS_CONTROL") == "fifo"  # a named pipe instead of a UNIX socket
    hidden = os.environ.get("FAKE_MPS_CONTROL") == "hidden"
    listen_at = control + ".client" if hidden else control
    kind = socket.SOCK_SEQPACKET if os.environ.get("FAKE_MPS_CONTROL") == "seqpacket" else socket.SOCK_STREAM
    if sys.argv[1:] == ["-d"]:
        if os.fork():
            sys.exit(0)  # like the daemon: the caller returns at once, the daemon runs on
        os.setsid()
        if fifo:
            os.mkfifo(control)
        else:
            server = socket.socket(socket.AF_UNIX, kind)
            server.bind(listen_at)
            server.listen(8)
            if hidden:
                decoy = socket.socket(socket.AF_UNIX, kind)
                decoy.bind(control)  # never listens: a connect to it is refused
        with open(os.path.join(os.environ["CUDA_MPS_LOG_DIRECTORY"], "control.log"), "a") as log:
            log.write(f"[2026-01-01 00:00:00.000 Control {os.getpid()}] Starting control daemon using socket {control}\\n")
        # like the real daemon on the H200 (driver 580): the caller's stdin, stdout and stderr stay open in it, so
        # a caller reading them to their end waits as long as the daemon runs
        while True:
            if fifo:
                with open(control) as commands:
                    command = commands.read().strip().encode()
            else:
                connection, _ = server.accept()
                command = connection.recv(64).strip()
                connection.close()
            if command == b"quit":
                os.unlink(control)
                if hidden:
                    os.unlink(listen_at)
                sys.exit(0)
    elif fifo:
        with open(control, "w") as commands:
            commands.write(sys.stdin.read().strip())
    else:
        client = socket.socket(socket.AF_UNIX, kind)
        try:
            client.connect(listen_at)
        except OSError as exc:
            sys.exit(f"Cannot find MPS control daemon process ({exc})")
        client.sendall(sys.stdin.read().strip().encode())
        client.close()
""")



@contextmanager
def fake_mps_environment() -> Iterator[dict[str, str]]:
    """PATH with the stand-in first, and a private SPACESERVE_MPS_DIR (short: a UNIX socket path is limited)."""
    with tempfile.TemporaryDirectory(prefix="mpsd", dir="/tmp") as root:
        bin_dir = Path(root) / "bin"
        bin_dir.mkdir()
        fake = bin_dir / "nvidia-cuda-mps-control"
        fake.write_text(FAKE_CONTROL)
        fake.chmod(0o755)
        (bin_dir / "python3").symlink_to(sys.executable)
        yield {"PATH": f"{bin_dir}:/usr/bin:/bin", "SPACESERVE_MPS_DIR": f"{root}/d", "MPS_WAIT_S": "5", "HOME": root}
