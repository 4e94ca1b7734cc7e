"""The FastAPI app: OpenAI routes, /health, /metrics, OpenAI-style error bodies for every failure (validation, body
parsing, size and time limits, unknown routes, internal errors: none carries internal detail), an API key on /v1,
and requests that end (and abort their engine requests) as soon as their client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from spaceserve.engine.async_llm import AsyncLLM, EngineDeadError
from spaceserve.server.args import ServerArgs
from spaceserve.server.auth import ApiKeyMiddleware
from spaceserve.server.http_limits import BodyLimitsMiddleware
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
from spaceserve.server.serving_engine import ENCODER_UNHEALTHY_MESSAGE, ENGINE_DEAD_MESSAGE, SERVER_ERROR_MESSAGE
from spaceserve.tokenizer.chat_template import ChatTemplate

logger = logging.getLogger("spaceserve.server")
_HTTP_ERROR_TYPES = {
    400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowedError",
    408: "RequestTimeoutError", 413: "RequestTooLargeError", 415: "UnsupportedMediaTypeError",
}


def make_metrics(engine: AsyncLLM, served_model_name: str) -> ServerMetrics:
    """Create the metrics and hook them to the engine's finished-request stream."""
    metrics = ServerMetrics(served_model_name, lambda: engine.stats, engine.router_stats)
    engine.stat_loggers.append(metrics)
    return metrics


def create_app(engine: AsyncLLM, args: ServerArgs) -> FastAPI:
    model_names = args.model_names(engine.config.model)
    metrics = make_metrics(engine, model_names[0])
    log_requests = not args.disable_log_requests
    chat = OpenAIServingChat(
        engine,
        model_names,
        args.media_connector(),
        args.video_connector(),
        max_request_media_bytes=args.media_max_request_bytes,
        chat_template=None if args.chat_template is None else ChatTemplate.from_file_or_text(args.chat_template),
        log_requests=log_requests,
    )
    completion = OpenAIServingCompletion(engine, model_names, log_requests=log_requests)
    app = FastAPI(
        title="spaceserve",
        description="OpenAI-compatible server for multimodal LLMs",
    )
    app.add_middleware(BodyLimitsMiddleware, timeout_s=args.body_timeout_s, max_body_bytes=args.max_request_body_bytes)
    if args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_keys=args.api_key)  # outermost: checked before the body is read

    @app.exception_handler(OpenAIServingError)
    async def serving_error(_: Request, exc: OpenAIServingError) -> JSONResponse:
        return JSONResponse(exc.to_response().model_dump(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return await serving_error(_, _validation_to_openai(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = str(exc.detail)
        if status == 400 and message == "There was an error parsing the body":
            message = "the request body could not be parsed as JSON (invalid UTF-8, or nested too deeply)"
        elif status == 413:
            message = f"the request body is larger than the server's limit of {args.max_request_body_bytes} bytes"
        error = OpenAIServingError(message, status_code=status, type=_HTTP_ERROR_TYPES.get(status, "HTTPError"))
        response = await serving_error(_, error)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(EngineDeadError)
    async def dead_engine(_: Request, exc: EngineDeadError) -> JSONResponse:
        error = OpenAIServingError(ENGINE_DEAD_MESSAGE, status_code=503, type="ServiceUnavailableError")
        return await serving_error(_, error)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error serving %s %s", request.method, request.url.path, exc_info=exc)
        error = OpenAIServingError(SERVER_ERROR_MESSAGE, status_code=500, type="InternalServerError")
        return await serving_error(request, error)

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine serves (with data parallelism, a body saying ok or degraded and each replica's
        state); 503 once nothing can serve, or while a part of the engine is down (its encoder process: requests
        with images fail, text is still served)."""
        state = engine.health()
        if state["status"] == "dead":
            return JSONResponse({"status": "unhealthy", "error": ENGINE_DEAD_MESSAGE}, status_code=503)
        try:
            await engine.check_health()  # asks the core(s): an encoder process that died
        except Exception as exc:  # noqa: BLE001 - any failure is an unhealthy engine, reported with its reason
            logger.error("health check failed: %s", exc)
            return JSONResponse({"status": "unhealthy", "error": ENCODER_UNHEALTHY_MESSAGE}, status_code=503)
        if "replicas" in state:
            return JSONResponse(state, status_code=200)
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        cards = [
            ModelCard(id=name, root=engine.config.model, max_model_len=chat.max_model_len) for name in model_names
        ]
        return ModelList(data=cards)

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
    its engine requests). A stream becomes a response that watches for the disconnect itself."""
    result = await _cancel_on_disconnect(handler(), raw_request.receive)
    if isinstance(result, Response):  # the client went away: nobody reads this
        return result
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
    a stream whose client left aborts its engine requests at once rather than at the next failed send."""

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
