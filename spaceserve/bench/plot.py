"""TPOT and TTFT against request rate, one line per execution mode, as a PNG."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from spaceserve.bench.report import rate_from_json

_PANELS = (
    ("TPOT (ms)", (("mean_tpot_ms", "mean", "-"), ("p99_tpot_ms", "p99", "--"))),
    ("TTFT (ms)", (("p50_ttft_ms", "p50", "-"), ("p99_ttft_ms", "p99", "--"))),
)


def plot_rows(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str | None = None) -> None:
    """Successful rows only; with an all-at-once (inf) point the x axis lists rates in order instead of to scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [row for row in rows if row["status"] == "ok" and row["completed"]]
    if not ok:
        raise ValueError("no successful run to plot")
    rates = sorted({rate_from_json(row["request_rate"]) for row in ok})
    to_scale = all(math.isfinite(rate) for rate in rates)

    def x_of(rate: float) -> float:
        return rate if to_scale else float(rates.index(rate))

    lines: dict[str, list[dict[str, Any]]] = {}
    for row in ok:
        lines.setdefault(_line_label(row, rows), []).append(row)

    figure, axes = plt.subplots(1, len(_PANELS), figsize=(6 * len(_PANELS), 4.5))
    for axis, (ylabel, series) in zip(axes, _PANELS):
        for index, (label, members) in enumerate(sorted(lines.items())):
            members = sorted(members, key=lambda r: rate_from_json(r["request_rate"]))
            xs = [x_of(rate_from_json(r["request_rate"])) for r in members]
            colour = f"C{index}"
            for key, statistic, style in series:
                ys = [math.nan if r[key] is None else r[key] for r in members]
                axis.plot(xs, ys, style, marker="o", color=colour, label=f"{label} {statistic}")
        axis.set_xlabel("request rate (req/s)")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        if not to_scale:
            axis.set_xticks(range(len(rates)), [f"{rate:g}" for rate in rates])
        axis.legend(fontsize="small")
    first = ok[0]
    figure.suptitle(title or f"{first['model']} - {first['workload']} - {first['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _line_label(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The mode; the encoder policy too when the rows compare policies."""
    policies = {r["encoder_policy"] for r in rows}
    return f"{row['multiplex']}/{row['encoder_policy']}" if len(policies) > 1 else row["multiplex"]
