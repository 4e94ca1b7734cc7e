"""SLO capacity from benchmark rows: the highest request rate at which at least 90% of the requests meet an SLO,
per series (execution mode and encoder policy, or the text-only baseline), and issue 13's targets on it.

Attainment at a rate counts every request sent (failed ones miss the SLO): met / (completed + failed). Capacity is
the highest swept rate such that it and every lighter swept rate attain the threshold (a rate that passes above a
failing one is noise, not capacity); 0 when even the lightest rate fails. `interpolated` places the crossing
linearly between the last passing and the first failing rate, and `reached` is False when the heaviest rate still
passes (the capacity is then only a lower bound).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from spaceserve.bench.metrics import SLO
from spaceserve.config import AllocationConfig

ATTAINMENT_THRESHOLD = 0.9


def geometric_rates(lowest: float, highest: float, step: float = 1.15) -> list[float]:
    """Rates from `lowest` to at least `highest`, each at most `step` times the one before (two decimals)."""
    if not (0 < lowest <= highest) or step <= 1:
        raise ValueError(f"need 0 < lowest <= highest and step > 1, got {lowest}, {highest}, {step}")
    rates = [round(lowest, 2)]
    while rates[-1] < highest:
        rate = math.floor(round(rates[-1] * step * 100, 6)) / 100
        rates.append(rate if rate > rates[-1] else rates[-1] + 0.01)
    return rates


def series_name(row: dict[str, Any]) -> str:
    """text-only, or mode/policy. space's variants are told apart by their engine settings: `--encoder-process` is
    space-process, `--enable-prefill-split` space-prefill-split, and an engine TPOT SLO other than the default is
    a suffix (space@tpot25: the allocator kept decodes within 25 ms)."""
    if row.get("workload") == "text-only":
        return "text-only"
    engine_args = (row.get("engine_settings") or {}).get("engine_args") or {}
    mode = row["multiplex"]
    if mode == "space":
        if engine_args.get("encoder_process"):
            mode = "space-process"
        if engine_args.get("enable_prefill_split"):
            mode += "-prefill-split"
        tpot = engine_args.get("slo_tpot_ms")
        if tpot is not None and float(tpot) != AllocationConfig.slo_tpot_ms:
            mode += f"@tpot{float(tpot):g}"
    return f"{mode}/{row['encoder_policy']}"


def slo_label(row: dict[str, Any]) -> str:
    return SLO.from_dict(row["slo"]).label() if row.get("slo") else "none"


def attainment(row: dict[str, Any]) -> float | None:
    """Share of the requests sent that met the row's SLO (None without an SLO or a successful run)."""
    if row.get("status") != "ok" or row.get("slo_attainment") is None:
        return None
    completed, failed = row["completed"] or 0, row.get("failed") or 0
    sent = completed + failed
    return row["slo_attainment"] * completed / sent if sent else None


@dataclass(frozen=True)
class Capacity:
    rate: float
    """The highest swept rate meeting the threshold with every lighter one (0: none does)."""
    interpolated: float
    reached: bool
    """False when the heaviest swept rate still meets the threshold."""
    rates: tuple[float, ...]
    attainments: tuple[float | None, ...]


def capacity(points: Iterable[tuple[float, float | None]], threshold: float = ATTAINMENT_THRESHOLD) -> Capacity:
    ordered = sorted(points)
    rates = tuple(r for r, _ in ordered)
    values = tuple(a for _, a in ordered)
    passing = 0
    for value in values:
        if value is None or value < threshold:
            break
        passing += 1
    if passing == 0:
        return Capacity(0.0, 0.0, True, rates, values)
    if passing == len(values):
        return Capacity(rates[-1], rates[-1], False, rates, values)
    low, high = rates[passing - 1], rates[passing]
    a_low, a_high = values[passing - 1], values[passing] or 0.0
    share = (a_low - threshold) / (a_low - a_high) if a_low > a_high else 0.0
    return Capacity(low, low + share * (high - low), True, rates, values)


def capacities(rows: Sequence[dict[str, Any]], threshold: float = ATTAINMENT_THRESHOLD
               ) -> dict[tuple[str, str], Capacity]:
    """(series, SLO label) -> capacity, over the rows that carry an SLO."""
    grouped: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
    for row in rows:
        if not row.get("slo") or row.get("request_rate") in (None, "inf"):
            continue
        grouped.setdefault((series_name(row), slo_label(row)), []).append((float(row["request_rate"]),
                                                                           attainment(row)))
    return {key: capacity(points, threshold) for key, points in grouped.items()}


@dataclass(frozen=True)
class TargetCheck:
    name: str
    value: float | None
    target: str
    met: bool | None
    """None: not checkable from these rows (the detail says why)."""
    detail: str

    def line(self) -> str:
        status = {True: "met", False: "**missed**", None: "not checked"}[self.met]
        value = "-" if self.value is None else ("inf" if math.isinf(self.value) else f"{self.value:.2f}")
        return f"- {self.name}: {value} (target {self.target}): {status}. {self.detail}"


def check_targets(rows: Sequence[dict[str, Any]], *, space: str = "space/fcfs", time: str = "time/fcfs",
                  text_only: str = "text-only") -> list[TargetCheck]:
    """Issue 13's targets, from one workload's rows (all modes, the text-only baseline, the sweep's SLOs)."""
    caps = capacities(rows)
    by_series = _latency_rows(rows)
    checks = [
        _capacity_ratio(caps, space, time, 0.025, 1.5),
        _capacity_ratio(caps, space, time, 0.05, 1.0),
    ]
    common = sorted(set(by_series.get(space, {})) & set(by_series.get(time, {})))
    if common:
        low, high = common[0], common[-1]
        ratio = by_series[space][low]["p50_ttft_ms"] / by_series[time][low]["p50_ttft_ms"]
        checks.append(TargetCheck(f"space TTFT p50 / time TTFT p50 at the lightest rate ({low:g})", ratio, "<= 1.2",
                                  ratio <= 1.2, f"{by_series[space][low]['p50_ttft_ms']:.0f} vs "
                                  f"{by_series[time][low]['p50_ttft_ms']:.0f} ms"))
        ratio = by_series[time][high]["mean_tpot_ms"] / by_series[space][high]["mean_tpot_ms"]
        checks.append(TargetCheck(f"time mean TPOT / space mean TPOT at the highest rate ({high:g})", ratio, ">= 10",
                                  ratio >= 10, f"{by_series[time][high]['mean_tpot_ms']:.1f} vs "
                                  f"{by_series[space][high]['mean_tpot_ms']:.1f} ms"))
    else:
        checks.append(TargetCheck("space vs time TTFT p50 and mean TPOT", None, "<= 1.2 / >= 10", None,
                                  f"no rate with both {space} and {time}"))
    space_caps = [c for (series, _), c in caps.items() if series == space]
    limit = max((c.rate for c in space_caps), default=None)
    rates = sorted(r for r in set(by_series.get(space, {})) & set(by_series.get(text_only, {}))
                   if limit is not None and r <= limit)
    if rates:
        ratios = {r: by_series[space][r]["p99_tpot_ms"] / by_series[text_only][r]["p99_tpot_ms"] for r in rates}
        worst = max(ratios, key=ratios.get)
        checks.append(TargetCheck(f"space p99 TPOT / text-only p99 TPOT, worst rate up to space's capacity "
                                  f"({limit:g})", ratios[worst], "<= 1.3 at every rate", ratios[worst] <= 1.3,
                                  "per rate: " + ", ".join(f"{r:g}: {v:.2f}" for r, v in ratios.items())))
    else:
        checks.append(TargetCheck("space p99 TPOT / text-only p99 TPOT", None, "<= 1.3", None,
                                  "no text-only baseline at a rate within space's capacity"))
    return checks


def _capacity_ratio(caps: dict[tuple[str, str], Capacity], space: str, time: str, tpot_s: float,
                    factor: float) -> TargetCheck:
    label = SLO(ttft=2.0, tpot=tpot_s).label()
    name = f"capacity at {label}: space / time"
    if (space, label) not in caps or (time, label) not in caps:
        return TargetCheck(name, None, f">= {factor:g}", None, f"no {space} or {time} rows scored at {label}")
    s, t = caps[(space, label)], caps[(time, label)]
    ratio = math.inf if t.rate == 0 and s.rate > 0 else (s.rate / t.rate if t.rate else math.nan)
    bound = "" if s.reached and t.reached else " (a capacity not reached by the heaviest rate is a lower bound)"
    met = None if math.isnan(ratio) else ratio >= factor
    detail = f"space {s.rate:g} (interpolated {s.interpolated:.2f}) vs time {t.rate:g} ({t.interpolated:.2f}) req/s"
    if math.isnan(ratio):
        detail += "; neither meets the SLO at the lightest swept rate: sweep lighter rates"
    return TargetCheck(name, None if math.isnan(ratio) else ratio, f">= {factor:g}", met, detail + bound)


def _latency_rows(rows: Sequence[dict[str, Any]]) -> dict[str, dict[float, dict[str, Any]]]:
    """series -> rate -> one successful row (latencies do not depend on the SLO)."""
    out: dict[str, dict[float, dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "ok" and row.get("completed") and row.get("request_rate") != "inf":
            out.setdefault(series_name(row), {}).setdefault(float(row["request_rate"]), row)
    return out
