"""spaceserve as a Ray Serve deployment, for clusters that run Ray Serve and want its autoscaling.

Each Serve replica is one whole spaceserve server: an AsyncLLM (its engine core in a process of its own, on the GPU
Ray gives the replica) behind the same OpenAI app `spaceserve serve` runs (server/app.py), built on the replica by
Serve's ASGI builder and shut down with it (the app's lifespan). Ray Serve routes requests between replicas and
adds or removes them with the load; it does not know about images or prefixes, so this path has no cache
affinity: for that, one front with `--data-parallel-size N` (engine/data_parallel/) routes by content.

    from spaceserve.engine.arg_utils import EngineArgs
    from spaceserve.server.ray_serve import build_app
    serve.run(build_app(EngineArgs(model="Qwen/Qwen2-VL-2B-Instruct"), autoscaling_config={"min_replicas": 1,
              "max_replicas": 4, "target_ongoing_requests": 32}))

or from the shell, with `spaceserve serve`'s flags as key=value pairs:

    serve run spaceserve.server.ray_serve:app_builder model=Qwen/Qwen2-VL-2B-Instruct max_num_seqs=128

(examples/ray_serve_app.py runs one on a local Ray instance and queries it).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.server.args import ServerArgs

DEPLOYMENT_NAME = "spaceserve"


def build_app(
    engine_args: EngineArgs,
    server_args: ServerArgs | None = None,
    *,
    num_replicas: int | None = None,
    autoscaling_config: dict[str, Any] | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    max_ongoing_requests: int | None = None,
):
    """A Serve application whose replicas each run the OpenAI server over one engine. Each replica asks for one GPU
    (when the engine runs on CUDA, or ray_actor_options says otherwise) and one CPU."""
    from ray import serve

    if engine_args.data_parallel_size > 1:
        raise ValueError("under Ray Serve each replica is one engine; scale with num_replicas / autoscaling_config")
    server_args = server_args or ServerArgs()

    def build_asgi_app():
        from spaceserve.engine.async_llm import AsyncLLM
        from spaceserve.server.app import create_app

        engine = AsyncLLM.from_engine_args(engine_args)
        app = create_app(engine, server_args)

        @contextlib.asynccontextmanager
        async def lifespan(_: Any) -> AsyncIterator[None]:
            try:
                yield
            finally:
                engine.shutdown()

        app.router.lifespan_context = lifespan
        return app

    class SpaceServeDeployment:
        """The OpenAI routes come from the app the builder makes on each replica."""

    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": ray_actor_options or {"num_cpus": 1, "num_gpus": 1 if _uses_gpu(engine_args) else 0},
    }
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    elif num_replicas is not None:
        options["num_replicas"] = num_replicas
    if max_ongoing_requests is not None:
        options["max_ongoing_requests"] = max_ongoing_requests
    deployment = serve.deployment(serve.ingress(build_asgi_app)(SpaceServeDeployment), **options)
    return deployment.bind()


def app_builder(args: dict[str, Any]):
    """For `serve run spaceserve.server.ray_serve:app_builder model=... key=value ...`: the keys are
    `spaceserve serve`'s flags (dashes or underscores); num_replicas, min_replicas, max_replicas and
    target_ongoing_requests configure the deployment."""
    args = {key.replace("-", "_"): value for key, value in args.items()}
    deployment_keys = ("num_replicas", "min_replicas", "max_replicas", "target_ongoing_requests")
    deployment = {key: int(args.pop(key)) for key in deployment_keys if key in args}
    if "model" not in args:
        raise ValueError("app_builder needs model=...")
    from spaceserve.server.cli import add_serve_args, server_args_from_cli

    parser = argparse.ArgumentParser(prog="spaceserve.server.ray_serve:app_builder")
    add_serve_args(parser)
    argv = [str(args.pop("model"))]
    flags = {action.dest: action for action in parser._actions}
    for key, value in args.items():
        action = flags.get(key)
        if action is None:
            raise ValueError(f"unknown setting {key!r} (use spaceserve serve's flags)")
        flag = action.option_strings[-1] if action.nargs != 0 else action.option_strings[0]
        if action.nargs == 0:  # a switch: key=true turns it on
            if str(value).lower() in ("1", "true", "yes", "on"):
                argv.append(flag)
            continue
        argv += [flag, str(value)]
    parsed = parser.parse_args(argv)
    autoscaling = None
    if any(key in deployment for key in ("min_replicas", "max_replicas", "target_ongoing_requests")):
        autoscaling = {key: deployment[key] for key in deployment if key != "num_replicas"}
    return build_app(
        EngineArgs.from_cli_args(parsed),
        server_args_from_cli(parsed),
        num_replicas=deployment.get("num_replicas"),
        autoscaling_config=autoscaling,
    )


def _uses_gpu(engine_args: EngineArgs) -> bool:
    if engine_args.device is not None:
        return engine_args.device.startswith("cuda")
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
