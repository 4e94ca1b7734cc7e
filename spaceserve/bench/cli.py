"""`spaceserve bench MODEL [engine flags] [bench flags]`: a serving benchmark, in-process or against a server.

In-process, the engine flags are `spaceserve serve`'s (EngineArgs); --multiplex and --encoder-policy take comma
lists and build one engine per combination. Against a server (--backend openai) they only label the results.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import asdict, replace
from typing import Any

from spaceserve.bench.arrivals import parse_rates
from spaceserve.bench.backends import Backend, InProcessBackend, OpenAIBackend
from spaceserve.bench.metrics import SLO
from spaceserve.bench.plot import plot_rows
from spaceserve.bench.report import append_jsonl, device_name, git_state, print_table, spaceserve_version
from spaceserve.bench.runner import SweepConfig, Target, WorkloadSet, run_sweep
from spaceserve.bench.video_workload import (
    VideoWorkloadOptions,
    default_cache_dir,
    parse_codecs,
    parse_durations,
    parse_resolutions,
)
from spaceserve.bench.workloads import (
    IntRange,
    PromptTextMaker,
    WorkloadOptions,
    parse_image_sizes,
    workload_names,
)
from spaceserve.core.errors import ConfigError, SpaceServeError
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.cli_fields import flags_in_message


def add_bench_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    bench = commands.add_parser(
        "bench",
        help="benchmark serving: latency and throughput under a request rate",
        description=__doc__,
        conflict_handler="resolve",  # --multiplex / --encoder-policy below replace EngineArgs' single-value flags
    )
    EngineArgs.add_cli_args(bench)
    sweep = bench.add_argument_group("what to measure")
    sweep.add_argument("--backend", choices=["inprocess", "openai"], default="inprocess")
    sweep.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the server (with --backend openai)")
    sweep.add_argument("--multiplex", type=_names, default=["time"], help="execution modes, e.g. time,streams,space")
    sweep.add_argument("--encoder-policy", type=_names, default=["fcfs"], help="encoder policies, e.g. fcfs,twsrft")
    sweep.add_argument("--request-rate", type=_arg(parse_rates), default=[float("inf")], help="req/s list, or inf")
    sweep.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 = Poisson")
    sweep.add_argument("--num-prompts", type=int, default=100, help="measured requests per rate point")
    sweep.add_argument("--num-warmups", type=int, default=4, help="requests sent first and not counted")
    sweep.add_argument("--max-concurrency", type=int, default=None)
    sweep.add_argument(
        "--slo",
        type=_arg(SLO.parse),
        action="append",
        default=None,
        help="goodput limits in s, e.g. ttft=2,tpot=0.05; repeat for several (one row per SLO from the same requests)",
    )
    sweep.add_argument("--request-timeout", type=float, default=None, help="seconds per HTTP request (openai)")

    workload = bench.add_argument_group("workload (the --seed flag seeds it too)")
    workload.add_argument("--workload", choices=workload_names(), default="image-mix")
    workload.add_argument("--image-sizes", type=_arg(parse_image_sizes), default=WorkloadOptions(0).image_sizes)
    workload.add_argument("--images-per-request", type=_arg(IntRange.parse), default=IntRange(1, 1))
    workload.add_argument("--prompt-len", type=_arg(IntRange.parse), default=WorkloadOptions(0).prompt_len)
    workload.add_argument("--output-len", type=_arg(IntRange.parse), default=WorkloadOptions(0).output_len)
    workload.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg")
    video_defaults = VideoWorkloadOptions()
    workload.add_argument(
        "--video-resolutions",
        type=_arg(parse_resolutions),
        default=video_defaults.resolutions,
        help="video workload: 480p,720p,1080p or WIDTHxHEIGHT buckets",
    )
    workload.add_argument(
        "--video-durations", type=_arg(parse_durations), default=video_defaults.durations_s, help="seconds, e.g. 10,60"
    )
    workload.add_argument("--video-codecs", type=_arg(parse_codecs), default=video_defaults.codecs, help="h264,hevc")
    workload.add_argument("--video-fps", type=int, default=video_defaults.fps)
    workload.add_argument("--video-gop", type=int, default=video_defaults.gop, help="frames per GOP of the clips")
    workload.add_argument(
        "--video-clip-cache-dir", default=default_cache_dir(), help="where encoded clips are kept between runs"
    )

    output = bench.add_argument_group("results")
    output.add_argument("--out", default=None, help="append one JSON object per run to this file")
    output.add_argument("--plot", default=None, help="draw TPOT and TTFT against rate to this PNG")
    output.add_argument("--label", default=None, help="a free-form tag stored in every row")
    output.add_argument("--device-label", default=None, help="the device name to record (default: detected)")
    output.add_argument("--disable-tqdm", action="store_true")
    return bench


def run_bench(args: argparse.Namespace) -> int:
    try:
        config = _sweep_config(args)
        text_maker = PromptTextMaker(_tokenizer_for(args))
        targets = _targets(args)
        workloads = WorkloadSet(config, text_maker)
        workloads.rate_point(0)  # builds the first requests now, so bad workload options fail before any engine
    except (ValueError, SpaceServeError) as exc:
        print(f"error: {flags_in_message(str(exc), EngineArgs)}", file=sys.stderr)
        return 2
    commit, dirty = git_state()
    run_fields = {
        "label": args.label,
        "spaceserve_version": spaceserve_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "backend": args.backend,
        "base_url": args.base_url if args.backend == "openai" else None,
        "device": args.device_label or ("remote" if args.backend == "openai" else None),
        "model": args.model,
        "workload": args.workload,
        "workload_options": config.options.as_dict(),
    }

    def on_row(row: dict[str, Any]) -> None:
        if args.out:
            append_jsonl(args.out, row)
        print_table([row])

    rows = asyncio.run(run_sweep(config, targets, workloads, run_fields, on_row))
    if len(rows) > 1:
        print("\nsummary (latencies in ms)")
        print_table(rows)
    if args.plot:
        try:
            plot_rows([row for row in rows if row["slo"] == rows[0]["slo"]], args.plot)  # latencies: any one SLO
        except ValueError as exc:
            print(f"no plot: {exc}", file=sys.stderr)
    return 0 if all(row["status"] == "ok" for row in rows) else 1


def _sweep_config(args: argparse.Namespace) -> SweepConfig:
    if args.num_prompts < 1 or args.num_warmups < 0:
        raise ValueError("--num-prompts must be >= 1 and --num-warmups >= 0")
    if not args.multiplex or not args.encoder_policy:
        raise ValueError("--multiplex and --encoder-policy need at least one name each")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    options = WorkloadOptions(
        num_requests=args.num_prompts,
        seed=args.seed,
        image_sizes=args.image_sizes,
        images_per_request=args.images_per_request,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        image_format=args.image_format,
        video=_video_options(args) if args.workload == "video" else None,
    )
    return SweepConfig(
        workload=args.workload,
        options=options,
        rates=tuple(args.request_rate),
        burstiness=args.burstiness,
        num_warmups=args.num_warmups,
        max_concurrency=args.max_concurrency,
        slos=tuple(args.slo or ()),
        show_progress=not args.disable_tqdm,
    )


def _video_options(args: argparse.Namespace) -> VideoWorkloadOptions:
    return VideoWorkloadOptions(
        resolutions=args.video_resolutions,
        durations_s=args.video_durations,
        codecs=args.video_codecs,
        fps=args.video_fps,
        gop=args.video_gop,
        content_seed=args.seed,
        cache_dir=args.video_clip_cache_dir,
    )


def _tokenizer_for(args: argparse.Namespace):
    """The model's tokenizer, to cut prompts to an exact token count; without it (a remote model not known here)
    prompts are approximately --prompt-len tokens."""
    from spaceserve.models.resolve import resolve_model
    from spaceserve.tokenizer import load_tokenizer

    try:
        resolved = resolve_model(args.model)
    except ConfigError:
        if args.backend == "inprocess":
            raise
        print(f"note: {args.model!r} is not known here; prompt lengths are approximate", file=sys.stderr)
        return None
    return load_tokenizer(resolved.directory, resolved.model_config)


def _targets(args: argparse.Namespace) -> list[Target]:
    if args.backend == "openai":
        if len(args.multiplex) != 1 or len(args.encoder_policy) != 1:
            raise ValueError("--backend openai measures one server: give one --multiplex and one --encoder-policy")

        async def open_server() -> tuple[Backend, dict[str, Any]]:
            return OpenAIBackend(args.base_url, args.model, args.request_timeout), {}

        return [Target(args.multiplex[0], args.encoder_policy[0], open_server)]
    base = EngineArgs.from_cli_args(argparse.Namespace(**{**vars(args), "multiplex": "time", "encoder_policy": "fcfs"}))
    return [
        Target(mode, policy, _inprocess_opener(replace(base, multiplex=mode, encoder_policy=policy), args.device_label))
        for mode in args.multiplex
        for policy in args.encoder_policy
    ]


def _inprocess_opener(engine_args: EngineArgs, device_label: str | None):
    async def open_engine() -> tuple[Backend, dict[str, Any]]:
        from spaceserve.engine.async_llm import AsyncLLM

        config = engine_args.create_engine_config()  # raises ConfigError for a mode this build cannot run
        engine = AsyncLLM.from_engine_args(engine_args)
        known = {
            "device": device_label or device_name(config.device),
            "engine_settings": engine_settings(engine_args, config, engine),
        }
        return InProcessBackend(engine, engine.tokenizer), known

    return open_engine


def engine_settings(engine_args: EngineArgs, config: Any, engine: Any) -> dict[str, Any]:
    """The flags as given and the values the engine resolved from them (encoder budget, KV blocks, ...)."""
    return {
        "engine_args": asdict(engine_args),
        "device": config.device,
        "dtype": config.dtype,
        "load_format": config.load_format,
        "attention_backend": config.attention_backend,
        "enforce_eager": config.enforce_eager,
        "cuda_graph_sizes": config.cuda_graph_sizes,
        "scheduler": asdict(config.scheduler),
        "encoder": asdict(config.encoder),
        "cache": asdict(config.cache),
        "video": asdict(config.video),
        "num_kv_blocks": engine.stats.num_kv_blocks,
        "execution": getattr(engine, "execution", None),
    }


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _arg(parse):
    """An argparse type from a parser raising ValueError, keeping the parser's message."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert
