"""The engine core's busy loop, the same whether the core runs in a process of its own (over ZMQ, see core_proc.py)
or in a thread of the front's process (tests, debugging): take every message that arrived, then step while
requests are unfinished, sending each step's outputs; block when idle, so an idle engine costs nothing.

A message that fails (bad input the front could not check, any error adding one request, a failing utility call) is
answered with its error; an exception inside a step, or while aborting, ends the loop for every request, reported as
EngineCoreDead so that no request is left waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from spaceserve.core.engine_messages import (
    AbortRequests,
    AddRequest,
    CoreInput,
    CoreOutput,
    EngineCoreDead,
    EngineCoreOutput,
    EngineCoreOutputs,
    FinishReason,
    Shutdown,
    StepOutputs,
    UtilityCall,
    UtilityResult,
)
from spaceserve.core.errors import InvalidInputError
from spaceserve.core.request import Request
from spaceserve.engine.core import UTILITY_METHODS, EngineCore

logger = logging.getLogger(__name__)

EMPTY_STEP_WAIT_S = 0.0005
"""After a step that launched nothing and produced nothing (work in flight elsewhere), wait this long for a
message instead of spinning."""
IDLE_HEALTH_CHECK_S = 1.0
"""While idle, how often the loop asks the executor whether its ranks live (a tensor-parallel rank that dies with no
request in flight is reported then, not at the next request)."""


class CoreTransport(Protocol):
    def receive(self, timeout_s: float | None) -> list[CoreInput]:
        """Every message that has arrived, waiting up to `timeout_s` (None: forever) for the first one."""
        ...

    def send(self, message: CoreOutput) -> None: ...


RequestBuilder = Callable[[AddRequest], Request]
ADD_FAILURE_MESSAGE = "the request could not be added: a server error (see the server log)"
"""The error of a request whose add failed for a reason other than its input; only that request ends."""


def run_busy_loop(
    core: EngineCore,
    transport: CoreTransport,
    build_request: RequestBuilder,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Serve messages and step until a Shutdown message arrives (or `should_stop()`: SIGTERM); a failing step sends
    EngineCoreDead and raises."""
    idle_reported = True
    wait_s: float | None = None
    while not should_stop():
        busy = core.has_unfinished_requests()
        messages = transport.receive(IDLE_HEALTH_CHECK_S if not busy else wait_s or 0.0)
        for message in messages:
            if isinstance(message, Shutdown):
                return
            try:
                _handle(core, transport, build_request, message)
            except Exception as exc:  # noqa: BLE001 - like a failed step: the front must hear of it, or it waits
                logger.exception("engine core failed handling %s", type(message).__name__)
                transport.send(EngineCoreDead(f"engine core failed: {type(exc).__name__}: {exc}", type(exc).__name__))
                raise
        if not core.has_unfinished_requests():
            try:
                core.check_ranks()
            except Exception as exc:  # noqa: BLE001 - a rank died while idle: the core can serve nothing more
                transport.send(EngineCoreDead(f"engine core failed: {type(exc).__name__}: {exc}", type(exc).__name__))
                raise
            if not idle_reported:
                transport.send(StepOutputs(EngineCoreOutputs([], core.stats())))
                idle_reported = True
            wait_s = None
            continue
        idle_reported = False
        try:
            outputs = core.step()
        except Exception as exc:  # noqa: BLE001 - the core is broken: every request is lost, the front is told
            logger.exception("engine core step failed")
            transport.send(EngineCoreDead(f"engine core failed: {type(exc).__name__}: {exc}", type(exc).__name__))
            raise
        if outputs:
            transport.send(StepOutputs(EngineCoreOutputs(outputs, core.stats())))
        wait_s = EMPTY_STEP_WAIT_S if not outputs and not core.has_step_in_flight() else None


def _handle(core: EngineCore, transport: CoreTransport, build_request: RequestBuilder, message: CoreInput) -> None:
    if isinstance(message, AddRequest):
        try:
            core.add_request(build_request(message))
        except Exception as exc:  # noqa: BLE001 - one request's failure is that request's, never the loop's
            if isinstance(exc, InvalidInputError):
                reason = str(exc)
            else:
                logger.exception("adding request %s failed", message.request.request_id)
                reason = ADD_FAILURE_MESSAGE
            error = EngineCoreOutput(message.request.request_id, finish_reason=FinishReason.ERROR, error=reason)
            transport.send(StepOutputs(EngineCoreOutputs([error], core.stats())))
    elif isinstance(message, AbortRequests):
        core.abort_requests(message.request_ids, message.reason)
    elif isinstance(message, UtilityCall):
        transport.send(_call_utility(core, message))


def _call_utility(core: EngineCore, call: UtilityCall) -> UtilityResult:
    """A method of the core by name, or (in-process cores only: it cannot cross processes) any function of it."""
    if not callable(call.method) and call.method not in UTILITY_METHODS:
        return UtilityResult(call.call_id, error=f"unknown engine utility {call.method!r}")
    try:
        if callable(call.method):
            return UtilityResult(call.call_id, result=call.method(core, *call.args))
        return UtilityResult(call.call_id, result=getattr(core, call.method)(*call.args))
    except Exception as exc:  # noqa: BLE001 - the caller's call failed, not the engine
        return UtilityResult(call.call_id, error=f"{type(exc).__name__}: {exc}")
