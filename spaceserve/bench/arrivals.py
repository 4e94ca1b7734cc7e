"""Request arrival schedules: Poisson, gamma-distributed (bursty) or all at once, seeded."""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(num_requests: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds from the start of the run at which each request is sent, non-decreasing.

    Inter-arrival gaps are gamma-distributed with shape `burstiness` and mean 1/rate: shape 1 is a Poisson process,
    below 1 burstier, above 1 more regular. `rate = inf` sends everything at once.
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a positive number, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num_requests)
    # the first request goes out at once; the schedule is the gaps after it
    gaps[:1] = 0.0
    return np.cumsum(gaps).tolist()


def parse_rates(text: str) -> list[float]:
    """`"1,2,4,inf"` -> [1.0, 2.0, 4.0, inf]."""
    rates = []
    for item in text.split(","):
        try:
            rate = float(item)
        except ValueError:
            raise ValueError(f"expected request rates like 1,2.5,inf, got {text!r}") from None
        if not rate > 0:
            raise ValueError(f"request rates must be > 0 (or inf), got {item!r}")
        rates.append(rate)
    return rates
