"""SM resource-utility curves of Qwen2-VL-2B on this GPU, in one run of under 4 minutes: `spaceserve profile` with
the default grid (the encoder on every split the device grants, the LM on every other one, plus the whole device)
and 2 to 6 timed calls per point (estimated on an H200: ~50 s encoder, ~55 s LM, ~20 s capturing decode and vision
graphs on every side's stream, ~30 s engine build and ceilings; points past a 190 s budget are filled),
then a check of what came back and the allocator's choices on it for a few canonical states.

    python3 scripts/sm_curves_gpu.py --out $OUT/sm-curves-2b
    python3 scripts/sm_curves_gpu.py --summarize DIR      # rebuild summary.md from DIR/sm_curves.json

Writes under --out: sm_curves.json (the curves file, with the copy/matmul ceilings and versions of the run),
plots/{encoder,lm_decode,lm_mixed}.png, profile.log (the command's output), summary.md (the run, a few measured
points, how many points were raised to keep the curves monotone or filled, and the allocator's decisions).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "Qwen/Qwen2-VL-2B-Instruct"
GRID_FLAGS = [
    "--patches", "1024,4096,9216,18432",
    "--batches", "0,1,16,64,256",
    "--contexts", "1024,4096",
    "--prefill-tokens", "0,512,2048,8192",
    "--encoder-sm-stride", "1",
    "--lm-sm-stride", "2",
    "--min-iters", "2",
    "--max-iters", "6",
]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "sm-curves-2b"))
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--budget-s", type=float, default=190.0, help="spaceserve profile's --time-budget-s")
    parser.add_argument("--summarize", metavar="DIR", help="only rebuild DIR/summary.md")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(Path(args.summarize)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "spaceserve.cli", "profile", args.model, "--load-format", "dummy", "--dtype", "bfloat16",
        *GRID_FLAGS, "--time-budget-s", str(args.budget_s),
        "--out", str(out / "sm_curves.json"), "--plots", str(out / "plots"),
    ]  # fmt: skip
    begin = time.monotonic()
    with open(out / "profile.log", "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        try:
            done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=args.budget_s + 60)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = 124
    print(f"spaceserve profile exited {code} after {time.monotonic() - begin:.0f} s (log: {out / 'profile.log'})")
    if not (out / "sm_curves.json").exists():
        print((out / "profile.log").read_text()[-4000:])
        return code or 1
    print(summarize(out))
    return code


def summarize(directory: Path) -> str:
    import numpy as np

    from spaceserve.sched.resource_curves import CurvesFile, ResourceCurves

    entries = CurvesFile.read(directory / "sm_curves.json").entries
    lines = []
    for name, entry in entries.items():
        curves = ResourceCurves.from_entry(entry)
        measured, ceilings = entry["measured"], entry.get("ceilings", {})
        lines += [f"# SM curves: {name}", "", f"- command: `{measured.get('command')}`",
                  f"- commit {measured.get('commit')} (dirty: {measured.get('dirty')}); "
                  f"versions {measured.get('versions')}",
                  f"- {entry['placement_note']}; {len(curves.splits)} splits; measured in {measured['seconds']} s "
                  f"({measured.get('total_seconds')} s with the engine build); complete: {measured['complete']}, "
                  f"{measured['skipped_points']} points skipped past the budget; "
                  f"errors: {measured['errors'] or 'none'}",
                  f"- sides that failed the GEMM probe (left out): {measured.get('sm_probe_failures') or 'none'}",
                  f"- decode steps replayed CUDA graphs: {measured.get('decode_graphs')} "
                  f"(on {measured.get('graph_streams')} streams); vision graphs on "
                  f"{measured.get('vision_graph_streams')} streams, encoder batches graphed "
                  f"{measured.get('encoder_graphed_batches')} / eager {measured.get('encoder_eager_batches')}",
                  f"- monotone envelope: encoder {curves.encoder.num_raised} raised / {curves.encoder.num_filled} "
                  f"filled of {curves.encoder.raw_ms.size}; LM step {curves.lm_step.num_raised} raised / "
                  f"{curves.lm_step.num_filled} filled of {curves.lm_step.raw_ms.size}"]
        if ceilings:
            lines.append(f"- ceilings in the same run: copy {ceilings['copy_bandwidth']['best'] / 1e12:.2f} TB/s, "
                         f"matmul {ceilings['matmul']['best']:.0f} TFLOP/s")
        lines += ["", "Encoder batch (ms, median) against SMs:", ""]
        sms, patches = curves.encoder.grid
        lines.append("| SMs | " + " | ".join(f"{int(p)} patches" for p in patches) + " |")
        lines.append("|---" * (len(patches) + 1) + "|")
        for i, s in enumerate(sms):
            lines.append(f"| {int(s)} | " + " | ".join(_ms(v) for v in curves.encoder.raw_ms[i]) + " |")
        lm = curves.lm_step
        sms, batches, contexts, prefill = lm.grid
        k = len(contexts) - 1
        lines += ["", f"LM step (ms, median) at context {int(contexts[k])}: decodes + prefill chunk:", ""]
        cols = [(bi, pi) for bi, b in enumerate(batches) for pi, p in enumerate(prefill) if b or p]
        lines.append("| SMs | " + " | ".join(f"b{int(batches[b])}+p{int(prefill[p])}" for b, p in cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for i, s in enumerate(sms):
            lines.append(f"| {int(s)} | " + " | ".join(_ms(lm.raw_ms[i, b, k, p]) for b, p in cols) + " |")
        lines += ["", "Allocator decisions on these curves (TPOT SLO 25 ms, TTFT SLO 2 s; 896x896 images = 4096 "
                  "patches, 1100 prefill tokens each):", ""] + _decisions(curves, np)
        lines.append("")
    text = "\n".join(lines) + "\n"
    (directory / "summary.md").write_text(text)
    return text


def _decisions(curves, np) -> list[str]:
    from spaceserve.sched.allocation_types import AllocatorConfig, AllocatorState, EncoderItem, PendingRequest
    from spaceserve.sched.allocator import SMAllocator

    allocator = SMAllocator(curves, AllocatorConfig(slo_tpot_ms=25, slo_ttft_ms=2000))
    now = 100.0

    def state(images: int, decodes: int, context: int) -> AllocatorState:
        items = tuple(EncoderItem((f"r{i}",), 4096, 1024) for i in range(images))
        pending = tuple(PendingRequest(f"r{i}", now - 0.01 * i, 1100) for i in range(max(images, 1 if decodes else 0)))
        return AllocatorState(now, items, pending, (context,) * decodes)

    rows = ["| queued images | decodes x context | placement | encoder SMs | LM SMs | prefill budget | "
            "predicted LM step ms | predicted encoder batch ms | predicted mean TTFT ms | decide() ms |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for images, decodes, context in [(1, 0, 0), (1, 4, 1024), (1, 64, 2048), (8, 64, 2048), (40, 64, 2048),
                                     (8, 256, 4096), (0, 128, 2048)]:
        s = state(images, decodes, context)
        begin = time.perf_counter()
        d = allocator.decide(s)
        took = (time.perf_counter() - begin) * 1e3
        rows.append(f"| {images} | {decodes} x {context} | {d.placement.value} | {d.encoder_sms} | {d.lm_sms} | "
                    f"{d.prefill_tokens} | {_ms(d.predicted_lm_step_ms)} | {_ms(d.predicted_encoder_batch_ms)} | "
                    f"{_ms(d.predicted_mean_ttft_ms)} | {took:.2f} |")
    return rows


def _ms(value) -> str:
    if value is None or value != value:
        return "-"
    # the forecast gives a prefill no chunk fits (every split's decode step already past the SLO) a paused rate
    return "paused (no chunk fits)" if float(value) > 1e9 else f"{float(value):.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
