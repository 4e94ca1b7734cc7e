"""The vision towers measured eager and as CUDA graphs, for scripts/vision_graph_check.py (which imports this module;
run alone it measures one tower and prints its JSON):

    python3 scripts/vision_tower_bench.py Qwen/Qwen2-VL-7B-Instruct [--smoke]

Towers are built alone from the preset config (dummy weights); batches carry their pixels on the device, so host ms
is what EncoderRunner.execute costs beyond the upload (measured apart for 9216 host rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

ONE_IMAGE = [(1, 96, 96)]  # 1344 x 1344 px: 9216 patches
MIXED = [(1, 32, 32), (1, 32, 32), (1, 48, 32), (1, 24, 40), (4, 16, 24)]  # 6080 patches
SMOKE_ONE, SMOKE_MIXED = [(1, 16, 16)], [(1, 8, 8), (1, 6, 10), (2, 4, 6)]
DEFAULT_BUDGET_TOKENS = 16384  # the engine's default for these models: max(8192, the largest image's tokens)
TIMED, WARMUP = 5, 2


class TowerModel(torch.nn.Module):
    """What EncoderRunner reads of a model."""

    def __init__(self, tower: torch.nn.Module) -> None:
        super().__init__()
        self.visual = tower
        self.config = type("Config", (), {"vision": tower.config})()

    def encode_images(self, pixel_values, grid_thw):
        return self.visual(pixel_values.to(next(self.visual.parameters()).dtype), grid_thw)


def build_tower(name: str, device: torch.device, dtype: torch.dtype):
    from spaceserve.models.loader import init_dummy_weights
    from spaceserve.models.qwen2_5_vl.vision import Qwen2_5_VisionTransformer
    from spaceserve.models.qwen2_vl.vision import Qwen2VisionTransformer
    from spaceserve.models.resolve import resolve_model

    config = resolve_model(name).model_config
    cls = Qwen2_5_VisionTransformer if config.vision.window_size else Qwen2VisionTransformer
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            tower = cls(config.vision)
    finally:
        torch.set_default_dtype(previous)
    init_dummy_weights(tower, seed=0)
    return tower.eval(), config


def make_batch(grids, patch_dim: int, device: torch.device, seed: int):
    from spaceserve.core.multimodal import MultiModalFeature, PlaceholderRange
    from spaceserve.core.scheduler_output import EncoderBatch

    generator = torch.Generator(device=device).manual_seed(seed)
    items = []
    for index, (t, h, w) in enumerate(grids):
        pixels = torch.randn(t * h * w, patch_dim, generator=generator, device=device)
        items.append(MultiModalFeature(f"{seed}-{index}", "image" if t == 1 else "video",
                                       PlaceholderRange(0, t * h * w // 4), t * h * w, (t, h, w), pixels))  # fmt: skip
    return EncoderBatch(tuple(items))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(runner, batch, stream, device: torch.device) -> dict:
    """Host ms of execute() (GPU drained first, so launches never wait on a full queue) and GPU ms from its first
    launch to its last kernel (events on the stream)."""
    host, gpu = [], []
    context = torch.cuda.stream(stream) if stream is not None else Null()
    with context:
        for index in range(WARMUP + TIMED):
            sync(device)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            begin = time.perf_counter()
            out = runner.execute(batch)
            launched = time.perf_counter()
            if device.type == "cuda":
                end.record()
                end.synchronize()
            if index >= WARMUP:
                host.append((launched - begin) * 1e3)
                gpu.append(start.elapsed_time(end) if device.type == "cuda" else (time.perf_counter() - begin) * 1e3)
    return {"host_ms": statistics.median(host), "gpu_ms": statistics.median(gpu), "out": out}


class Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def compare(eager: dict, graphed: dict) -> dict:
    keys = sorted(eager)
    a = torch.cat([eager[k].float() for k in keys])
    b = torch.cat([graphed[k].float() for k in keys])
    return {
        "relative_error": ((a - b).norm() / a.norm()).item(),
        "max_abs_diff": (a - b).abs().max().item(),
        "finite": bool(torch.isfinite(b).all()),
    }


def attention_alone(device: torch.device, modes: list[str], smoke: bool) -> dict:
    """The varlen kernel over one 9216-row segment, 16 heads of 80, per head-split mode: useful TFLOP/s."""
    from spaceserve.layers.attention.triton import varlen_attention, varlen_tiling
    from spaceserve.layers.attention.triton.common import build_work_list
    from spaceserve.profile.timing import time_calls

    n, heads = (512, 2) if smoke else (9216, 16)
    q, k, v = torch.randn(n, 3, heads, 80, device=device, dtype=torch.bfloat16).unbind(1)
    tiling = varlen_tiling(n)
    work = build_work_list([n], tiling.block_m, 1, device)
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    count = torch.tensor([work.shape[0]], dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    results = {}
    for mode in modes:
        def run(mode=mode):
            varlen_attention(q, k, v, cu, work, 80**-0.5, tiling, out=out, work_count=count, head_split=mode)

        stats = time_calls(run, device, warmup=2, iters=3 if smoke else 10)
        results[mode] = {"ms": stats.median_ms, "tflops": 4 * heads * 80 * n * n / (stats.median_ms * 1e-3) / 1e12}
    return results


def measure_model(name: str, device: torch.device, dtype: torch.dtype, smoke: bool, rate: float | None,
                  head_split: str, ladder_streams: list | None) -> dict:  # fmt: skip
    from spaceserve.layers.attention.triton import common
    from spaceserve.layers.triton_ops import fused_ops
    from spaceserve.models.resolve import resolve_model
    from spaceserve.profile.floors import vision_flops
    from spaceserve.runtime.encoder_runner import EncoderRunner
    from spaceserve.runtime.vision_graphs import VisionCUDAGraphs, eager_replay, vision_graph_buckets

    tower, config = build_tower(name, device, dtype)
    merge = config.vision.spatial_merge_size
    ladder = vision_graph_buckets(64 if smoke else DEFAULT_BUDGET_TOKENS, merge)
    batches = {"9216": SMOKE_ONE if smoke else ONE_IMAGE, "mixed": SMOKE_MIXED if smoke else MIXED}
    buckets = tuple(sorted({next(b for b in ladder if b >= sum(t * h * w for t, h, w in g)) for g in batches.values()}))
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    capture = eager_replay if device.type != "cuda" else None
    kwargs = {"capture": capture} if capture is not None else {}
    graphs = VisionCUDAGraphs(tower, buckets, device, dtype, use_triton=None if device.type == "cuda" else False,
                              **kwargs)  # fmt: skip
    begin = time.perf_counter()
    graphs.capture_on([stream])
    result = {
        "model": name, "buckets": list(buckets), "capture_s": time.perf_counter() - begin,
        "graph_bytes": graphs.memory_bytes(stream), "head_split": head_split, "batches": {},
    }  # fmt: skip
    model = TowerModel(tower)
    images = resolve_model(name).image_config
    eager_runner, graph_runner = EncoderRunner(model, device, images), EncoderRunner(model, device, images, graphs)
    for label, grids in batches.items():
        batch = make_batch(grids, config.vision.patch_dim, device, seed=len(grids))
        flops = vision_flops(config, grids).total
        row = {"patches": sum(t * h * w for t, h, w in grids), "items": len(grids), "tflop": flops / 1e12}
        for kind, runner in (("eager", eager_runner), ("graph", graph_runner)):
            timed = time_batches(runner, batch, stream, device)
            row[kind] = {"host_ms": timed["host_ms"], "gpu_ms": timed["gpu_ms"],
                         "tflops": flops / (timed["gpu_ms"] * 1e-3) / 1e12}  # fmt: skip
            if rate:
                row[kind]["share_of_matmul"] = row[kind]["tflops"] / rate
            row[f"{kind}_out"] = timed["out"]
        row["graph_bucket"] = graphs.for_stream(stream).bucket_for(row["patches"])
        row["eager_vs_graph"] = compare(row.pop("eager_out"), row.pop("graph_out"))
        assert graph_runner.num_graphed_batches > 0
        result["batches"][label] = row
    if ladder_streams is not None:  # the components of the change, the pixel upload, the default ladder's memory
        batch = make_batch(batches["9216"], config.vision.patch_dim, device, seed=1)
        flops = vision_flops(config, batches["9216"]).total
        variants = {}
        components = [("unfused, padded head (as main)", False, "padded"), ("fused, padded head", True, "padded")]
        if head_split != "padded":
            components.append((f"unfused, {head_split} head", False, head_split))
        for label, fused, split in components:
            common.VARLEN_HEAD_SPLIT = split
            with fused_ops(fused):
                timed = time_batches(eager_runner, batch, stream, device)
            variants[label] = {"host_ms": timed["host_ms"], "gpu_ms": timed["gpu_ms"],
                               "tflops": flops / (timed["gpu_ms"] * 1e-3) / 1e12}  # fmt: skip
        common.VARLEN_HEAD_SPLIT = head_split
        result["eager_variants_9216"] = variants
        # what uploading host pixels costs on top (images preprocessed on the host arrive as pageable float32)
        host_pixels = [item.pixel_values.cpu() for item in batch.items]
        sync(device)
        begin = time.perf_counter()
        staged = graphs.for_stream(stream).pixels
        with torch.cuda.stream(stream) if stream is not None else Null():
            staged[: host_pixels[0].shape[0]].copy_(host_pixels[0], non_blocking=True)
        result["host_pixel_upload_ms_9216"] = (time.perf_counter() - begin) * 1e3
        result["default_ladder"] = capture_ladder(tower, ladder, device, dtype, ladder_streams, kwargs)
    del graphs
    return result


def capture_ladder(tower, ladder, device, dtype, streams, kwargs) -> dict:
    from spaceserve.runtime.vision_graphs import VisionCUDAGraphs

    graphs = VisionCUDAGraphs(tower, ladder, device, dtype, use_triton=None if device.type == "cuda" else False,
                              **kwargs)  # fmt: skip
    per_stream = []
    for stream, label in streams:
        begin = time.perf_counter()
        graphs.capture_on([stream])
        per_stream.append({"stream": label, "capture_s": time.perf_counter() - begin,
                           "bytes": graphs.memory_bytes(stream)})  # fmt: skip
    return {"buckets": len(ladder), "largest": ladder[-1], "streams": per_stream}


def ladder_streams(device: torch.device) -> list:
    if device.type != "cuda":
        return [(None, "cpu")]
    streams = [(torch.cuda.Stream(device), "stream")]
    try:
        from spaceserve.runtime.sm_partition import get_partition_manager, green_context_support

        if green_context_support(device) is None:
            partition = get_partition_manager(device).partition(64)
            streams.append((partition.encoder_stream, f"SM partition ({partition.encoder_sms} SMs)"))
        else:
            streams.append((torch.cuda.Stream(device), "second stream"))
    except Exception as exc:  # noqa: BLE001 - measured on a plain stream instead, and said so
        streams.append((torch.cuda.Stream(device), f"second stream (partition failed: {exc!r})"))
    return streams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--smoke", action="store_true", help="on the CPU (tiny presets)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from spaceserve.layers.attention.triton.common import VARLEN_HEAD_SPLIT

    extras = ladder_streams(device)
    print(json.dumps(measure_model(args.model, device, dtype, args.smoke, None, VARLEN_HEAD_SPLIT, extras), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
