"""NVIDIA MPS for the modes that run the vision encoder in a process of its own (`--multiplex mps`, and `streams` /
`space` with `--encoder-process` on a GPU).

Why MPS: two processes on one GPU without it time-slice the device (measured on an H200: spinning kernels took
6.86 ms each run together against 6.02 and 4.04 alone); under an MPS daemon their kernels run concurrently at their
alone speeds. So every encoder-process mode on CUDA needs a daemon, and refuses to start without one.

`mps` caps each process with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (the SpaceServe paper's baseline): the encoder gets
`encoder_mps_percentage`, the LM `lm_mps_percentage` or the rest. A client reads the variable when it creates its
CUDA context, so it has to be in the process's environment before CUDA initialises: the front puts the LM's into
the engine-core process's environment (core_client.MPClient), the core puts the encoder's into the encoder
process's (runtime/encoder_process.py), and an engine core running inside the front's process sets it before it
touches CUDA, or refuses if CUDA is already up with another value. `space` leaves both uncapped: its green-context
splits fence the processes.

The control daemon listens on the UNIX socket `control` in the pipe directory (CUDA_MPS_PIPE_DIRECTORY, default
/tmp/nvidia-mps); it is reachable when a connection to that socket (of any kind) succeeds or, failing that, when its
own client (`nvidia-cuda-mps-control`, the documented interface) gets an answer to `get_server_list`.
scripts/mps_daemon.sh starts and stops one in a private directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from spaceserve.config import EngineConfig
from spaceserve.core.errors import ConfigError

PIPE_DIRECTORY_ENV = "CUDA_MPS_PIPE_DIRECTORY"
DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"
ACTIVE_THREAD_PERCENTAGE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
DEFAULT_ENCODER_MPS_PERCENTAGE = 36
"""About the SMs space's smaller default split gives the encoder (48 of an H200's 132), so the two compare."""
_CONNECT_TIMEOUT_S = 1.0
CONTROL_CLIENT = "nvidia-cuda-mps-control"
_CLIENT_TIMEOUT_S = 10.0
_SOCKET_KINDS = (socket.SOCK_SEQPACKET, socket.SOCK_STREAM, socket.SOCK_DGRAM)
"""Which kind the daemon's socket is is not documented; connecting with another kind fails (EPROTOTYPE). On the
H200 (MPS 13.0) a running daemon's `control` socket refused a SOCK_STREAM connection."""

Environment = Mapping[str, "str | None"]
"""Variables to set (None: to remove) in a process's environment."""


class MPSUnavailableError(ConfigError):
    """An encoder-process mode cannot run here: no CUDA, or no MPS daemon reachable; the message says which."""


def pipe_directory(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get(PIPE_DIRECTORY_ENV) or DEFAULT_PIPE_DIRECTORY)


def mps_daemon_problem(environ: Mapping[str, str] | None = None) -> str | None:
    """None when an MPS control daemon answers on the pipe directory's control socket, else why not, in words."""
    control = pipe_directory(environ) / "control"
    try:
        mode = control.stat().st_mode
    except FileNotFoundError:
        return (f"no MPS control daemon: {control} does not exist (start one with `scripts/mps_daemon.sh start` and "
                f"export the CUDA_MPS_PIPE_DIRECTORY it prints, or `nvidia-cuda-mps-control -d`)")
    except OSError as exc:
        return f"the MPS pipe directory cannot be read: {exc}"
    if stat.S_ISFIFO(mode):
        return None  # older daemons use a named pipe, which cannot be probed without talking to the daemon
    if not stat.S_ISSOCK(mode):
        return f"{control} is not the MPS control daemon's socket"
    errors = []
    for kind in _SOCKET_KINDS:
        with socket.socket(socket.AF_UNIX, kind) as probe:
            probe.settimeout(_CONNECT_TIMEOUT_S)
            try:
                probe.connect(str(control))
                return None
            except OSError as exc:
                errors.append(f"{kind.name}: {exc}")
    client_problem = _control_client_problem(control.parent)
    if client_problem is None:
        return None
    return (f"the MPS control daemon at {control} does not answer (connecting: {'; '.join(errors)}; "
            f"{client_problem}): a stale socket of a daemon that died?")


def _control_client_problem(pipe_dir: Path) -> str | None:
    """None when the daemon's own client gets an answer to `get_server_list` through `pipe_dir`, else why not."""
    client = shutil.which(CONTROL_CLIENT)
    if client is None:
        return f"{CONTROL_CLIENT} is not on PATH to ask it"
    env = {**os.environ, PIPE_DIRECTORY_ENV: str(pipe_dir)}
    try:
        asked = subprocess.run([client], input="get_server_list\n", env=env, capture_output=True, text=True,
                               timeout=_CLIENT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"`{CONTROL_CLIENT}` get_server_list got no answer in {_CLIENT_TIMEOUT_S:.0f} s"
    except OSError as exc:
        return f"`{CONTROL_CLIENT}` could not run: {exc}"
    if asked.returncode == 0:
        return None
    said = " ".join((asked.stderr or asked.stdout).split())[-200:]
    return f"`{CONTROL_CLIENT}` get_server_list exited {asked.returncode}: {said or 'no message'}"


def mps_percentages(config: EngineConfig) -> tuple[int, int]:
    """(encoder, LM) active-thread percentages of `mps`."""
    encoder = config.encoder_mps_percentage or DEFAULT_ENCODER_MPS_PERCENTAGE
    lm = config.lm_mps_percentage or max(1, 100 - encoder)
    return encoder, lm


def lm_process_environment(config: EngineConfig) -> dict[str, str | None]:
    """What the engine-core (LM) process needs in its environment before CUDA initialises."""
    if config.multiplex != "mps":
        return {}
    return {ACTIVE_THREAD_PERCENTAGE_ENV: str(mps_percentages(config)[1])}


def encoder_process_environment(config: EngineConfig) -> dict[str, str | None]:
    """What the encoder process needs: its own percentage under mps, none inherited from the core otherwise."""
    if config.multiplex == "mps":
        return {ACTIVE_THREAD_PERCENTAGE_ENV: str(mps_percentages(config)[0])}
    return {ACTIVE_THREAD_PERCENTAGE_ENV: None}


def apply_environment(target: MutableMapping[str, str], changes: Environment) -> None:
    for name, value in changes.items():
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value


def prepare_engine_process(
    config: EngineConfig,
    *,
    cuda_available: bool | None = None,
    cuda_initialized: bool | None = None,
    environ: MutableMapping[str, str] | None = None,
) -> None:
    """Called by the engine core before it touches CUDA: refuses an encoder-process mode that cannot run here (no
    CUDA for mps, no MPS daemon on a GPU) and puts the LM's MPS settings into this process's environment."""
    if not config.encoder_process:
        return
    environ = os.environ if environ is None else environ
    on_cuda = config.device.split(":")[0] == "cuda"
    if not on_cuda:
        if config.multiplex == "mps":
            raise MPSUnavailableError(
                f"multiplex 'mps' runs the encoder and the LM as NVIDIA MPS clients and needs CUDA; this engine runs "
                f"on {config.device}. On the CPU, 'streams' with encoder_process puts the encoder in a process of its "
                "own"
            )
        return
    if cuda_available is None or cuda_initialized is None:
        import torch

        cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
        cuda_initialized = torch.cuda.is_initialized() if cuda_initialized is None else cuda_initialized
    what = f"multiplex {config.multiplex!r} with the encoder in a process of its own"
    if not cuda_available:
        raise MPSUnavailableError(f"{what} needs CUDA, and no CUDA device is available")
    problem = mps_daemon_problem(environ)
    if problem is not None:
        raise MPSUnavailableError(
            f"{what} needs an NVIDIA MPS daemon (without one the two processes time-slice the GPU): {problem}"
        )
    changes = lm_process_environment(config)
    stale = {name: value for name, value in changes.items() if environ.get(name) != value}
    if stale and cuda_initialized:
        settings = ", ".join(f"{name}={value}" for name, value in stale.items())
        raise MPSUnavailableError(
            f"{what} needs {settings} in this process's environment before CUDA initialises, and CUDA is already "
            f"initialised here; run the engine core in a process of its own (the default) or set it before starting"
        )
    apply_environment(environ, stale)
