"""`--slo` given more than once: one row per (mode, rate, SLO), all scored on the same requests."""

import random

from spaceserve.bench.metrics import SLO
from spaceserve.bench.report import format_table, read_jsonl, row_fields
from spaceserve.cli import main
from tests.bench.test_bench_cli import TINY_RUN

SLO_INDEPENDENT = ("completed", "failed", "duration_s", "mean_ttft_ms", "p99_tpot_ms", "p50_e2el_ms", "engine_counters")


def test_each_slo_gets_its_row_from_the_same_requests(tmp_path):
    out = tmp_path / "results.jsonl"
    seed = str(random.randrange(1 << 20))
    # a TTFT limit no CPU run meets, and one every run meets
    code = main(["bench", *TINY_RUN, "--seed", seed, "--request-rate", "inf", "--slo", "ttft=0.0001",
                 "--slo", "ttft=600,tpot=60", "--out", str(out)])
    assert code == 0
    strict, loose = read_jsonl(out)
    assert list(strict) == row_fields()
    assert strict["slo"] == SLO(ttft=0.0001).as_dict() and loose["slo"] == SLO(ttft=600, tpot=60).as_dict()
    for name in SLO_INDEPENDENT:
        assert strict[name] == loose[name], name
    assert strict["slo_attainment"] == 0.0 and strict["goodput"] == 0.0
    assert loose["slo_attainment"] == 1.0 and loose["goodput"] == loose["request_throughput"]
    table = format_table([strict, loose])
    assert "ttft<=0.1ms" in table and "ttft<=600s,tpot<=60s" in table


def test_slo_labels_and_round_trip():
    slo = SLO.parse("ttft=2,tpot=0.025")
    assert slo.label() == "ttft<=2s,tpot<=25ms"
    assert SLO.from_dict(slo.as_dict()) == slo
