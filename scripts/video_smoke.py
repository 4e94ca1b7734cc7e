"""One video request end to end on a real-size model with dummy weights; prints the TTFT split.

    python3 scripts/video_smoke.py --model Qwen/Qwen2-VL-7B-Instruct --seconds 60 --max-pixels 151200

Run with CUDA_LAUNCH_BLOCKING=1 to pin a device fault to the kernel that caused it.
"""

from __future__ import annotations

import argparse
import io
import json

from spaceserve import LLM, SamplingParams
from spaceserve.multimodal.video import make_clip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Qwen/Qwen2-VL-7B-Instruct")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--max-pixels", type=int, default=151200)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()

    llm = LLM(
        args.model,
        load_format="dummy",
        mm_processor_kwargs={"max_pixels": args.max_pixels},
        cuda_graph_sizes=(1, 2, 4, 8),
        enforce_eager=args.enforce_eager,
    )
    for index in range(args.requests):  # the first request pays for compiles; later ones show the steady state
        clip = io.BytesIO()  # a new clip each time, so no cache serves it
        make_clip(clip, width=args.width, height=args.height, seconds=args.seconds, gop=60, seed=index + 1)
        prompt = {"prompt": "<|vision_start|><|video_pad|><|vision_end|>What happens?", "multi_modal_data": {"video": clip.getvalue()}}
        output = llm.generate(prompt, SamplingParams(max_tokens=4, ignore_eos=True))[0]
        m = output.metrics
        split = {
            "request": index,
            "error": output.error,
            "prompt_tokens": len(output.prompt_token_ids),
            "ttft_s": m["first_token_time"] - m["arrival_time"],
            "decode_s": m["video_decode_end_time"] - m["video_decode_start_time"],
            "encode_s": m["encoder_end_time"] - m["encoder_enqueued_time"],
            "prefill_s": m["first_token_time"] - m["encoder_end_time"],
        }
        split["decode_share_of_ttft"] = split["decode_s"] / split["ttft_s"]
        print(json.dumps(split))
    llm.llm_engine.shutdown()


if __name__ == "__main__":
    main()
