"""The Ray Serve deployment: a replica built by Serve's ASGI builder serves the same OpenAI app, with the greedy
text of the offline engine, and `serve run`'s key=value builder takes `spaceserve serve`'s flags."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import openai
import pytest

import spaceserve
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.server.args import ServerArgs
from tests.engine import dp_scenarios

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def serve_instance():
    root = str(Path(spaceserve.__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_a_serve_replica_answers_like_the_offline_engine(serve_instance, tmp_path):
    from spaceserve.server.ray_serve import build_app

    model_dir = dp_scenarios.make_model_dir(tmp_path / "model")
    engine_args = EngineArgs(model=str(model_dir), **dp_scenarios.ENGINE_KWARGS)
    messages = [{"role": "user", "content": "Say something about a quiet harbour."}]
    reference = dp_scenarios.reference_llm(model_dir)
    from spaceserve import SamplingParams

    expected = reference.chat(messages, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    reference.llm_engine.shutdown()
    serve.run(build_app(engine_args, ServerArgs(served_model_name="tiny"), num_replicas=1), name="spaceserve",
              route_prefix="/")
    client = openai.OpenAI(base_url=f"{serve_instance}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected and expected
    assert httpx.get(f"{serve_instance}/health").status_code == 200
    serve.delete("spaceserve")


def test_the_serve_run_builder_takes_the_servers_flags():
    from spaceserve.server.ray_serve import app_builder

    application = app_builder({"model": "tiny-qwen2-vl", "max-num-seqs": "7", "enforce_eager": "true",
                               "served_model_name": "t", "min_replicas": "1", "max_replicas": "3"})
    deployment = application._bound_deployment
    assert deployment.name == "spaceserve"
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    with pytest.raises(ValueError, match="unknown setting"):
        app_builder({"model": "tiny-qwen2-vl", "no_such_flag": "1"})
