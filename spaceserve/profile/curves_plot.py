"""One PNG per measured curve of a curves entry: the encoder batch against SMs (a line per batch size), the
decode-only LM step against SMs (a panel per context, a line per decode batch) and the mixed step (a panel per
decode batch, a line per prefill chunk). Measured points are marked; the lines are the monotone envelope the
allocator interpolates."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from spaceserve.sched.resource_curves import ResourceCurves


def plot_curves(entry: dict[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = ResourceCurves.from_entry(entry)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = curves.key
    title = f"{key.model} ({key.dtype}) on {key.device}"
    written = []

    enc = curves.encoder
    sms, patches = enc.grid
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for j, count in enumerate(patches):
        axis.plot(sms, enc.envelope_ms[:, j], "-", color=f"C{j}", label=f"{int(count)} patches")
        axis.plot(sms, enc.raw_ms[:, j], "o", color=f"C{j}", markersize=3)
    _finish(axis, "encoder SMs", "encoder batch (ms)", log=True)
    figure.suptitle(f"Encoder batch latency: {title}", fontsize=9)
    written.append(_save(figure, out / "encoder.png"))

    lm = curves.lm_step
    sms, batches, contexts, prefill = lm.grid
    decode_batches = [i for i, b in enumerate(batches) if b > 0]
    zero = int(np.argmin(prefill)) if prefill[0] == 0 else None
    if zero is not None and decode_batches:
        figure, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4.2), squeeze=False)
        for axis, (k, context) in zip(axes[0], enumerate(contexts)):
            for n, i in enumerate(decode_batches):
                axis.plot(sms, lm.envelope_ms[:, i, k, zero], "-", color=f"C{n}", label=f"batch {int(batches[i])}")
                axis.plot(sms, lm.raw_ms[:, i, k, zero], "o", color=f"C{n}", markersize=3)
            axis.set_title(f"context {int(context)}", fontsize=9)
            _finish(axis, "LM SMs", "decode step (ms)")
        figure.suptitle(f"Decode-only LM step: {title}", fontsize=9)
        written.append(_save(figure, out / "lm_decode.png"))

    chunks = [k for k, p in enumerate(prefill) if p > 0]
    if chunks:
        k_ctx = len(contexts) - 1
        figure, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 4.2), squeeze=False)
        for axis, (i, batch) in zip(axes[0], enumerate(batches)):
            for n, k in enumerate(chunks):
                axis.plot(sms, lm.envelope_ms[:, i, k_ctx, k], "-", color=f"C{n}", label=f"prefill {int(prefill[k])}")
                axis.plot(sms, lm.raw_ms[:, i, k_ctx, k], "o", color=f"C{n}", markersize=3)
            axis.set_title(f"{int(batch)} decodes at context {int(contexts[k_ctx])}" if batch else "prefill only",
                           fontsize=9)
            _finish(axis, "LM SMs", "step (ms)", log=True)
        figure.suptitle(f"Mixed LM step (decodes + one prefill chunk): {title}", fontsize=9)
        written.append(_save(figure, out / "lm_mixed.png"))
    return written


def _finish(axis, xlabel: str, ylabel: str, log: bool = False) -> None:
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if log:
        axis.set_yscale("log")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize="x-small")


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
