"""MPS for the encoder-process modes: the daemon is found (or its absence named) from the pipe directory, each process
gets its active-thread percentage, and modes that cannot run say why."""

from __future__ import annotations

import dataclasses

import os
import socket
import tempfile

import pytest

from spaceserve.core.errors import ConfigError
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.runtime.mps import (
    ACTIVE_THREAD_PERCENTAGE_ENV,
    DEFAULT_ENCODER_MPS_PERCENTAGE,
    PIPE_DIRECTORY_ENV,
    MPSUnavailableError,
    apply_environment,
    encoder_process_environment,
    lm_process_environment,
    mps_daemon_problem,
    mps_percentages,
    pipe_directory,
    prepare_engine_process,
)


def _config(**kwargs):
    """An engine config for a CUDA device (create_engine_config refuses a device this build lacks, so the config is
    made for the CPU and pointed at CUDA: these are pure functions of it)."""
    device = kwargs.pop("device", "cuda")
    config = EngineArgs("tiny-qwen2-vl", device="cpu", **kwargs).create_engine_config()
    return dataclasses.replace(config, device=device)


@pytest.fixture
def pipe_dir():
    # AF_UNIX paths are limited to ~108 bytes: keep it short
    with tempfile.TemporaryDirectory(prefix="mps", dir="/tmp") as directory:
        yield directory


@pytest.fixture(params=[socket.SOCK_STREAM, socket.SOCK_SEQPACKET])
def daemon(pipe_dir, request):
    """A listening socket where the control daemon's would be, of either kind (its kind is not documented)."""
    server = socket.socket(socket.AF_UNIX, request.param)
    server.bind(os.path.join(pipe_dir, "control"))
    server.listen(4)
    yield {PIPE_DIRECTORY_ENV: pipe_dir}
    server.close()


def test_the_pipe_directory_comes_from_the_environment_or_the_default():
    assert str(pipe_directory({})) == "/tmp/nvidia-mps"
    assert str(pipe_directory({PIPE_DIRECTORY_ENV: "/run/mine"})) == "/run/mine"


def test_a_daemon_is_found_only_where_its_control_socket_answers(pipe_dir, daemon):
    assert mps_daemon_problem(daemon) is None
    missing = mps_daemon_problem({PIPE_DIRECTORY_ENV: os.path.join(pipe_dir, "nowhere")})
    assert "no MPS control daemon" in missing and "mps_daemon.sh start" in missing


def test_a_stale_socket_or_a_stray_file_is_not_a_daemon(pipe_dir):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.path.join(pipe_dir, "control"))
    stale.close()  # the file stays, nobody listens: a daemon that died
    assert "does not answer" in mps_daemon_problem({PIPE_DIRECTORY_ENV: pipe_dir})
    os.unlink(os.path.join(pipe_dir, "control"))
    with open(os.path.join(pipe_dir, "control"), "w") as f:
        f.write("x")
    assert "is not the MPS control daemon's socket" in mps_daemon_problem({PIPE_DIRECTORY_ENV: pipe_dir})


def test_each_process_gets_its_percentage():
    config = _config(multiplex="mps", encoder_mps_percentage=30)
    assert config.encoder_process
    assert mps_percentages(config) == (30, 70)
    assert lm_process_environment(config) == {ACTIVE_THREAD_PERCENTAGE_ENV: "70"}
    assert encoder_process_environment(config) == {ACTIVE_THREAD_PERCENTAGE_ENV: "30"}
    both = _config(multiplex="mps", encoder_mps_percentage=50, lm_mps_percentage=80)  # MPS may oversubscribe
    assert mps_percentages(both) == (50, 80)
    default = _config(multiplex="mps")
    assert mps_percentages(default) == (DEFAULT_ENCODER_MPS_PERCENTAGE, 100 - DEFAULT_ENCODER_MPS_PERCENTAGE)
    # space fences the processes with green contexts: no cap, and none inherited from the core
    space = _config(multiplex="space", encoder_process=True)
    assert lm_process_environment(space) == {}
    assert encoder_process_environment(space) == {ACTIVE_THREAD_PERCENTAGE_ENV: None}
    env = {ACTIVE_THREAD_PERCENTAGE_ENV: "64", "OTHER": "1"}
    apply_environment(env, encoder_process_environment(space))
    assert env == {"OTHER": "1"}


def test_bad_settings_name_the_problem():
    with pytest.raises(ConfigError, match="needs a concurrent mode"):
        _config(multiplex="time", encoder_process=True)
    with pytest.raises(ConfigError, match="needs a concurrent mode"):
        _config(multiplex="auto", encoder_process=True)
    with pytest.raises(ConfigError, match="applies to multiplex 'mps' only"):
        _config(multiplex="space", encoder_process=True, encoder_mps_percentage=40)
    with pytest.raises(ConfigError, match="whole percentage in 1..100"):
        _config(multiplex="mps", encoder_mps_percentage=0)
    with pytest.raises(ConfigError, match="whole percentage in 1..100"):
        _config(multiplex="mps", lm_mps_percentage=101)


def test_mps_refuses_without_cuda_or_without_a_daemon(pipe_dir, daemon):
    with pytest.raises(MPSUnavailableError, match="needs CUDA; this engine runs on cpu"):
        prepare_engine_process(_config(multiplex="mps", device="cpu"), environ={})
    prepare_engine_process(_config(multiplex="streams", encoder_process=True, device="cpu"), environ={})  # CPU: fine
    config = _config(multiplex="mps", encoder_mps_percentage=25)
    with pytest.raises(MPSUnavailableError, match="no CUDA device is available"):
        prepare_engine_process(config, cuda_available=False, cuda_initialized=False, environ=dict(daemon))
    nowhere = {PIPE_DIRECTORY_ENV: os.path.join(pipe_dir, "nowhere")}
    with pytest.raises(MPSUnavailableError, match="needs an NVIDIA MPS daemon.*does not exist"):
        prepare_engine_process(config, cuda_available=True, cuda_initialized=False, environ=nowhere)
    with pytest.raises(MPSUnavailableError, match="needs an NVIDIA MPS daemon"):
        prepare_engine_process(_config(multiplex="space", encoder_process=True), cuda_available=True,
                               cuda_initialized=False, environ=dict(nowhere))


def test_the_lm_percentage_is_set_before_cuda_starts_and_refused_after(daemon):
    config = _config(multiplex="mps", encoder_mps_percentage=25)
    environ = dict(daemon)
    prepare_engine_process(config, cuda_available=True, cuda_initialized=False, environ=environ)
    assert environ[ACTIVE_THREAD_PERCENTAGE_ENV] == "75"
    prepare_engine_process(config, cuda_available=True, cuda_initialized=True, environ=environ)  # already right
    environ[ACTIVE_THREAD_PERCENTAGE_ENV] = "100"
    with pytest.raises(MPSUnavailableError, match="CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=75.*already initialised"):
        prepare_engine_process(config, cuda_available=True, cuda_initialized=True, environ=environ)


def test_a_daemon_only_its_own_client_reaches_is_found_through_the_client(monkeypatch):
    """On the H200 a raw connect to a running daemon's socket failed: the check then asks `get_server_list`."""
    import subprocess
    from pathlib import Path

    from tests.runtime.fake_mps import fake_mps_environment

    script = Path(__file__).resolve().parents[2] / "scripts" / "mps_daemon.sh"
    with fake_mps_environment() as env:
        env = {**env, "FAKE_MPS_CONTROL": "hidden"}
        pipe = {PIPE_DIRECTORY_ENV: f"{env['SPACESERVE_MPS_DIR']}/pipe"}
        monkeypatch.setenv("PATH", env["PATH"])
        monkeypatch.setenv("FAKE_MPS_CONTROL", "hidden")
        started = subprocess.run(["bash", str(script), "start"], env=env, capture_output=True, text=True, timeout=60)
        assert started.returncode == 0, started.stderr
        try:
            assert mps_daemon_problem(pipe) is None
        finally:
            subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True, timeout=60)
        gone = mps_daemon_problem(pipe)
        assert "does not exist" in gone
        os.makedirs(pipe[PIPE_DIRECTORY_ENV], exist_ok=True)
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(os.path.join(pipe[PIPE_DIRECTORY_ENV], "control"))
        stale.close()
        problem = mps_daemon_problem(pipe)
        assert "does not answer" in problem and "get_server_list exited 1" in problem, problem
