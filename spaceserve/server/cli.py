"""`spaceserve serve MODEL [engine flags] [--host] [--port] ...`: the OpenAI-compatible server under uvicorn."""

from __future__ import annotations

import argparse
from dataclasses import fields

from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.chat import DEFAULT_MAX_MEDIA_BYTES, DEFAULT_MAX_VIDEO_BYTES, DEFAULT_MEDIA_TIMEOUT_S
from spaceserve.server.args import ServerArgs


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--served-model-name", default=None, help="the name clients use (default: MODEL)")
    server.add_argument(
        "--allowed-local-media-path",
        default=None,
        help="serve file:// images and videos under this directory (default: local files refused)",
    )
    server.add_argument(
        "--allow-http-media", action="store_true", help="fetch http(s) image and video URLs (default: refused)"
    )
    server.add_argument("--media-max-bytes", type=int, default=DEFAULT_MAX_MEDIA_BYTES, help="per image")
    server.add_argument("--media-max-video-bytes", type=int, default=DEFAULT_MAX_VIDEO_BYTES, help="per video")
    server.add_argument("--media-timeout-s", type=float, default=DEFAULT_MEDIA_TIMEOUT_S)
    server.add_argument("--uvicorn-log-level", default="info")


def server_args_from_cli(args: argparse.Namespace) -> ServerArgs:
    return ServerArgs(**{f.name: getattr(args, f.name) for f in fields(ServerArgs) if hasattr(args, f.name)})


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    from spaceserve.engine.async_llm import AsyncLLM
    from spaceserve.server.app import create_app

    server_args = server_args_from_cli(args)
    engine = AsyncLLM.from_engine_args(EngineArgs.from_cli_args(args))
    try:
        app = create_app(engine, server_args)
        uvicorn.run(app, host=server_args.host, port=server_args.port, log_level=server_args.uvicorn_log_level)
    finally:
        engine.shutdown()
    return 0
