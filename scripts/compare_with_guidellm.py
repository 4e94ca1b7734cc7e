"""`spaceserve bench --backend openai` against guidellm on the same server and load: does our client measure what
an independent one measures? Starts `spaceserve serve` on a tiny checkpoint with a real tokenizer (guidellm needs
one), runs guidellm (a concurrent profile, synthetic text) and then our bench at the same concurrency and lengths,
and writes DIR/summary.md and the raw results.

    python -m venv --system-site-packages /tmp/guidellm-venv && /tmp/guidellm-venv/bin/pip install guidellm
    python scripts/compare_with_guidellm.py --guidellm /tmp/guidellm-venv/bin/guidellm --out /tmp/compare

(--system-site-packages: guidellm requires torch, and this reuses the installed one instead of pulling another.)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "spaceserve.cli", "serve", str(model_dir), "--load-format", "dummy", "--port", str(port),
        "--max-model-len", "512", "--kv-cache-memory-bytes", str(128 << 20),
        "--disable-log-requests", "--uvicorn-log-level", "warning",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the server exited; see {log}")
        time.sleep(0.3)
    process.terminate()
    raise RuntimeError("the server did not come up")


def run_guidellm(guidellm: str, port: int, model_dir: Path, args: argparse.Namespace, out: Path) -> dict:
    path = out / "guidellm.json"
    command = [
        guidellm, "run", "--backend", f"kind=openai_http,target=http://127.0.0.1:{port}",
        "--profile", f"kind=concurrent,streams={args.concurrency}",
        "--constraint", f"kind=max_requests,count={args.num_requests}",
        "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_len},output_tokens={args.output_len}",
        "--tokenizer", f"kind=huggingface_auto,model={model_dir}",
        "--output", f"kind=json,path={path}", "--disable-console-interactive",
    ]
    with (out / "guidellm.log").open("w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=1800)
    metrics = json.loads(path.read_text())["benchmarks"][0]["metrics"]

    def stat(name: str, key: str) -> float:
        return float(metrics[name]["successful"][key])

    return {
        "requests": int(metrics["request_totals"]["successful"]),
        "prompt_tokens_median": stat("prompt_token_count", "median"),
        "ttft_median_ms": stat("time_to_first_token_ms", "median"),
        "ttft_mean_ms": stat("time_to_first_token_ms", "mean"),
        "itl_median_ms": stat("inter_token_latency_ms", "median"),
        "tpot_median_ms": stat("time_per_output_token_ms", "median"),
        "latency_median_s": stat("request_latency", "median"),
        "output_tokens_per_s": stat("output_tokens_per_second", "mean"),
    }


def run_spaceserve_bench(port: int, model_dir: Path, args: argparse.Namespace, out: Path) -> dict:
    path = out / "spaceserve.jsonl"
    path.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "spaceserve.cli", "bench", str(model_dir), "--backend", "openai",
        "--base-url", f"http://127.0.0.1:{port}/v1", "--workload", "text-only",
        "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len), "--num-prompts",
        str(args.num_requests), "--max-concurrency", str(args.concurrency), "--request-rate", "inf",
        "--out", str(path), "--disable-tqdm",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with (out / "spaceserve.log").open("w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, timeout=1800, env=env)
    row = json.loads(path.read_text().splitlines()[-1])
    return {
        "requests": row["completed"],
        "prompt_tokens_mean": (row["total_input_tokens"] or 0) / max(row["completed"], 1),
        "ttft_send_median_ms": row["p50_ttft_send_ms"],
        "ttft_arrival_median_ms": row["p50_ttft_ms"],
        "itl_median_ms": row["p50_itl_ms"],
        "tpot_median_ms": row["p50_tpot_ms"],
        "latency_median_s": row["p50_e2el_ms"] / 1e3,
        "output_tokens_per_s": row["output_throughput"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guidellm", required=True, help="the guidellm executable (a throwaway venv's)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--num-requests", type=int, default=40)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from tests.server.conftest import make_model_dir

    model_dir = args.out / "model"
    model_dir.mkdir(exist_ok=True)
    make_model_dir(model_dir)
    port = free_port()
    server = start_server(model_dir, port, args.out / "server.log")
    try:
        theirs = run_guidellm(args.guidellm, port, model_dir, args, args.out)
        ours = run_spaceserve_bench(port, model_dir, args, args.out)
    finally:
        server.terminate()
        server.wait(30)
    lines = [
        f"# spaceserve bench vs guidellm: {args.num_requests} requests at concurrency {args.concurrency}, "
        f"{args.prompt_len} prompt / {args.output_len} output tokens (synthetic text), one server",
        "",
        "| figure | guidellm | spaceserve bench |",
        "|---|---|---|",
        f"| completed requests | {theirs['requests']} | {ours['requests']} |",
        f"| prompt tokens per request (server's count) | {theirs['prompt_tokens_median']:.0f} (median) | "
        f"{ours['prompt_tokens_mean']:.0f} (mean) |",
        f"| TTFT median, from the send (ms) | {theirs['ttft_median_ms']:.1f} | {ours['ttft_send_median_ms']:.1f} |",
        f"| TTFT median, from the scheduled arrival (ms) | - | {ours['ttft_arrival_median_ms']:.1f} |",
        f"| ITL median (ms) | {theirs['itl_median_ms']:.1f} | {ours['itl_median_ms']:.1f} |",
        f"| TPOT median (ms) | {theirs['tpot_median_ms']:.1f} | {ours['tpot_median_ms']:.1f} |",
        f"| request latency median (s) | {theirs['latency_median_s']:.2f} | {ours['latency_median_s']:.2f} |",
        f"| output tokens/s | {theirs['output_tokens_per_s']:.1f} | {ours['output_tokens_per_s']:.1f} |",
    ]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"guidellm": theirs, "spaceserve": ours}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
