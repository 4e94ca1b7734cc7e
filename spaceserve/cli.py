"""`spaceserve generate MODEL --image PATH --prompt TEXT`: one chat turn, answer printed to stdout."""

from __future__ import annotations

import argparse
import logging
import sys

from spaceserve.bench.cli import add_bench_parser, run_bench
from spaceserve.core.errors import SpaceServeError
from spaceserve.engine.arg_utils import EngineArgs
from spaceserve.engine.cli_fields import flags_in_message
from spaceserve.profile.cli import add_profile_parser, run_profile
from spaceserve.server.args import ServerArgs
from spaceserve.server.cli import add_serve_args, configure_logging, run_server


def _generate(args: argparse.Namespace) -> int:
    from spaceserve import LLM, SamplingParams

    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
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
    EngineArgs.add_cli_args(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    add_bench_parser(commands)
    add_profile_parser(commands)
    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_serve_args(serve)
    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            return run_bench(args)
        if args.command == "serve":
            return run_server(args)
        if args.command == "profile":
            return run_profile(args)
        configure_logging(logging.WARNING)
        return _generate(args)
    except SpaceServeError as exc:  # a setting or input the user can fix: the message, in flags, not a traceback
        print(f"error: {flags_in_message(str(exc), EngineArgs, ServerArgs)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
