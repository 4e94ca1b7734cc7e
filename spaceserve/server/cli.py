"""`spaceserve serve MODEL [engine flags] [server flags]`: the OpenAI-compatible server under uvicorn. Both flag
groups are generated from their dataclasses (EngineArgs, ServerArgs); the engine's own logs (execution layout, KV
plan, SM partitions) are shown at INFO."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import fields

from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.cli_fields import add_dataclass_args
from spaceserve.server.args import API_KEY_ENV, ServerArgs

logger = logging.getLogger("spaceserve.server")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    EngineArgs.add_cli_args(parser)
    add_dataclass_args(parser.add_argument_group("server"), ServerArgs)


def server_args_from_cli(args: argparse.Namespace) -> ServerArgs:
    values = {f.name: getattr(args, f.name) for f in fields(ServerArgs) if hasattr(args, f.name)}
    if values.get("api_key") is None and os.environ.get(API_KEY_ENV):
        values["api_key"] = (os.environ[API_KEY_ENV],)
    return ServerArgs(**values)


def configure_logging(level: int = logging.INFO) -> None:
    """spaceserve's loggers at INFO on stderr, in uvicorn's style; other libraries keep their own levels."""
    root = logging.getLogger("spaceserve")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def run_server(args: argparse.Namespace) -> int:
    import uvicorn

    from spaceserve.engine.async_llm import AsyncLLM
    from spaceserve.server.app import create_app
    from spaceserve.server.http_limits import uvicorn_config

    configure_logging()
    server_args = server_args_from_cli(args)
    engine = AsyncLLM.from_engine_args(EngineArgs.from_cli_args(args))
    logger.info("execution: %s", engine.execution)
    try:
        app = create_app(engine, server_args)
        if server_args.api_key:
            logger.info("API key required on /v1 routes (%d key(s))", len(server_args.api_key))
        uvicorn.Server(uvicorn_config(app, server_args)).run()
    finally:
        engine.shutdown()
    return 0
