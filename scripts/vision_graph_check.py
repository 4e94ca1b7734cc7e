"""Vision encoder on one H200, in one run (under 4 minutes): vision CUDA graphs and the tower's kernels (issue 11).

    python3 scripts/vision_graph_check.py --out $OUT/vision-graphs
    python3 scripts/vision_graph_check.py --smoke --out /tmp/vision-smoke     # tiny towers on the CPU: the script runs

1. Ceilings, alone: copy bandwidth and the bf16 matmul rate (spaceserve/profile/hardware.py).
2. Correctness, in child processes at once (a fault stays in its child): each head-split mode of the varlen kernel
   (padded 128, split 64+16, split32 64+32) at Qwen2-VL sizes as the graphs launch it (fixed grid, device work count,
   stale work rows), repeated; compute-sanitizer memcheck of the default mode on small cases; the GPU tests of this
   area (pytest: vision graphs on a stream, an SM-partition stream and in time mode; the layout, the fused kernels
   and the varlen kernel in every mode and tiling, including the float32 tilings that left rows unwritten before,
   xfail there).
3. Measurements, alone, with the default head split if its check passed (else the best mode that did): for the
   Qwen2-VL-2B, Qwen2-VL-7B and Qwen2.5-VL-3B towers (dummy weights, bf16), at 9216 patches (one 1344x1344 image)
   and at a mixed batch (four images of 336-672 px and a 4-frame video, 6080 patches): eager vs graphed embeddings
   (relative error, max difference), host ms per batch (EncoderRunner.execute with the pixels already on the device;
   the upload of host pixels is measured apart), GPU ms (first launch to last kernel), TFLOP/s and share of the
   matmul rate. For 7B at 9216 also the eager tower with the fused kernels off and/or the padded head (the
   components of the change), the varlen kernel alone per head-split mode, and the graph memory and capture time of
   the default bucket ladder (encoder budget 16384 tokens: 65536 patches, 28 buckets) on two streams (the second an
   SM-partition stream where green contexts work).
4. DIR/summary.json, DIR/summary.md (the table, printed last), logs of the children.

The head-split check is scripts/varlen_split_check.py, the tower measurements scripts/vision_tower_bench.py.

Expected (written before the first run; docs/PERFORMANCE.md "Vision tower" has the reasoning):
- Host ms per batch: eager ~15-35 ms (about 300 launches now that the elementwise chains are fused; was 85-130 ms
  with ~1000 launches and per-item Python metadata); graphed 0.5-1.5 ms (vectorised layout and packing ~0.3-0.6 ms
  at 9216 patches, one H2D copy, one replay, one clone). Target <= 2 ms: met.
- 7B at 9216 patches: the main-branch tower took 89.6 ms (287 TFLOP/s, 36%). Fusing rotary (~12 torch kernels per
  q and k per layer on float32 copies), QuickGELU (3 kernels) and the residual adds saves ~20-25 ms -> ~65-70 ms;
  the 64+16 head split cuts the attention's dot work by 37.5% (~46 -> ~33 ms of attention) -> ~52-58 ms, i.e.
  440-490 TFLOP/s, 56-62% of the matmul rate. Graphed at 9216 the batch pads to the 9984 bucket (+8% of linear
  work, +~2 ms) and loses the launch gaps (~1 ms): about the eager GPU time. Target >= 50%: met if the split holds.
- The varlen kernel alone at 9216: padded ~300 TFLOP/s (useful FLOPs), split ~400-450.
- Mixed batch: eager GPU time a little lower per patch than 9216 (smaller segments); graphed it pads 6080 -> 6912.
- Eager vs graphed embeddings: relative error ~1e-3 (bf16: the linears run with more rows, so cuBLAS may tile
  differently); never NaN.
- Graph memory for the default ladder: ~2-3 GiB per stream (static pixels 0.15 GiB, the 65536-patch forward's
  intermediates ~2 GiB, the 28 graphs' outputs); capture ~2-4 s per stream.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(SCRIPTS))

import torch  # noqa: E402
from vision_tower_bench import attention_alone, ladder_streams, measure_model  # noqa: E402

BUDGET_S = 235
MODELS = ("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct")
SMOKE_MODELS = ("tiny-qwen2-vl", "tiny-qwen2.5-vl")
GIB = float(1 << 30)


# ---- helpers --------------------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _spawn(command: list[str], log: Path, env_extra: dict | None = None) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    handle = log.open("w")
    return subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env), log


def _finish(process: subprocess.Popen, log: Path, deadline: float) -> dict:
    try:
        rc = process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        process.kill()
        rc = "timeout"
    text = log.read_text(errors="replace")
    tail = [line for line in text.splitlines() if line.strip()][-3:]
    return {"rc": rc, "tail": tail, "log": log.name}


def _last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


# ---- phases -----------------------------------------------------------------------------------------------------


def measure_ceilings(device: torch.device) -> dict:
    from spaceserve.profile.hardware import measure_copy_bandwidth, measure_matmul_tflops

    if device.type != "cuda":
        return {"copy_bandwidth": None, "matmul_tflops": None}
    return {
        "copy_bandwidth": measure_copy_bandwidth(device).to_dict(),
        "matmul_tflops": measure_matmul_tflops(device).to_dict(),
    }


def start_checks(out: Path, smoke: bool) -> dict:
    """Phase 2's children, all started at once."""
    from spaceserve.layers.attention.triton.common import HEAD_SPLITS, VARLEN_HEAD_SPLIT

    script = str(SCRIPTS / "varlen_split_check.py")
    children = {}
    interpret = {} if torch.cuda.is_available() and not smoke else {"TRITON_INTERPRET": "1"}
    for mode in HEAD_SPLITS:
        command = [sys.executable, script, mode] + (["--small"] if smoke else [])
        children[f"split-{mode}"] = _spawn(command, out / f"split_{mode}.txt", interpret)
    if smoke:
        return children
    sanitizer = [
        "compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "9",
        sys.executable, script, VARLEN_HEAD_SPLIT, "--small",
    ]  # fmt: skip
    children["memcheck"] = _spawn(sanitizer, out / "memcheck.txt")
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEX"]
    children["pytest-graphs"] = _spawn(pytest + ["-m", "gpu", "tests/runtime/test_vision_graphs.py"], out / "pytest_graphs.txt")
    # the kernels: fused ops and layout first, the varlen kernel (every mode) last, so a fault there loses nothing else
    kernels = ["tests/models/test_vision_layout.py", "tests/layers/test_vision_fused_ops.py",
               "tests/layers/test_vision_varlen.py", "tests/layers/test_triton_attention.py"]  # fmt: skip
    children["pytest-kernels"] = _spawn(pytest + kernels + ["-k", "vision or varlen or split"], out / "pytest_kernels.txt")
    return children


def collect_checks(children: dict, deadline: float) -> dict:
    results = {}
    for name, (process, log) in children.items():
        result = _finish(process, log, deadline)
        if name.startswith("split-"):
            result["check"] = _last_json(log.read_text(errors="replace"))
        results[name] = result
    return results


def choose_head_split(checks: dict) -> tuple[str, str]:
    from spaceserve.layers.attention.triton.common import VARLEN_HEAD_SPLIT

    def passed(mode: str) -> bool:
        check = checks.get(f"split-{mode}", {})
        return check.get("rc") == 0 and bool((check.get("check") or {}).get("ok"))

    if passed(VARLEN_HEAD_SPLIT):
        return VARLEN_HEAD_SPLIT, "the default passed its check"
    for mode in ("split32", "split", "padded"):
        if passed(mode):
            return mode, f"the default {VARLEN_HEAD_SPLIT!r} failed its check; measured with {mode!r}"
    return "padded", "no mode passed its check; measured with 'padded' (the kernel main had)"


# ---- report ---------------------------------------------------------------------------------------------------


def markdown(summary: dict) -> str:
    lines = [f"# Vision graphs check ({summary['device']}, commit {summary['commit']})", ""]
    ceilings = summary.get("ceilings") or {}
    if ceilings.get("matmul_tflops"):
        lines.append(f"Ceilings: bf16 matmul {ceilings['matmul_tflops']['best']:.0f} TFLOP/s, copy "
                     f"{ceilings['copy_bandwidth']['best'] / 1e12:.2f} TB/s. Head split measured: "
                     f"{summary.get('head_split')} ({summary.get('head_split_reason')}).")  # fmt: skip
        lines.append("")
    lines += ["| check | result |", "|---|---|"]
    for name, check in (summary.get("checks") or {}).items():
        verdict = check.get("check", {}) or {}
        detail = "ok" if verdict.get("ok") else ("; ".join(check.get("tail", [])[-1:]) or str(check.get("rc")))
        lines.append(f"| {name} | rc {check.get('rc')}: {detail} |")
    lines += ["", "| tower | batch | patches (bucket) | eager host ms | graph host ms | eager GPU ms | graph GPU ms | "
              "eager TFLOP/s (share) | graph TFLOP/s (share) | eager vs graph rel. err |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for model in summary.get("models", []):
        if "error" in model:
            lines.append(f"| {model['model']} | error: {model['error']} | | | | | | | | |")
            continue
        for label, row in model["batches"].items():
            e, g = row["eager"], row["graph"]

            def rate(x):
                share = x.get("share_of_matmul")
                return f"{x['tflops']:.0f}" + (f" ({share:.0%})" if share else "")

            lines.append(
                f"| {model['model'].split('/')[-1]} | {label} | {row['patches']} ({row['graph_bucket']}) | "
                f"{e['host_ms']:.2f} | {g['host_ms']:.2f} | {e['gpu_ms']:.1f} | {g['gpu_ms']:.1f} | {rate(e)} | "
                f"{rate(g)} | {row['eager_vs_graph']['relative_error']:.1e} |"
            )
    for model in summary.get("models", []):
        for label, row in (model.get("eager_variants_9216") or {}).items():
            lines.append(f"| {model['model'].split('/')[-1]} eager {label} | 9216 | | {row['host_ms']:.2f} | | "
                         f"{row['gpu_ms']:.1f} | | {row['tflops']:.0f} | | |")  # fmt: skip
        ladder = model.get("default_ladder")
        if ladder:
            for entry in ladder["streams"]:
                lines.append(f"\nDefault ladder ({ladder['buckets']} buckets up to {ladder['largest']} patches) on "
                             f"{entry['stream']}: {entry['bytes'] / GIB:.2f} GiB, captured in {entry['capture_s']:.1f} s")  # fmt: skip
        if "host_pixel_upload_ms_9216" in model:
            lines.append(f"\nUploading 9216 host pixel rows (pageable float32): {model['host_pixel_upload_ms_9216']:.1f} ms "
                         "host time (not in the host ms above).")  # fmt: skip
    attention = summary.get("attention_alone") or {}
    if "error" in attention:
        lines.append(f"\nVarlen kernel alone: {attention['error']}")
    elif attention:
        lines.append("\nVarlen kernel alone, one 9216-row segment, 16 heads x 80: " + ", ".join(
            f"{mode} {r['tflops']:.0f} TFLOP/s ({r['ms']:.2f} ms)" for mode, r in attention.items()))  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny towers on the CPU (checks the script runs)")
    parser.add_argument("--skip-checks", action="store_true", help="no child checks (phase 2)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    deadline = started + BUDGET_S
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    summary: dict = {
        "command": shlex.join(["python3", "scripts/vision_graph_check.py", *(argv or sys.argv[1:])]),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("SPACESERVE_COMMIT") or _git("rev-parse", "--short", "HEAD"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
    }

    def write() -> None:
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (args.out / "summary.md").write_text(markdown(summary))

    summary["ceilings"] = measure_ceilings(device)
    rate = (summary["ceilings"].get("matmul_tflops") or {}).get("best")
    write()
    if args.skip_checks:
        summary["checks"] = {}
    else:
        children = start_checks(args.out, args.smoke)
        summary["checks"] = collect_checks(children, min(deadline - 85, started + 150))
    summary["head_split"], summary["head_split_reason"] = choose_head_split(summary["checks"])
    if args.skip_checks:
        from spaceserve.layers.attention.triton.common import VARLEN_HEAD_SPLIT

        summary["head_split"], summary["head_split_reason"] = VARLEN_HEAD_SPLIT, "checks skipped"
    from spaceserve.layers.attention.triton import common

    common.VARLEN_HEAD_SPLIT = summary["head_split"]
    write()
    passed = [m for m in ("padded", "split", "split32")
              if args.skip_checks or (summary["checks"].get(f"split-{m}", {}).get("check") or {}).get("ok")]  # fmt: skip
    try:
        if device.type == "cuda":
            summary["attention_alone"] = attention_alone(device, passed, args.smoke)
    except Exception as exc:  # noqa: BLE001 - recorded, the rest still runs
        summary["attention_alone"] = {"error": repr(exc)}
    summary["models"] = []
    for name in SMOKE_MODELS if args.smoke else MODELS:
        if time.monotonic() > deadline - 10:
            summary["models"].append({"model": name, "error": "skipped: out of time"})
            continue
        try:
            wants_ladder = "7B" in name or (args.smoke and name == SMOKE_MODELS[0])
            summary["models"].append(measure_model(name, device, dtype, args.smoke, rate, summary["head_split"],
                                                   ladder_streams(device) if wants_ladder else None))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - recorded, the rest still runs
            summary["models"].append({"model": name, "error": repr(exc), "traceback": traceback.format_exc()})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write()
    summary["elapsed_s"] = time.monotonic() - started
    write()
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
