"""Video decode benchmark: frames/s and time to model-ready tensors, CPU (PyAV) against NVDEC and GOP-parallel NVDEC.

For one clip (default: a generated 60 s 720p H.264 clip, GOP 60) and each decoder setup it measures
- decode throughput: every frame of the first --throughput-seconds decoded to RGB24 tensors on the setup's device;
- model-ready: probe + 2 fps sampling over the whole clip + decode + Qwen2-VL preprocessing (resize to the default
  video pixel budget, normalise, patchify) with spaceserve.multimodal.video.processor, on the setup's device.
Setups: CPU 1 thread, CPU all cores (FFmpeg threads), CPU GOP-parallel (one PyAV session per core), one NVDEC
session, GOP-parallel NVDEC with k sessions, and every GPU of the machine when there are several. NVDEC rows are
skipped, with the reason, when torchcodec or CUDA is missing. GOP-parallel rows also check their frames against the
sequential path of the same backend (bit-exact).

    python scripts/video_decode_bench.py --out benchmarks/results/video_decode
    (on the GPU machine first: source scripts/setup_video_gpu.sh)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spaceserve.models.config import ImageProcessorConfig  # noqa: E402
from spaceserve.multimodal.video import (  # noqa: E402
    DecoderPoolConfig,
    PyAVOptions,
    VideoDecoderPool,
    decode_frames,
    index_video,
    make_clip,
)
from spaceserve.multimodal.video.nvdec_backend import _import_torchcodec, torchcodec_version  # noqa: E402
from spaceserve.multimodal.video.processor import VideoProcessingParams, plan_video, preprocess_video  # noqa: E402
from spaceserve.multimodal.video.sampling import VideoSamplingParams, sample_frame_indices  # noqa: E402

SPEEDUP_TARGET = 20.0


@dataclass(frozen=True)
class Setup:
    name: str
    device: str
    backend: str
    pool_config: DecoderPoolConfig | None = None
    pyav_threads: int = 0
    torch_threads: int | None = None  # CPU rows: the resize/normalise runs on as many threads as the decode


def main() -> None:
    args = parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    data, clip_info = load_or_make_clip(args)
    video = index_video(data)
    metadata = video.metadata
    throughput_frames = list(range(min(metadata.num_frames, round(args.throughput_seconds * metadata.fps))))
    sampled = sample_frame_indices(metadata.num_frames, metadata.fps, VideoSamplingParams(fps=args.sample_fps))
    setups, skipped = build_setups(args)
    rows = []
    references: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for setup in setups:
        rows.append(run_setup(setup, data, throughput_frames, sampled, args, references))
        print(format_row(rows[-1]), flush=True)
    rows += [dict(name=name, skipped=reason) for name, reason in skipped]
    summarize(rows)
    result = dict(
        benchmark="video_decode",
        environment=environment(),
        clip={**clip_info, **{k: v for k, v in metadata.__dict__.items() if k != "keyframe_indices"},
              "num_gops": len(metadata.keyframe_indices)},
        workload=dict(
            throughput_frames=len(throughput_frames),
            sample_fps=args.sample_fps,
            sampled_frames=len(sampled),
            repeats=args.repeats,
            processor="spaceserve.multimodal.video.processor (Qwen2-VL video processor defaults)",
        ),
        speedup_target=SPEEDUP_TARGET,
        rows=rows,
        wall_s=round(time.monotonic() - started, 2),
    )
    (out_dir / "video_decode.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / "video_decode.md").write_text(markdown(result))
    print(markdown(result))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for video_decode.json and video_decode.md")
    parser.add_argument("--clip", help="video file to use instead of generating one")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--gop", type=int, default=60)
    parser.add_argument("--codec", choices=["h264", "hevc"], default="h264")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--throughput-seconds", type=float, default=20, help="decode every frame of this much video")
    parser.add_argument("--sample-fps", type=float, default=2.0)
    parser.add_argument("--sessions", default="2,4,8,16", help="GOP-parallel NVDEC session counts on one GPU")
    parser.add_argument("--sessions-per-gpu", type=int, default=4, help="for the all-GPUs row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per GPU measurement (median reported)")
    parser.add_argument("--cpu-repeats", type=int, default=1, help="timed runs per CPU measurement")
    return parser.parse_args()


def load_or_make_clip(args: argparse.Namespace) -> tuple[bytes, dict]:
    if args.clip:
        return Path(args.clip).read_bytes(), dict(source=args.clip)
    buffer = io.BytesIO()
    started = time.monotonic()
    make_clip(
        buffer, width=args.width, height=args.height, seconds=args.seconds, fps=args.fps, codec=args.codec,
        gop=args.gop, seed=args.seed,
    )
    info = dict(source="synthetic", encode_s=round(time.monotonic() - started, 2), size_bytes=len(buffer.getvalue()))
    print(f"generated clip: {args.seconds} s {args.width}x{args.height} {args.codec} GOP {args.gop} {info}", flush=True)
    return buffer.getvalue(), info


def build_setups(args: argparse.Namespace) -> tuple[list[Setup], list[tuple[str, str]]]:
    cores = os.cpu_count() or 1
    setups = [
        Setup("cpu-1thread", "cpu", "pyav", pyav_threads=1, torch_threads=1),
        Setup("cpu-all-cores", "cpu", "pyav", pyav_threads=0, torch_threads=cores),
        Setup(
            f"cpu-gop-parallel-x{cores}", "cpu", "pyav", torch_threads=cores,
            pool_config=DecoderPoolConfig(cpu_sessions=cores, cpu_threads_per_session=1, min_frames_per_chunk=1),
        ),
    ]
    skipped: list[tuple[str, str]] = []
    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA device"
    elif (import_error := _import_torchcodec()[1]) is not None:
        reason = import_error
    session_counts = [int(k) for k in args.sessions.split(",") if k.strip()]
    gpu_rows = ["nvdec-1session"] + [f"nvdec-gop-parallel-x{k}" for k in session_counts]
    if reason is not None:
        skipped += [(name, reason) for name in gpu_rows + ["nvdec-all-gpus"]]
        return setups, skipped
    setups.append(Setup("nvdec-1session", "cuda:0", "nvdec"))
    for k in session_counts:
        config = DecoderPoolConfig(gpu_sessions_per_device=k, gpu_devices=(0,), min_frames_per_chunk=1)
        setups.append(Setup(f"nvdec-gop-parallel-x{k}", "cuda:0", "nvdec", pool_config=config))
    gpus = torch.cuda.device_count()
    if gpus > 1:
        config = DecoderPoolConfig(
            gpu_sessions_per_device=args.sessions_per_gpu, gpu_devices=tuple(range(gpus)), min_frames_per_chunk=1
        )
        setups.append(Setup(f"nvdec-{gpus}gpus-x{args.sessions_per_gpu}", "cuda:0", "nvdec", pool_config=config))
    else:
        skipped.append(("nvdec-all-gpus", f"{gpus} GPU visible"))
    return setups, skipped


def run_setup(
    setup: Setup, data: bytes, throughput_frames: list[int], sampled: list[int], args: argparse.Namespace,
    references: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict:
    previous_threads = torch.get_num_threads()
    if setup.torch_threads is not None:
        torch.set_num_threads(setup.torch_threads)
    pool = VideoDecoderPool(setup.pool_config) if setup.pool_config is not None else None
    on_gpu = setup.device.startswith("cuda")
    repeats = args.repeats if on_gpu else args.cpu_repeats
    try:
        def decode(indices):
            return decode_frames(
                data, indices, device=setup.device, backend=setup.backend, decoders=pool,
                pyav_options=PyAVOptions(threads=setup.pyav_threads),
            )

        def model_ready():
            video = index_video(data)
            metadata = video.metadata
            indices = sample_frame_indices(metadata.num_frames, metadata.fps, VideoSamplingParams(fps=args.sample_fps))
            decoded = decode_frames(
                video, indices, device=setup.device, backend=setup.backend, decoders=pool,
                pyav_options=PyAVOptions(threads=setup.pyav_threads),
            )
            cfg = ImageProcessorConfig()
            plan = plan_video(len(indices), metadata.height, metadata.width, cfg, VideoProcessingParams())
            processed = preprocess_video(decoded.frames, plan, cfg)
            return decoded, processed

        if on_gpu:  # CUDA context, NVDEC decoder objects, kernels: not part of a steady-state request
            decode(throughput_frames[: min(len(throughput_frames), 120)])
            model_ready()
        decode_times, ready_times = [], []
        for _ in range(repeats):
            decoded, seconds = timed(lambda: decode(throughput_frames), on_gpu)
            decode_times.append(seconds)
        for _ in range(repeats):
            (ready, processed), seconds = timed(model_ready, on_gpu)
            ready_times.append(seconds)
        exact = check_against_sequential(setup, decoded.frames, ready.frames, references)
        decode_s, ready_s = statistics.median(decode_times), statistics.median(ready_times)
        return dict(
            name=setup.name,
            device=setup.device,
            backend_used=decoded.backend,
            fallback_reason=decoded.fallback_reason,
            chunks=decoded.num_chunks,
            decode_frames=len(throughput_frames),
            decode_s=round(decode_s, 4),
            decode_fps=round(len(throughput_frames) / decode_s, 1),
            model_ready_s=round(ready_s, 4),
            model_ready_frames=len(sampled),
            model_ready_chunks=ready.num_chunks,
            grid_thw=list(processed.grid_thw),
            pixel_values_shape=list(processed.pixel_values.shape),
            bit_exact_vs_sequential=exact,
            decode_times_s=[round(t, 4) for t in decode_times],
            model_ready_times_s=[round(t, 4) for t in ready_times],
        )
    except Exception as exc:  # one broken setup must not lose the others' results
        return dict(name=setup.name, error=f"{type(exc).__name__}: {exc}")
    finally:
        if pool is not None:
            pool.close()
        torch.set_num_threads(previous_threads)


def timed(fn, on_gpu: bool):
    if on_gpu:
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    if on_gpu:
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


def check_against_sequential(
    setup: Setup, decoded: torch.Tensor, ready: torch.Tensor, references: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> bool | None:
    """Sequential rows become the reference of their backend; parallel rows are compared with it."""
    if setup.pool_config is None:
        references.setdefault(setup.backend, (decoded.cpu(), ready.cpu()))
        return None
    reference = references.get(setup.backend)
    if reference is None:
        return None
    return bool(torch.equal(decoded.cpu(), reference[0]) and torch.equal(ready.cpu(), reference[1]))


def summarize(rows: list[dict]) -> None:
    base = next((r for r in rows if r.get("name") == "cpu-1thread" and "model_ready_s" in r), None)
    if base is None:
        return
    for row in rows:
        if "model_ready_s" in row:
            row["model_ready_speedup_vs_cpu1"] = round(base["model_ready_s"] / row["model_ready_s"], 2)
            row["decode_speedup_vs_cpu1"] = round(row["decode_fps"] / base["decode_fps"], 2)


def environment() -> dict:
    import av

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return dict(
        device=", ".join(gpus) if gpus else f"CPU only ({platform.processor() or platform.machine()})",
        gpus=len(gpus),
        cpu_cores=os.cpu_count(),
        commit=commit(),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        pyav=av.__version__,
        ffmpeg={name: ".".join(map(str, version)) for name, version in av.library_versions.items()},
        torchcodec=torchcodec_version(),
        started_at=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )


def commit() -> str:
    if os.environ.get("SPACESERVE_COMMIT"):
        return os.environ["SPACESERVE_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def format_row(row: dict) -> str:
    if "skipped" in row or "error" in row:
        return f"{row['name']}: {row.get('skipped') or row.get('error')}"
    return (
        f"{row['name']}: decode {row['decode_fps']} frames/s, model-ready {row['model_ready_s'] * 1000:.0f} ms "
        f"({row['backend_used']}, {row['model_ready_chunks']} chunks)"
    )


def markdown(result: dict) -> str:
    env, clip, work = result["environment"], result["clip"], result["workload"]
    lines = [
        "# Video decode benchmark",
        "",
        f"Device: {env['device']}, {env['cpu_cores']} CPU cores. Commit {env['commit']}. torch {env['torch']} "
        f"(CUDA {env['cuda']}), PyAV {env['pyav']} (libavcodec {env['ffmpeg'].get('libavcodec')}), "
        f"torchcodec {env['torchcodec']}.",
        f"Clip: {clip['duration_s']:.1f} s {clip['width']}x{clip['height']} {clip['codec']} at {clip['fps']:g} fps, "
        f"{clip['num_frames']} frames, {clip['num_gops']} GOPs ({clip.get('source')}).",
        f"Decode: every frame of the first {work['throughput_frames']} to RGB24 tensors. Model-ready: probe, "
        f"{work['sample_fps']:g} fps sampling ({work['sampled_frames']} frames), decode, Qwen2-VL resize + normalise "
        f"+ patchify on the row's device; median of {work['repeats']} (GPU) runs after a warm-up.",
        "",
        "| setup | backend | chunks | decode frames/s | x CPU 1 thread | model-ready ms | x CPU 1 thread | bit-exact vs sequential |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "skipped" in row or "error" in row:
            lines.append(f"| {row['name']} | {'skipped: ' + row['skipped'] if 'skipped' in row else 'error: ' + row['error']} | | | | | | |")
            continue
        exact = {None: "-", True: "yes", False: "NO"}[row["bit_exact_vs_sequential"]]
        backend = row["backend_used"] + (f" (fallback: {row['fallback_reason']})" if row["fallback_reason"] else "")
        lines.append(
            f"| {row['name']} | {backend} | {row['model_ready_chunks']} | {row['decode_fps']} | "
            f"{row.get('decode_speedup_vs_cpu1', '-')} | {row['model_ready_s'] * 1000:.0f} | "
            f"{row.get('model_ready_speedup_vs_cpu1', '-')} | {exact} |"
        )
    parallel = [r for r in result["rows"] if r.get("name", "").startswith("nvdec-") and "model_ready_speedup_vs_cpu1" in r]
    if parallel:
        best = max(parallel, key=lambda r: r["model_ready_speedup_vs_cpu1"])
        verdict = "met" if best["model_ready_speedup_vs_cpu1"] >= result["speedup_target"] else "NOT met"
        lines += [
            "",
            f"Best NVDEC setup to model-ready tensors: {best['name']}, {best['model_ready_speedup_vs_cpu1']}x over one "
            f"CPU thread (target >= {result['speedup_target']:g}x: {verdict}).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
