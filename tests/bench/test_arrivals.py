import math
import random

import numpy as np
import pytest

from spaceserve.bench.arrivals import arrival_offsets, parse_rates


def test_seeded_schedules_repeat_and_seeds_differ():
    seed = random.randrange(1 << 30)
    first = arrival_offsets(200, 5.0, 1.0, seed)
    assert first == arrival_offsets(200, 5.0, 1.0, seed)
    assert first != arrival_offsets(200, 5.0, 1.0, seed + 1)
    assert first[0] == 0.0 and all(b >= a for a, b in zip(first, first[1:]))


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 3.0])
def test_mean_rate_matches_over_many_requests(burstiness):
    rate = random.uniform(1.0, 50.0)
    offsets = arrival_offsets(40_000, rate, burstiness, random.randrange(1 << 30))
    measured = (len(offsets) - 1) / offsets[-1]
    assert measured == pytest.approx(rate, rel=0.05)


def test_burstiness_sets_the_variance_of_the_gaps():
    rate, seed = 10.0, random.randrange(1 << 30)
    cv2 = {}
    for shape in (0.25, 1.0, 4.0):
        gaps = np.diff(arrival_offsets(40_000, rate, shape, seed))
        cv2[shape] = gaps.var() / gaps.mean() ** 2
        assert cv2[shape] == pytest.approx(1.0 / shape, rel=0.15)  # gamma: squared coefficient of variation 1/k
    assert cv2[0.25] > cv2[1.0] > cv2[4.0]


def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets(17, math.inf, 1.0, 3) == [0.0] * 17


def test_bad_arguments_are_refused():
    for args in ((5, 0.0), (5, -1.0), (5, math.nan), (-1, 1.0)):
        with pytest.raises(ValueError):
            arrival_offsets(*args)
    with pytest.raises(ValueError):
        arrival_offsets(5, 1.0, burstiness=0.0)
    assert parse_rates("1,2.5,inf") == [1.0, 2.5, math.inf]
    for bad in ("1,x", "0", "-2"):
        with pytest.raises(ValueError):
            parse_rates(bad)
