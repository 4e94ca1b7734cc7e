"""Run spaceserve under Ray Serve on a local Ray instance, ask it one question over the OpenAI API, and stop.

    pip install -e ".[ray]"
    python examples/ray_serve_app.py                                  # the tiny model, on the CPU, in seconds
    python examples/ray_serve_app.py --model Qwen/Qwen2-VL-2B-Instruct --load-format dummy --replicas 2   # GPUs

With --max-replicas, Serve autoscales between 1 and that many replicas (one GPU each) on the ongoing requests. On a
real cluster, deploy the same application with `serve run spaceserve.server.ray_serve:app_builder model=MODEL
min_replicas=1 max_replicas=8` (spaceserve installed on every node).
"""

from __future__ import annotations

import argparse
import base64
import os
from pathlib import Path

import openai
import ray
from ray import serve

import spaceserve
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.server.args import ServerArgs
from spaceserve.server.ray_serve import build_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2-vl")
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=None, help="autoscale between 1 and this many replicas")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    # the replicas import this spaceserve (a checkout need not be installed on a local instance)
    root = str(Path(spaceserve.__file__).resolve().parent.parent)
    ray.init(address="local", runtime_env={"env_vars": {"PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}})
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    engine_args = EngineArgs(model=args.model, load_format=args.load_format, max_model_len=4096)
    autoscaling = None
    if args.max_replicas:
        autoscaling = {"min_replicas": 1, "max_replicas": args.max_replicas, "target_ongoing_requests": 32}
    app = build_app(engine_args, ServerArgs(served_model_name="vl"), num_replicas=args.replicas,
                    autoscaling_config=autoscaling)
    serve.run(app, name="spaceserve", route_prefix="/")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused")
        image = Path(__file__).with_name("sample.png").read_bytes()
        content = [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
            {"type": "text", "text": "What is in this picture?"},
        ]
        reply = client.chat.completions.create(model="vl", messages=[{"role": "user", "content": content}],
                                               max_tokens=32, temperature=0)
        print(reply.choices[0].message.content)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
