"""SLO capacity and issue 13's target checks on synthetic result rows."""

import math

import pytest

from spaceserve.bench.capacity import (
    attainment,
    capacities,
    capacity,
    check_targets,
    geometric_rates,
)
from spaceserve.bench.metrics import SLO

SLO25, SLO50 = SLO(ttft=2.0, tpot=0.025), SLO(ttft=2.0, tpot=0.05)


def row(mode, rate, slo, attained, *, workload="image-mix", failed=0, completed=100, ttft=100.0, tpot=5.0,
        p99_tpot=None, policy="fcfs", status="ok"):
    return {"workload": workload, "multiplex": mode, "encoder_policy": policy, "request_rate": rate,
            "slo": None if slo is None else slo.as_dict(), "status": status, "completed": completed, "failed": failed,
            "slo_attainment": attained, "p50_ttft_ms": ttft, "mean_tpot_ms": tpot,
            "p99_tpot_ms": p99_tpot if p99_tpot is not None else 2 * tpot}


def test_geometric_rates_step_at_most_15_percent_and_cover_the_range():
    rates = geometric_rates(2, 40)
    assert rates[0] == 2 and rates[-1] >= 40
    assert all(1 < b / a <= 1.15 + 1e-9 for a, b in zip(rates, rates[1:]))
    assert geometric_rates(0.1, 0.1) == [0.1]
    with pytest.raises(ValueError):
        geometric_rates(5, 1)


def test_capacity_is_the_last_rate_of_the_passing_run_from_the_bottom():
    cap = capacity([(4, 1.0), (8, 0.95), (12, 0.7), (16, 0.92), (20, 0.2)])
    assert cap.rate == 8 and cap.reached  # 16 passing again above a failure does not count
    assert cap.interpolated == pytest.approx(8 + (0.95 - 0.9) / (0.95 - 0.7) * 4)
    assert capacity([(4, 0.5), (8, 0.1)]).rate == 0
    open_ended = capacity([(4, 0.99), (8, 0.97)])
    assert open_ended.rate == 8 and not open_ended.reached
    assert capacity([(4, 0.99), (8, None)]).rate == 4  # a failed run counts as missing the SLO


def test_attainment_counts_failed_requests_as_misses():
    assert attainment(row("time", 4, SLO50, 1.0, completed=90, failed=10)) == pytest.approx(0.9)
    assert attainment(row("time", 4, None, None)) is None
    assert attainment(row("time", 4, SLO50, 1.0, status="failed")) is None


def test_capacities_group_by_series_and_slo():
    rows = [row("time", r, s, a) for s, table in ((SLO25, [(4, 1.0), (8, 0.8)]), (SLO50, [(4, 1.0), (8, 0.95)]))
            for r, a in table]
    rows += [row("space", r, SLO50, 0.99, policy="twsrft") for r in (4, 8)]
    caps = capacities(rows)
    assert caps[("time/fcfs", "ttft<=2s,tpot<=25ms")].rate == 4
    assert caps[("time/fcfs", "ttft<=2s,tpot<=50ms")].rate == 8
    assert caps[("space/twsrft", "ttft<=2s,tpot<=50ms")].rate == 8


def sweep(space_att25, time_att25, space_att50, time_att50, *, space_ttft=100.0, time_ttft=100.0,
          space_tpot=(3.0, 3.0, 3.0), time_tpot=(5.0, 20.0, 40.0), text_p99=(3.0, 3.0, 3.0)):
    rates = (4, 8, 12)
    rows = []
    for mode, att25, att50, tpots, ttft in (("space", space_att25, space_att50, space_tpot, space_ttft),
                                            ("time", time_att25, time_att50, time_tpot, time_ttft)):
        for rate, a25, a50, tpot in zip(rates, att25, att50, tpots):
            rows.append(row(mode, rate, SLO25, a25, ttft=ttft, tpot=tpot))
            rows.append(row(mode, rate, SLO50, a50, ttft=ttft, tpot=tpot))
    for rate, p99 in zip(rates, text_p99):
        rows.append(row("time", rate, SLO50, 1.0, workload="text-only", p99_tpot=p99, tpot=p99 / 2))
    return rows


def test_every_target_met():
    rows = sweep((1, 1, 0.95), (1, 0.5, 0.1), (1, 1, 1), (1, 1, 0.5), space_tpot=(2.0, 2.0, 2.0),
                 time_tpot=(5.0, 10.0, 40.0), text_p99=(3.5, 3.5, 3.5))
    checks = check_targets(rows)
    assert [c.met for c in checks] == [True, True, True, True, True], [c.line() for c in checks]
    assert checks[0].value == 3.0  # 12 vs 4 req/s
    assert "lower bound" in checks[0].detail  # space still passes at the heaviest rate


def test_every_target_missed_with_the_numbers():
    rows = sweep((1, 0.5, 0.1), (1, 1, 0.2), (1, 0.5, 0.1), (1, 1, 1), space_ttft=300.0, space_tpot=(6.0, 9.0, 8.0),
                 time_tpot=(5.0, 10.0, 40.0), text_p99=(3.0, 3.0, 3.0))
    checks = check_targets(rows)
    assert [c.met for c in checks] == [False, False, False, False, False], [c.line() for c in checks]
    ttft = checks[2]
    assert ttft.value == pytest.approx(3.0) and "300 vs 100 ms" in ttft.detail
    assert checks[3].value == pytest.approx(40 / 8)
    tpot_vs_text = checks[4]
    assert tpot_vs_text.value == pytest.approx(12 / 3) and "4: 4.00" in tpot_vs_text.detail
    assert "**missed**" in tpot_vs_text.line()


def test_targets_without_the_rows_they_need_are_not_checked():
    rows = [row("space", 4, SLO50, 0.1), row("time", 4, SLO50, 0.2)]
    checks = check_targets(rows)
    assert checks[0].met is None and "no space/fcfs or time/fcfs rows" in checks[0].detail
    assert checks[1].met is None and "sweep lighter" in checks[1].detail
    assert checks[-1].met is None and "text-only" in checks[-1].detail
    assert math.isclose(checks[2].value, 1.0)


def test_space_variants_are_series_of_their_own_named_by_their_engine_settings():
    from spaceserve.bench.capacity import series_name

    def with_args(**engine_args):
        r = row("space", 4, SLO25, 1.0)
        r["engine_settings"] = {"engine_args": {"slo_tpot_ms": 50.0, **engine_args}}
        return series_name(r)

    assert with_args() == "space/fcfs"
    assert with_args(encoder_process=True) == "space-process/fcfs"
    assert with_args(enable_prefill_split=True) == "space-prefill-split/fcfs"
    assert with_args(slo_tpot_ms=25.0) == "space@tpot25/fcfs"
    assert with_args(enable_prefill_split=True, slo_tpot_ms=22.5) == "space-prefill-split@tpot22.5/fcfs"
    assert series_name(row("time", 4, SLO25, 1.0)) == "time/fcfs"  # only space's variants are told apart
