"""Which sides of which SM splits can run the model's GEMMs. On an H200 (driver 580, CUDA 13.0, torch 2.11) a cuBLAS
GEMM issued on the 12-SM remainder of a 120-SM group failed with CUBLAS_STATUS_EXECUTION_FAILED, while the splits the
engine uses by default ran: a split is only worth measuring or choosing if both sides run the kernels on it.

Each side is probed in a process of its own (a failed launch may leave the CUDA context unusable, and one context's
failure must not be blamed on the next side), all at once: on the H200 the profile's 32 sides took 19.6 s (16 CPU
cores, each child importing torch); the engine probes its splits once per process at start-up (6 sides by default,
not timed on their own).

    python3 -m spaceserve.runtime.sm_probe --encoder-sms 8,16,120 --shapes 256x1536x1536,9216x1280x5120

prints one JSON object per side: {"encoder_sms": N, "side": "encoder"|"lm", "sms": S, "ok": bool, "error": str}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass

from spaceserve.child_pythonpath import child_pythonpath

logger = logging.getLogger(__name__)

SIDES = ("encoder", "lm")


@dataclass(frozen=True)
class SideProbe:
    encoder_sms: int
    side: str
    sms: int
    ok: bool
    error: str = ""


def model_gemm_shapes(config) -> tuple[tuple[int, int, int], ...]:
    """(M, K, N) of the LM's and the vision tower's largest projections at a decode, a prefill and an encoder batch."""
    text = config.model_config.text
    vision = config.model_config.vision
    shapes = []
    for m in (1, 64, 256, 2048):
        shapes += [(m, text.hidden_size, text.hidden_size), (m, text.hidden_size, text.intermediate_size)]
    for m in (1024, 9216):
        shapes += [(m, vision.hidden_size, vision.hidden_size * 3), (m, vision.hidden_size, vision.intermediate_size)]
    return tuple(shapes)


def probe_side(device_index: int, encoder_sms: int, side: str, shapes: tuple[tuple[int, int, int], ...]) -> SideProbe:
    """Run each GEMM on one side of the split (in this process; its CUDA context may be unusable afterwards)."""
    import torch
    import torch.nn.functional as F

    from spaceserve.runtime.sm_partition import get_partition_manager

    device = torch.device("cuda", device_index)
    partition = get_partition_manager(device).partition(encoder_sms)
    stream, sms = ((partition.encoder_stream, partition.encoder_sms) if side == "encoder"
                   else (partition.lm_stream, partition.lm_sms))
    generator = torch.Generator(device=device).manual_seed(0)
    try:
        with torch.cuda.stream(stream):
            for m, k, n in shapes:
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=generator)
                w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=generator)
                F.linear(x, w)
        stream.synchronize()
    except RuntimeError as exc:
        return SideProbe(partition.encoder_sms, side, sms, False, str(exc).splitlines()[0][:300])
    return SideProbe(partition.encoder_sms, side, sms, True)


def probe_splits(encoder_counts: list[int], shapes: tuple[tuple[int, int, int], ...], *, device_index: int = 0,
                 timeout_s: float = 120.0) -> dict[tuple[int, str], SideProbe]:
    """Both sides of every split, each in a child process, all at once; keyed by (encoder SMs asked for, side). A
    child that dies or hangs counts as a failed side."""
    shape_text = ",".join(f"{m}x{k}x{n}" for m, k, n in shapes)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": child_pythonpath(os.environ.get("PYTHONPATH"))}
    children = {}
    for count in encoder_counts:
        for side in SIDES:
            command = [sys.executable, "-m", "spaceserve.runtime.sm_probe", "--device", str(device_index),
                       "--encoder-sms", str(count), "--side", side, "--shapes", shape_text]
            children[(count, side)] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                       text=True, env=env)
    results: dict[tuple[int, str], SideProbe] = {}
    for (count, side), child in children.items():
        try:
            out, err = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
            results[(count, side)] = SideProbe(count, side, 0, False, f"probe timed out after {timeout_s:.0f} s")
            continue
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if child.returncode == 0 and lines:
            results[(count, side)] = SideProbe(**json.loads(lines[-1]))
        else:
            tail = (err.strip().splitlines() or ["no output"])[-1][:300]
            results[(count, side)] = SideProbe(count, side, 0, False, f"probe exited {child.returncode}: {tail}")
    for probe in results.values():
        if not probe.ok:
            logger.warning("SM probe: %s side of the %d-SM split (%d SMs) cannot run the model's GEMMs: %s",
                           probe.side, probe.encoder_sms, probe.sms, probe.error)
    return results


_usable_cache: dict[tuple, tuple[tuple[int, ...], tuple[SideProbe, ...]]] = {}


def usable_encoder_groups(device_index: int, counts: list[int], shapes: tuple[tuple[int, int, int], ...]
                          ) -> tuple[tuple[int, ...], tuple[SideProbe, ...]]:
    """The encoder group sizes of `counts` whose both sides ran every GEMM, and the failed probes; probed once per
    process for the same arguments."""
    key = (device_index, tuple(counts), shapes)
    if key not in _usable_cache:
        probes = probe_splits(list(counts), shapes, device_index=device_index)
        bad = {count for (count, _), probe in probes.items() if not probe.ok}
        _usable_cache[key] = (tuple(c for c in counts if c not in bad), tuple(p for p in probes.values() if not p.ok))
    return _usable_cache[key]


def _parse_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    shapes = []
    for item in text.split(","):
        m, k, n = (int(v) for v in item.lower().split("x"))
        shapes.append((m, k, n))
    return tuple(shapes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--encoder-sms", required=True, help="comma list of encoder group sizes")
    parser.add_argument("--side", choices=SIDES, help="probe this side here (default: every side, one child each)")
    parser.add_argument("--shapes", required=True, help="comma list of MxKxN GEMMs")
    args = parser.parse_args()
    shapes = _parse_shapes(args.shapes)
    counts = [int(c) for c in args.encoder_sms.split(",") if c]
    if args.side:
        (count,) = counts
        print(json.dumps(probe_side(args.device, count, args.side, shapes).__dict__), flush=True)
        return 0
    for probe in probe_splits(counts, shapes, device_index=args.device).values():
        print(json.dumps(probe.__dict__), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
