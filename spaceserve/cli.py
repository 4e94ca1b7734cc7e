"""`spaceserve generate MODEL --image PATH --prompt TEXT`: one chat turn, answer printed to stdout."""

from __future__ import annotations

import argparse
import sys

from spaceserve.core.errors import SpaceServeError


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a Hugging Face model directory, a Hub cache name, or a preset (tiny-qwen2-vl)")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="KV cache size; overrides the above")
    parser.add_argument("--encoder-policy", default="fcfs", choices=["fcfs", "twsrft"])
    parser.add_argument("--multiplex", default="time", choices=["time"])


def _generate(args: argparse.Namespace) -> int:
    from spaceserve import LLM, SamplingParams

    llm = LLM(
        args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        encoder_policy=args.encoder_policy,
        multiplex=args.multiplex,
    )
    content: list[dict] = [{"type": "image", "image": path} for path in args.image]
    content.append({"type": "text", "text": args.prompt})
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    output = llm.chat([{"role": "user", "content": content}], params)[0]
    print(output.outputs[0].text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spaceserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="answer one prompt (with images) and print the answer")
    _add_engine_args(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        return _generate(args)
    except SpaceServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
