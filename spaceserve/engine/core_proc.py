"""The engine-core process: builds the EngineCore, says it is ready, then runs the busy loop over two ZMQ sockets
(messages in from the front, outputs back), msgpack-framed by serial.py.

It never outlives the front: it asks the kernel for SIGTERM when its parent dies and also watches its parent's pid.
Ctrl-C in a terminal reaches the whole process group; the core ignores SIGINT and leaves the shutdown to the front,
which sends Shutdown (and terminates the process if that does not end it).
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import signal
import sys
import threading
import time
from typing import Any

import zmq

from spaceserve.config import EngineConfig
from spaceserve.core.engine_messages import AddRequest, CoreInput, CoreOutput, EngineCoreDead, EngineCoreReady
from spaceserve.engine.serial import MessageDecoder, MessageEncoder
from spaceserve.engine.wire import request_from_wire

logger = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
_PARENT_POLL_S = 1.0


class ZmqTransport:
    def __init__(self, input_socket: zmq.Socket, output_socket: zmq.Socket) -> None:
        self._input = input_socket
        self._output = output_socket
        self._decoder = MessageDecoder(CoreInput)
        self._encoder = MessageEncoder()

    def receive(self, timeout_s: float | None) -> list[Any]:
        messages = []
        timeout_ms = -1 if timeout_s is None else int(timeout_s * 1000)
        if self._input.poll(timeout_ms, zmq.POLLIN):
            while True:
                try:
                    frames = self._input.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                messages.append(self._decoder.decode(frames))
        return messages

    def send(self, message: CoreOutput) -> None:
        self._output.send_multipart(self._encoder.encode(message), copy=False)


def run_engine_core(config: EngineConfig, input_address: str, output_address: str, log_level: int) -> None:
    """The process's work (core_client.MPClient starts it as `python -m spaceserve.engine.core_proc`)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s [engine-core] %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _die_with_parent()
    serve_engine_core(config, input_address, output_address)


_TERMINATE = threading.Event()
_SERVING = threading.Event()


def _on_sigterm(*_: Any) -> None:
    """Serving: the busy loop returns at its next turn (within a second) and shuts the core down in order; a
    SystemExit raised at an arbitrary point (inside garbage collection, a CUDA call) would skip or garble that.
    Still starting: exit now."""
    _TERMINATE.set()
    if not _SERVING.is_set():
        sys.exit(0)


def serve_engine_core(config: EngineConfig, input_address: str, output_address: str) -> None:
    """Connect to the front's two sockets, build the core, say it is ready and serve until Shutdown (or a failure,
    reported as EngineCoreDead). Also what a Ray actor runs (data_parallel/ray_replica.py), which Ray supervises."""
    context = zmq.Context()
    input_socket = context.socket(zmq.PULL)
    input_socket.setsockopt(zmq.RCVHWM, 0)
    input_socket.connect(input_address)
    output_socket = context.socket(zmq.PUSH)
    output_socket.setsockopt(zmq.SNDHWM, 0)  # a slow front never blocks the step loop
    output_socket.setsockopt(zmq.LINGER, 2000)  # let a last message (dead, shut down) reach the front
    output_socket.connect(output_address)
    transport = ZmqTransport(input_socket, output_socket)
    core = None
    try:
        from spaceserve.engine.core import EngineCore
        from spaceserve.engine.core_loop import run_busy_loop

        try:
            core = EngineCore(config)
        except Exception as exc:  # noqa: BLE001 - the front raises it as the engine's start-up error
            logger.exception("engine core failed to start")
            transport.send(EngineCoreDead(str(exc), type(exc).__name__))
            return
        transport.send(EngineCoreReady(core.describe()))
        _SERVING.set()
        run_busy_loop(core, transport, _build_request, should_stop=_TERMINATE.is_set)
    except Exception:  # noqa: BLE001 - already reported by the loop; the process ends
        pass
    finally:
        if core is not None:
            core.shutdown()
        input_socket.close(linger=0)
        output_socket.close()
        context.term()


def _build_request(message: AddRequest):
    return request_from_wire(message.request)


def _die_with_parent() -> None:
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the watcher below still ends the process

    def watch() -> None:
        while True:
            time.sleep(_PARENT_POLL_S)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="spaceserve-parent-watch", daemon=True).start()


def main(argv: list[str]) -> None:
    config_path, input_address, output_address, log_level = argv
    with open(config_path, "rb") as f:
        config = pickle.load(f)
    run_engine_core(config, input_address, output_address, int(log_level))


if __name__ == "__main__":
    main(sys.argv[1:])
