"""Video TTFT with decode, encode and prefill pipelined per chunk (issue 18), on the GPU in one run.

    eval "$(bash scripts/setup_video_gpu.sh)"        # PyAV + torchcodec from the carried wheels, FFmpeg's libraries
    python3 scripts/video_ttft_check.py --out $OUT/video_ttft

For each model (default Qwen2-VL-2B and -7B, dummy weights, one engine each, in a process of its own) and each clip
(60 s of 720p and of 1080p H.264, 30 fps, GOP 60, encoded once into --clip-dir), one request at a time:

- pipelined: the engine's default (chunks of temporal patches encoded and prefilled as they decode). The engine's
  very first request is the 720p one, so the decoder start-up (warmed when the engine starts) is part of what is
  checked; each clip is then sent again ("steady").
- unpipelined: the same engine with video_chunk_tokens=0 for these requests (one chunk per video, encoded once the
  whole video is decoded; the engine's input processor is swapped, nothing else changes).
- baseline: the clip's sampled frames already decoded (given as a uint8 tensor), unpipelined; its encode + prefill
  is the "encode + prefill alone" the target compares with.

Every request's bytes are new (a trailing MP4 `free` box, as the bench does), so no processed-video, encoder or
prefix cache serves it. TTFT is wall time from before `add_request` (probe, hash, everything) to the first token;
the split (decode, encode, prefill, overlap) is the bench's (spaceserve.bench.metrics.ttft_split). Target: pipelined
TTFT <= 1.15 x baseline encode + prefill, first request included. The copy bandwidth and bf16 matmul rate are
measured first, in the same run. Results: DIR/summary.md, DIR/summary.json, DIR/<model>.json.

On a CPU it runs as a smoke check with a tiny model and small clips:
    python3 scripts/video_ttft_check.py --models tiny-qwen2-vl --resolutions 96x64 --seconds 4 --out /tmp/vt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET = 1.15
DEFAULT_MODELS = "Qwen/Qwen2-VL-2B-Instruct,Qwen/Qwen2-VL-7B-Instruct"
PROMPT = "<|vision_start|><|video_pad|><|vision_end|>Describe what happens in this video."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--resolutions", default="720p,1080p")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--gop", type=int, default=60)
    parser.add_argument("--max-pixels", type=int, default=151200, help="per frame (PERFORMANCE.md's video runs)")
    parser.add_argument("--clip-dir", default=None, help="where the clips are encoded once (default: a temp dir)")
    parser.add_argument("--engine-args", default="{}", help="more LLM(...) keyword arguments, as JSON")
    parser.add_argument("--time-budget-s", type=float, default=540.0)
    parser.add_argument("--in-process", action="store_true", help="run the engine core in the script's process")
    parser.add_argument("--only-model", help=argparse.SUPPRESS)  # the per-model child process
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only_model:
        result = run_model(args.only_model, args)
        (out / f"{slug(args.only_model)}.json").write_text(json.dumps(result, indent=1))
        return 0

    started = time.monotonic()
    clips = make_clips(args)
    ceilings = measure_ceilings()
    print(json.dumps({"ceilings": ceilings}), flush=True)
    results, code = [], 0
    for model in args.models.split(","):
        left = args.time_budget_s - (time.monotonic() - started)
        if left < 30:
            print(f"skipping {model}: {left:.0f} s left", flush=True)
            code = 1
            continue
        command = [sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:])]
        command += ["--only-model", model, "--clip-dir", str(clips["dir"])]
        try:
            done = subprocess.run(command, cwd=REPO, timeout=left)
        except subprocess.TimeoutExpired:
            print(f"timed out: {model}", flush=True)
            code = 1
            continue
        path = out / f"{slug(model)}.json"
        if done.returncode != 0 or not path.exists():
            print(f"{model} failed (exit {done.returncode})", flush=True)
            code = 1
            continue
        results.append(json.loads(path.read_text()))
    summary = {
        "environment": environment(),
        "ceilings": ceilings,
        "clips": clips["clips"],
        "settings": {"max_pixels": args.max_pixels, "target": TARGET, "engine_args": json.loads(args.engine_args)},
        "models": results,
        "wall_s": time.monotonic() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = summary_markdown(summary)
    (out / "summary.md").write_text(text)
    print(text, flush=True)
    return code if all(check["met"] for r in results for check in r["checks"]) else code or 2


# ---- clips ----------------------------------------------------------------------------------------------------


def parse_resolution(name: str) -> tuple[int, int]:
    from spaceserve.bench.video_workload import parse_resolutions

    ((width, height),) = parse_resolutions(name)
    return width, height


def make_clips(args) -> dict[str, Any]:
    """Encode each clip once (in parallel; x264 threads itself too) into the clip dir, reused by later runs."""
    from spaceserve.bench.video_workload import ClipKey, VideoWorkloadOptions, clip_path

    clip_dir = Path(args.clip_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), "spaceserve-ttft-clips"))
    options = VideoWorkloadOptions(
        resolutions=tuple(parse_resolution(r) for r in args.resolutions.split(",")),
        durations_s=(args.seconds,),
        codecs=("h264",),
        fps=args.fps,
        gop=args.gop,
        cache_dir=str(clip_dir),
    )
    keys = {name: ClipKey(*parse_resolution(name), args.seconds, "h264") for name in args.resolutions.split(",")}
    start = time.monotonic()
    with ThreadPoolExecutor(len(keys)) as pool:
        paths = dict(zip(keys, pool.map(lambda key: clip_path(key, options), keys.values())))
    print(f"clips ready in {time.monotonic() - start:.1f} s: {', '.join(map(str, paths.values()))}", flush=True)
    clips = {name: {"path": str(path), "bytes": path.stat().st_size} for name, path in paths.items()}
    return {"dir": clip_dir, "clips": clips, "options": options}


# ---- one model (child process) ----------------------------------------------------------------------------------


def run_model(model: str, args) -> dict[str, Any]:
    import torch

    from spaceserve import LLM, SamplingParams
    from spaceserve.bench.video_workload import tagged
    from spaceserve.engine.input_processor import InputProcessor
    from spaceserve.multimodal.video import DecoderPoolConfig, VideoDecoderPool

    clips = make_clips(args)["clips"]
    data = {name: Path(info["path"]).read_bytes() for name, info in clips.items()}
    started = time.monotonic()
    engine_args = {"load_format": "dummy", "cuda_graph_sizes": (1, 2, 4, 8)} | json.loads(args.engine_args)
    if args.in_process:
        engine_args["multiprocess"] = False
    llm = LLM(model, mm_processor_kwargs={"max_pixels": args.max_pixels}, **engine_args)
    engine = llm.llm_engine  # the front; the engine core runs in its own process unless --in-process
    build_s = time.monotonic() - started
    frames_pool = VideoDecoderPool(DecoderPoolConfig(cpu_sessions=os.cpu_count() or 1))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    pipelined_processor = engine.input_processor
    unpipelined_config = dataclasses.replace(
        engine.config, video=dataclasses.replace(engine.config.video, chunk_tokens=0)
    )
    unpipelined_processor = InputProcessor(unpipelined_config, engine.tokenizer)
    tags = iter(range(1, 1 << 30))
    rows = []

    def request(name: str, mode: str, video: Any, processor, label: str) -> dict[str, Any]:
        engine.input_processor = processor
        row = one_request(engine, {"prompt": PROMPT, "multi_modal_data": {"video": video}}, params)
        row |= {"clip": name, "mode": mode, "run": label}
        print(json.dumps(row), flush=True)
        rows.append(row)
        return row

    names = list(data)
    for name in names:  # the engine's first request is the first clip, pipelined
        request(name, "pipelined", tagged(data[name], 0, next(tags)), pipelined_processor, "first")
    for name in names:
        request(name, "unpipelined", tagged(data[name], 0, next(tags)), unpipelined_processor, "first")
    baselines = {}
    for name in names:
        frames = decoded_frames(data[name], frames_pool)
        row = request(name, "baseline", frames, unpipelined_processor, "frames given")
        baselines[name] = row["encode_s"] + row["prefill_s"]
        del frames
    for name in names:
        request(name, "pipelined", tagged(data[name], 0, next(tags)), pipelined_processor, "steady")
        request(name, "unpipelined", tagged(data[name], 0, next(tags)), unpipelined_processor, "steady")
    engine.input_processor = pipelined_processor
    engine.check_idle_integrity()

    frames_pool.close()
    checks = []
    for row in rows:
        if row["mode"] != "pipelined":
            continue
        base = baselines[row["clip"]]
        ratio = row["ttft_s"] / base
        row["ratio_to_baseline"] = ratio
        checks.append({"clip": row["clip"], "run": row["run"], "ttft_s": row["ttft_s"], "baseline_s": base,
                       "ratio": ratio, "met": ratio <= TARGET})  # fmt: skip
    for row in rows:
        row.setdefault("ratio_to_baseline", row["ttft_s"] / baselines[row["clip"]])
    result = {
        "model": model,
        "device": engine.info["device"],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "engine_core": "in process" if args.in_process else "own process",
        "engine_build_s": build_s,
        "decoder_warm_up_s": engine.call_utility("video_stats")["warm_up_s"],
        "video_config": dataclasses.asdict(engine.config.video),
        "execution": engine.execution,
        "rows": rows,
        "baselines_s": baselines,
        "checks": checks,
    }
    engine.shutdown()
    return result


def one_request(engine, prompt: dict[str, Any], params) -> dict[str, Any]:
    from spaceserve.bench.metrics import ttft_split

    submitted = time.monotonic()
    request = engine.add_request(prompt, params)
    added = time.monotonic()
    output = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                output = out
    if output is None or output.error is not None:
        raise RuntimeError(f"request failed: {None if output is None else output.error}")
    metrics = output.metrics
    split = ttft_split(metrics)
    chunks = [f for f in request.mm_features if f.modality == "video"]
    return {
        "ttft_s": metrics["first_token_time"] - submitted,
        "engine_ttft_s": metrics["first_token_time"] - metrics["arrival_time"],
        "input_processing_s": added - submitted,
        "decode_s": split["ttft_video_decode"] or 0.0,
        "encode_s": split["ttft_encode"],
        "prefill_s": split["ttft_prefill"],
        "overlap_s": split["ttft_overlap"] or 0.0,
        "prompt_tokens": len(output.prompt_token_ids),
        "video_chunks": len(chunks),
        "decode": engine.call_utility("video_stats")["last_decode"] if split["ttft_video_decode"] else None,
    }


def decoded_frames(clip: bytes, pool):
    """The clip's sampled frames decoded beforehand (as the engine samples them; PyAV in this process, so its CUDA is
    left alone), as a CPU uint8 tensor."""
    from spaceserve.multimodal.video import decode_frames, probe_video
    from spaceserve.multimodal.video.sampling import VideoSamplingParams, sample_frame_indices

    meta = probe_video(clip)
    indices = sample_frame_indices(meta.num_frames, meta.fps, VideoSamplingParams())
    return decode_frames(clip, indices, backend="pyav", decoders=pool).frames


# ---- environment and summary ------------------------------------------------------------------------------------


def measure_ceilings() -> dict[str, Any]:
    import torch

    from spaceserve.profile.hardware import measure_ceilings as measure

    ceilings = measure()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the measurement's buffers, before the engines size their KV caches
    return ceilings


def environment() -> dict[str, Any]:
    import av
    import torch

    from spaceserve.multimodal.video.nvdec_backend import torchcodec_version

    try:
        commit = os.environ.get("SPACESERVE_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "commit": commit,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "pyav": av.__version__,
        "torchcodec": torchcodec_version(),
        "cpu_cores": os.cpu_count(),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    env, ceilings = summary["environment"], summary["ceilings"]
    lines = [
        f"# Video TTFT, pipelined per chunk (commit {env['commit'][:12]})",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), PyAV {env['pyav']}, torchcodec {env['torchcodec']}; "
        f"max_pixels {summary['settings']['max_pixels']}; wall {summary['wall_s']:.0f} s.",
    ]
    if "copy_bandwidth" in ceilings:
        lines.append(
            f"{ceilings['device']}: copy {ceilings['copy_bandwidth']['best'] / 1e12:.2f} TB/s, "
            f"bf16 matmul {ceilings['matmul_bf16']['best']:.0f} TFLOP/s (best of the timed repetitions)."
        )
    lines += [
        "",
        f"Target: pipelined TTFT <= {TARGET}x baseline (encode + prefill with the frames already decoded).",
        "",
        "| model | clip | mode | run | tokens | chunks | TTFT ms | decode | encode | prefill | overlap | input | "
        "x baseline | decoder |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in summary["models"]:
        for row in result["rows"]:
            decode = row.get("decode") or {}
            decoder = f"{decode.get('backend')} x{decode.get('sessions')}" if decode else "-"
            lines.append(
                f"| {result['model'].split('/')[-1]} | {row['clip']} | {row['mode']} | {row['run']} | "
                f"{row['prompt_tokens']} | {row['video_chunks']} | {row['ttft_s'] * 1e3:.0f} | "
                f"{row['decode_s'] * 1e3:.0f} | {row['encode_s'] * 1e3:.0f} | {row['prefill_s'] * 1e3:.0f} | "
                f"{row['overlap_s'] * 1e3:.0f} | {row['input_processing_s'] * 1e3:.0f} | "
                f"{row['ratio_to_baseline']:.2f} | {decoder} |"
            )
    lines += ["", "| model | clip | run | TTFT ms | baseline ms | ratio | met |", "|---|---|---|---|---|---|---|"]
    for result in summary["models"]:
        for check in result["checks"]:
            lines.append(
                f"| {result['model'].split('/')[-1]} | {check['clip']} | {check['run']} | {check['ttft_s'] * 1e3:.0f} | "
                f"{check['baseline_s'] * 1e3:.0f} | {check['ratio']:.2f} | {'yes' if check['met'] else '**no**'} |"
            )
        lines.append(
            f"| {result['model'].split('/')[-1]} | engine build {result['engine_build_s']:.1f} s, decoder warm-up "
            f"{json.dumps({k: round(v, 2) for k, v in result['decoder_warm_up_s'].items()})} | | | | | |"
        )
    return "\n".join(lines) + "\n"


def slug(model: str) -> str:
    return model.replace("/", "_")


if __name__ == "__main__":
    raise SystemExit(main())
