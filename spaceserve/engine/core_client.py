"""How the front reaches the engine core: in a process of its own (the default, as vLLM v1 does), or in a thread of
the front's process (SPACESERVE_ENABLE_MULTIPROCESSING=0 or multiprocess=False: tests, debugging). Both run the same
busy loop (core_loop.py) and speak the same messages (core/engine_messages.py); only the process one serializes.

A client is used by two threads: any thread sends (add, abort, utility calls: serialized by a lock), and one
reader thread takes the core's outputs with `get_output`. A core that dies, by an exception it reports or by the
process ending, turns every later call into EngineDeadError.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import zmq

from spaceserve.child_pythonpath import child_pythonpath
from spaceserve.config import EngineConfig
from spaceserve.core import errors
from spaceserve.core.engine_messages import (
    AbortRequests,
    AddRequest,
    CoreOutput,
    EngineCoreDead,
    EngineCoreReady,
    FinishReason,
    Shutdown,
    UtilityCall,
    UtilityResult,
)
from spaceserve.core.errors import SpaceServeError
from spaceserve.core.request import Request
from spaceserve.engine.serial import MessageDecoder, MessageEncoder
from spaceserve.engine.wire import request_to_wire
from spaceserve.runtime.mps import apply_environment, lm_process_environment

logger = logging.getLogger(__name__)

MULTIPROCESSING_ENV = "SPACESERVE_ENABLE_MULTIPROCESSING"
_SHUTDOWN_TIMEOUT_S = 10.0
_LIVENESS_POLL_S = 0.5


class EngineDeadError(SpaceServeError, RuntimeError):
    """The engine core stopped (an exception inside it, its process died, or shutdown); no request can be served."""


def multiprocessing_enabled(multiprocess: bool | None = None) -> bool:
    if multiprocess is not None:
        return multiprocess
    return os.environ.get(MULTIPROCESSING_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def make_core_client(config: EngineConfig, multiprocess: bool | None = None) -> CoreClient:
    """Start an engine core for `config` and return a client once it is ready (raises its start-up error); with
    data_parallel_size > 1, that many replicas behind one client (engine/data_parallel/)."""
    if config.data_parallel.data_parallel_size > 1:
        if multiprocess is False:
            raise errors.ConfigError("data-parallel replicas run in processes of their own; drop multiprocess=False")
        from spaceserve.engine.data_parallel.dp_client import DPCoreClient

        return DPCoreClient(config)
    return MPClient(config) if multiprocessing_enabled(multiprocess) else ThreadedClient(config)


class CoreClient:
    """Sends messages to a running core and reads what it sends back; subclasses provide the transport."""

    info: dict[str, Any]

    def __init__(self) -> None:
        self._send_lock = threading.Lock()
        self._call_ids = itertools.count()
        self._calls: dict[int, Future] = {}
        self.dead_error: EngineDeadError | None = None

    # ---- sending (any thread) ------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self._send(AddRequest(self._wire(request)))

    def abort_requests(self, request_ids: list[str], reason: FinishReason = FinishReason.ABORT) -> None:
        if request_ids and self.dead_error is None:
            self._send(AbortRequests(list(request_ids), reason))

    def call_utility_async(self, method: str | Callable[[Any], Any], *args: Any) -> Future:
        """Call an EngineCore method (core.UTILITY_METHODS) between steps; the future gets its result. The reader
        thread resolves it when the answer arrives."""
        future: Future = Future()
        call_id = next(self._call_ids)
        self._calls[call_id] = future
        try:
            self._send(UtilityCall(call_id, method, list(args)))
        except BaseException:
            self._calls.pop(call_id, None)
            raise
        return future

    def _send(self, message: Any) -> None:
        if self.dead_error is not None:
            raise self.dead_error
        with self._send_lock:
            self._send_message(message)

    # ---- receiving (one reader thread) ---------------------------------------------------------------------

    def get_output(self, timeout_s: float | None = None) -> CoreOutput | None:
        """The next message from the core (None on timeout). Utility answers are taken here and resolve their
        futures, and are returned too; EngineCoreDead marks the client dead before it is returned."""
        message = self._receive(timeout_s)
        if isinstance(message, UtilityResult):
            future = self._calls.pop(message.call_id, None)
            if future is not None and not future.done():
                if message.error is not None:
                    future.set_exception(RuntimeError(message.error))
                else:
                    future.set_result(message.result)
        elif isinstance(message, EngineCoreDead):
            self._mark_dead(EngineDeadError(message.error))
        return message

    def health(self) -> dict[str, Any]:
        """ok while the core serves, dead once it stopped (a data-parallel client adds degraded)."""
        if self.dead_error is None:
            return {"status": "ok"}
        return {"status": "dead", "error": str(self.dead_error)}

    def _mark_dead(self, error: EngineDeadError) -> None:
        if self.dead_error is None:
            self.dead_error = error
        for future in list(self._calls.values()):
            if not future.done():
                future.set_exception(self.dead_error)
        self._calls.clear()

    # ---- transport (subclasses) ----------------------------------------------------------------------------

    def _wire(self, request: Request) -> Any:
        return request  # in this process the live Request travels as it is

    def _send_message(self, message: Any) -> None:
        raise NotImplementedError

    def _receive(self, timeout_s: float | None) -> CoreOutput | None:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stop the core; a reader blocked in get_output then gets EngineCoreDead."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the transport, once no thread reads from it any more."""


def raise_startup_error(dead: EngineCoreDead) -> None:
    """Re-raise a core's start-up failure as the kind it was (ConfigError, InvalidInputError, ...)."""
    kind = getattr(errors, dead.error_type, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        raise kind(dead.error)
    raise EngineDeadError(f"engine failed to start: {dead.error}")


class ThreadedClient(CoreClient):
    """The core's busy loop in a thread of this process; messages pass as objects through queues."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self._inputs: queue.SimpleQueue = queue.SimpleQueue()
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()
        self.core = None
        started: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(config, started), name="spaceserve-engine", daemon=True)
        self._thread.start()
        self.core = started.result()  # re-raises a construction error here
        self.info = self.core.describe()

    def _run(self, config: EngineConfig, started: Future) -> None:
        from spaceserve.engine.core import EngineCore
        from spaceserve.engine.core_loop import run_busy_loop

        try:
            core = EngineCore(config)
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor's caller
            started.set_exception(exc)
            return
        started.set_result(core)
        try:
            run_busy_loop(core, _QueueTransport(self._inputs, self._outputs), lambda message: message.request)
        except Exception:  # noqa: BLE001 - the loop already sent EngineCoreDead
            pass
        finally:
            try:
                core.shutdown()
            finally:
                self._outputs.put(None)

    def _send_message(self, message: Any) -> None:
        if not self._thread.is_alive():
            raise EngineDeadError("the engine was shut down")
        self._inputs.put(message)

    def _receive(self, timeout_s: float | None) -> CoreOutput | None:
        try:
            message = self._outputs.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if message is None:  # the loop ended
            self._outputs.put(None)
            if self.dead_error is None:
                self._mark_dead(EngineDeadError("the engine was shut down"))
            return EngineCoreDead(str(self.dead_error))
        return message

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._inputs.put(Shutdown())
            self._thread.join(_SHUTDOWN_TIMEOUT_S)
        if self.dead_error is None:
            self._mark_dead(EngineDeadError("the engine was shut down"))


class _QueueTransport:
    def __init__(self, inputs: queue.SimpleQueue, outputs: queue.SimpleQueue) -> None:
        self._inputs = inputs
        self._outputs = outputs

    def receive(self, timeout_s: float | None) -> list[Any]:
        messages = []
        try:
            messages.append(self._inputs.get(timeout=timeout_s) if timeout_s != 0 else self._inputs.get_nowait())
        except queue.Empty:
            return messages
        while True:
            try:
                messages.append(self._inputs.get_nowait())
            except queue.Empty:
                return messages

    def send(self, message: Any) -> None:
        self._outputs.put(message)


class MPClient(CoreClient):
    """The core in a process of its own, over two ZMQ sockets this side binds (IPC, in a private temporary
    directory). Subclasses place the core elsewhere by overriding _bind, _launch, _exit_reason and _stop
    (data_parallel/ray_replica.py: a Ray actor reached over TCP)."""

    def __init__(self, config: EngineConfig, env: dict[str, str] | None = None, wait: bool = True) -> None:
        """env: variables to set in the core's process (CUDA_VISIBLE_DEVICES for a data-parallel replica). wait=False
        returns once the core is launched; call wait_until_ready before anything else (to start several at once).

        The core's process is told to stop when the thread that launches it ends (PR_SET_PDEATHSIG follows the
        parent thread): launch it from a thread that lives as long as the client."""
        super().__init__()
        self._dir: str | None = None
        self.process: subprocess.Popen | None = None
        self._context = zmq.Context()
        self._input = self._context.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)  # queue without bound: a send never waits for a busy core
        self._output = self._context.socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._encoder = MessageEncoder()
        self._decoder = MessageDecoder(CoreOutput)
        try:
            input_address, output_address = self._bind()
            self._launch(config, input_address, output_address, env or {})
        except BaseException:
            self.shutdown()
            self.close()
            raise
        if wait:
            self.wait_until_ready()

    def wait_until_ready(self) -> None:
        """Wait for the core's ready message (sets `info`); raises its start-up error, after stopping it."""
        try:
            self.info = self._wait_until_ready()
        except BaseException:
            self.shutdown()
            self.close()
            raise

    @property
    def output_socket(self) -> zmq.Socket:
        """What the core's outputs arrive on (for a poller over several cores); read it through get_output."""
        return self._output

    def _bind(self) -> tuple[str, str]:
        self._dir = tempfile.mkdtemp(prefix="spaceserve-core-")
        input_address, output_address = f"ipc://{self._dir}/input", f"ipc://{self._dir}/output"
        self._input.bind(input_address)
        self._output.bind(output_address)
        return input_address, output_address

    def _launch(self, config: EngineConfig, input_address: str, output_address: str, env: dict[str, str]) -> None:
        config_path = os.path.join(self._dir, "config.pickle")
        with open(config_path, "wb") as f:  # once, at start-up: the frozen config dataclasses
            pickle.dump(config, f)
        # a fresh interpreter running the core module (not multiprocessing's spawn, which re-runs the caller's
        # __main__), importing this very spaceserve
        env = {**os.environ, **env}
        env["PYTHONPATH"] = child_pythonpath(env.get("PYTHONPATH"))
        apply_environment(env, lm_process_environment(config))  # mps: read when the core's CUDA context is made
        command = [
            sys.executable, "-m", "spaceserve.engine.core_proc", config_path, input_address, output_address,
            str(logging.getLogger("spaceserve").getEffectiveLevel()),
        ]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)

    def _exit_reason(self) -> str | None:
        """None while the core runs; otherwise why it is gone."""
        if self.process is None:
            return "the engine core was never started"
        if self.process.poll() is None:
            return None
        return f"the engine core process died (exit code {self.process.returncode})"

    def _stop(self) -> None:
        """After Shutdown was sent: make sure the core has stopped, forcing it if need be."""
        try:
            self.process.wait(_SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(_SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _wait_until_ready(self) -> dict[str, Any]:
        while True:
            message = self._receive(None)
            if isinstance(message, EngineCoreReady):
                return message.info
            if isinstance(message, EngineCoreDead):
                raise_startup_error(message)

    def _send_message(self, message: Any) -> None:
        """Never blocks: with no core connected (it exited, or never came up) PUSH would wait forever."""
        try:
            self._input.send_multipart(self._encoder.encode(message), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise EngineDeadError("the engine core process is not reachable") from None

    def _wire(self, request: Request) -> Any:
        return request_to_wire(request)

    def _receive(self, timeout_s: float | None) -> CoreOutput | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait = _LIVENESS_POLL_S if deadline is None else min(_LIVENESS_POLL_S, max(deadline - time.monotonic(), 0))
            if self._output.poll(int(wait * 1000), zmq.POLLIN):
                return self._decoder.decode(self._output.recv_multipart(copy=False))
            if (error := self._exit_reason()) is not None:
                if self.dead_error is None:
                    logger.error(error)
                return EngineCoreDead(self.dead_error.args[0] if self.dead_error else error)
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def shutdown(self) -> None:
        """Ask the core to stop, then make sure it has: no process and no socket file is left behind."""
        if self._exit_reason() is None:
            try:
                with self._send_lock:
                    self._send_message(Shutdown())
            except (EngineDeadError, zmq.ZMQError):
                pass  # not connected (any more): it is ending, or is terminated below
            self._stop()
        if self.dead_error is None:
            self._mark_dead(EngineDeadError("the engine was shut down"))

    def close(self) -> None:
        if self._context.closed:
            return
        self._input.close(linger=0)
        self._output.close(linger=0)
        self._context.term()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
