"""Two processes on one GPU, each alone and both together: an LM-like decode loop (a CUDA graph of memory-bound GEMMs
at batch 64 over 2B-sized weights) and a model's vision tower (2 images of 896x896, eager). What scripts/mps_check.py
measures with and without an MPS daemon: the throughput each keeps together as a fraction of its throughput alone
(their sum ~1.0: the processes time-slice the GPU; ~2.0: they run fully concurrently).

Each load is a child process (`python3 -m spaceserve.profile.process_concurrency --load lm|encoder --model M`) that
prints "ready", then runs for the seconds it is sent ("run S") and answers one JSON line; "quit" ends it. It never
initialises CUDA in the caller, so a caller can still become an MPS client afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _lm_step(device):
    """A decode-shaped step: 28 layers of batch-64 GEMMs over 2B-sized weights (memory-bound), as one CUDA graph."""
    import torch

    hidden, inter, layers, batch = 1536, 8960, 28, 64
    gen = torch.Generator(device=device).manual_seed(0)
    weights = [(torch.randn(hidden, 4 * hidden, device=device, generator=gen, dtype=torch.bfloat16) * 0.02,
                torch.randn(hidden, 2 * inter, device=device, generator=gen, dtype=torch.bfloat16) * 0.02,
                torch.randn(inter, hidden, device=device, generator=gen, dtype=torch.bfloat16) * 0.02)
               for _ in range(layers)]
    x = torch.randn(batch, hidden, device=device, generator=gen, dtype=torch.bfloat16)

    def forward():
        h = x
        for attn, up, down in weights:
            a = h @ attn
            h = h + a[:, :hidden]
            gate, value = (h @ up).chunk(2, dim=-1)
            h = h + (torch.nn.functional.silu(gate) * value) @ down
        return h

    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        for _ in range(3):
            forward()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        forward()
    return graph.replay


def _encoder_step(device, model_name: str):
    """The model's vision tower over 2 images of 896x896 (8192 patches), eager."""
    import torch

    from spaceserve.engine.arg_utils import EngineArgs
    from spaceserve.runtime.encoder_model import build_vision_model

    config = EngineArgs(model_name, load_format="dummy").create_engine_config()
    model = build_vision_model(config.model_config, directory=None, load_format="dummy", dtype=torch.bfloat16,
                               device=device)
    vision = config.model_config.vision
    grid = (1, 64, 64)
    pixels = torch.randn(2 * 64 * 64, vision.patch_dim, device=device)
    grid_thw = torch.tensor([grid, grid], dtype=torch.long)

    def step():
        with torch.inference_mode():
            model.encode_images(pixels, grid_thw)

    return step


def load_main(kind: str, model_name: str) -> int:
    import torch

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    step = _lm_step(device) if kind == "lm" else _encoder_step(device, model_name)
    for _ in range(3):
        step()
    torch.cuda.synchronize(device)
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        seconds = float(words[1])
        torch.cuda.synchronize(device)
        start = time.monotonic()
        iterations = 0
        marks = []
        while time.monotonic() - start < seconds:
            step()
            iterations += 1
            if iterations % 8 == 0:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                marks.append(event)
        torch.cuda.synchronize(device)
        elapsed = time.monotonic() - start
        gaps = [a.elapsed_time(b) / 8 for a, b in zip(marks, marks[1:])]
        print(json.dumps({"kind": kind, "iterations": iterations, "seconds": elapsed,
                          "ms_per_iteration": elapsed * 1e3 / iterations,
                          "median_gpu_ms": statistics.median(gaps) if gaps else None,
                          "mps_percentage": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")}), flush=True)
    return 0


class _Load:
    def __init__(self, kind: str, model: str, env: dict[str, str]) -> None:
        self.kind = kind
        command = [sys.executable, "-m", "spaceserve.profile.process_concurrency", "--load", kind, "--model", model]
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        cwd=str(REPO))

    def wait_ready(self) -> None:
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the {self.kind} load did not start (exit {self.process.poll()}): {line!r}")

    def start(self, seconds: float) -> None:
        self.process.stdin.write(f"run {seconds}\n")
        self.process.stdin.flush()

    def result(self) -> dict[str, Any]:
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
                self.process.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


def measure_concurrency(model: str, env: dict[str, str], seconds: float,
                        percentages: tuple[int, int] | None) -> dict[str, Any]:
    """Each load alone, then both together; percentages: (LM, encoder) MPS active-thread percentages."""
    lm_env, encoder_env = dict(env), dict(env)
    if percentages is not None:
        lm_env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(percentages[0])
        encoder_env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(percentages[1])
    loads = {"lm": _Load("lm", model, lm_env), "encoder": _Load("encoder", model, encoder_env)}
    try:
        for load in loads.values():
            load.wait_ready()
        alone = {}
        for name, load in loads.items():
            load.start(seconds)
            alone[name] = load.result()
        for load in loads.values():
            load.start(seconds)
        together = {name: load.result() for name, load in loads.items()}
    finally:
        for load in loads.values():
            load.close()
    fractions = {name: alone[name]["ms_per_iteration"] / together[name]["ms_per_iteration"] for name in loads}
    return {"percentages": percentages, "alone": alone, "together": together, "throughput_fraction": fractions,
            "combined": sum(fractions.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", choices=["lm", "encoder"], required=True)
    parser.add_argument("--model", default="Qwen/Qwen2-VL-2B-Instruct")
    args = parser.parse_args()
    return load_main(args.load, args.model)


if __name__ == "__main__":
    sys.exit(main())
