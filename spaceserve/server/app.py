"""The FastAPI app: OpenAI routes, /health, /metrics, OpenAI-style error bodies, and requests that end (and abort
their engine request) as soon as their client goes away."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from spaceserve.engine.async_llm import AsyncLLM, EngineDeadError
from spaceserve.server.args import ServerArgs
from spaceserve.server.metrics import ServerMetrics
from spaceserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIServingError,
)
from spaceserve.server.serving_chat import OpenAIServingChat
from spaceserve.server.serving_completion import OpenAIServingCompletion


def make_metrics(engine: AsyncLLM, served_model_name: str) -> ServerMetrics:
    """Create the metrics and hook them to the engine's finished-request stream."""
    metrics = ServerMetrics(served_model_name, lambda: engine.stats, engine.router_stats)
    engine.stat_loggers.append(metrics)
    return metrics


def create_app(engine: AsyncLLM, args: ServerArgs) -> FastAPI:
    served_model_name = args.served_model_name or engine.config.model
    metrics = make_metrics(engine, served_model_name)
    chat = OpenAIServingChat(engine, served_model_name, args.media_connector(), args.video_connector())
    completion = OpenAIServingCompletion(engine, served_model_name)
    app = FastAPI(title="spaceserve", description="OpenAI-compatible server for multimodal LLMs")

    @app.exception_handler(OpenAIServingError)
    async def serving_error(_: Request, exc: OpenAIServingError) -> JSONResponse:
        return JSONResponse(exc.to_response().model_dump(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return await serving_error(_, _validation_to_openai(exc))

    @app.exception_handler(EngineDeadError)
    async def dead_engine(_: Request, exc: EngineDeadError) -> JSONResponse:
        error = OpenAIServingError(str(exc), status_code=503, type="ServiceUnavailableError")
        return await serving_error(_, error)

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine serves (with data parallelism, a body saying ok or degraded and each replica's
        state); 503 once nothing can serve, or while a part of the engine is down (its encoder process: requests
        with images fail, text is still served)."""
        state = engine.health()
        if state["status"] == "dead":
            return JSONResponse({"status": "unhealthy", "error": state["error"]}, status_code=503)
        try:
            await engine.check_health()  # asks the core(s): an encoder process that died
        except Exception as exc:  # noqa: BLE001 - any failure is an unhealthy engine, reported with its reason
            return JSONResponse({"status": "unhealthy", "error": str(exc)}, status_code=503)
        if "replicas" in state:
            return JSONResponse(state, status_code=200)
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        card = ModelCard(id=served_model_name, root=engine.config.model, max_model_len=chat.max_model_len)
        return ModelList(data=[card])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw_request: Request) -> Response:
        return await _respond(raw_request, lambda: chat.create_chat_completion(body))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw_request: Request) -> Response:
        return await _respond(raw_request, lambda: completion.create_completion(body))

    return app


async def _respond(
    raw_request: Request, handler: Callable[[], Awaitable[BaseModel | AsyncIterator[str]]]
) -> Response:
    """Run the handler until it answers or the client disconnects (then the handler is cancelled, which aborts
    its engine request). A stream becomes a response that watches for the disconnect itself."""
    result = await _cancel_on_disconnect(handler(), raw_request.receive)
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    return DisconnectAwareStreamingResponse(result, media_type="text/event-stream")


async def _cancel_on_disconnect(awaitable: Awaitable, receive: Receive):
    work = asyncio.ensure_future(awaitable)
    disconnect = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({work, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        # the client is gone; nobody reads this
        with contextlib.suppress(asyncio.CancelledError):
            await work
        return Response(status_code=499)
    return work.result()


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class DisconnectAwareStreamingResponse(StreamingResponse):
    """Streams the body while listening for the client going away; either way the body generator is closed, so
    a stream whose client left aborts its engine request at once rather than at the next failed send."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self.stream_response(send))
        disconnect = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, disconnect):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await streaming
            await self.body_iterator.aclose()


def _validation_to_openai(exc: RequestValidationError) -> OpenAIServingError:
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return OpenAIServingError(f"request body is not valid JSON: {detail}".rstrip(": "), param=None)
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return OpenAIServingError(message, param=param)
