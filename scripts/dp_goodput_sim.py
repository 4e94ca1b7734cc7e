"""Predict goodput against the number of data-parallel replicas and the routing policy, from our measured
per-replica figures, with the router spaceserve runs (engine/data_parallel/router.py) making the decisions.

Each replica is a discrete-event model of one engine in `time` mode (vLLM v1's step: one encoder batch of up to
16384 tokens, then one LM step of the running decodes plus up to 8192 - decodes prefill tokens), on one H200:

- decode step: docs/PERFORMANCE.md's measured step time at batch 1/16/64/256 (context 1024), interpolated;
- prefill: the measured 7B rate (8192 tokens in 210.4 ms at 572 TFLOP/s), scaled to 2B by LM parameters;
- vision tower (the same 675M ViT in 2B and 7B): cost = a x patches + b x sum(patches per image ^ 2), fitted to the
  measured 1 x 1344^2 (89.6 ms) and 8 x 448^2 (43.3 ms);
- host time: the measured LM host ms per step with images beyond text-only's (multiplex-2b-h200 summary), added to
  every step that prefills;
- an LRU encoder cache of 16384 embedding rows per replica (the default), so a repeated image skips the encoder only
  on a replica that still holds it. KV capacity is not limiting at these loads on an H200 and is not modelled.

Workloads: image-mix as benchmarked (one image per request, 448/896/1344 squares, 64 text tokens, 128 output tokens,
Poisson arrivals) with every image unique; `shared-images`: the image drawn from a pool of popular ones (Zipf 1.1)
with probability --repeat; `viral-image`: one 896^2 image in a share --viral of all requests, the rest unique. Goodput: completed requests per second with TTFT <= 2 s and TPOT <= 50 ms.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spaceserve.engine.data_parallel.router import ImageRef, RouteRequest, Router, RouterConfig  # noqa: E402

DECODE_MS = {  # batch -> step ms at context 1024 (docs/PERFORMANCE.md, decode step table)
    "2B": ((1, 2.30), (16, 2.44), (64, 3.08), (256, 6.01)),
    "7B": ((1, 5.07), (16, 5.47), (64, 6.53), (256, 12.69)),
}
PREFILL_US_PER_TOKEN = {"7B": 210.4e3 / 8192, "2B": 210.4e3 / 8192 * 1.54 / 7.07}  # LM parameters, billions
HOST_MS_WITH_IMAGES = 2.63 - 0.89  # time mode at 10 req/s against text-only (multiplex-2b-h200/summary.md)
MEASURED_TIME_MODE = {  # rate -> (goodput, TTFT p50 ms, TPOT mean ms), docs/PERFORMANCE.md
    "2B": {4: (4.01, 59, 3.6), 10: (9.04, 93, 5.6), 16: (15.55, 244, 20.5), 24: (0.00, 2366, 63.8)},
    "7B": {4: (3.99, 89, 7.9), 10: (8.88, 179, 19.4), 16: (0.00, 1439, 98.5), 24: (0.00, 6011, 95.8)},
}
IMAGE_SIDES = (448, 896, 1344)
TEXT_TOKENS, OUTPUT_TOKENS = 64, 128
ENCODER_BUDGET, ENCODER_CACHE, STEP_TOKENS, MAX_SEQS = 16384, 16384, 8192, 256
SLO_TTFT_S, SLO_TPOT_S = 2.0, 0.050


def _vision_coefficients() -> tuple[float, float]:
    # 9216 a + 9216^2 b = 89.6 ms; 8 * 1024 a + 8 * 1024^2 b = 43.3 ms
    matrix = np.array([[9216.0, 9216.0**2], [8192.0, 8 * 1024.0**2]])
    a, b = np.linalg.solve(matrix, np.array([89.6, 43.3]))
    return float(a), float(b)


VISION_A, VISION_B = _vision_coefficients()


def vision_ms(patches: list[int]) -> float:
    return VISION_A * sum(patches) + VISION_B * sum(p * p for p in patches)


def decode_ms(model: str, batch: int) -> float:
    if batch == 0:
        return 0.0
    points = DECODE_MS[model]
    return float(np.interp(batch, [p[0] for p in points], [p[1] for p in points]))


@dataclass
class SimRequest:
    request_id: str
    arrival: float
    image: str
    side: int
    image_tokens: int
    prompt_tokens: int
    to_prefill: int
    generated: int = 0
    first_token: float | None = None
    finished: float | None = None
    encoded_here: bool = False


@dataclass
class Replica:
    index: int
    cache: OrderedDict[str, int] = field(default_factory=OrderedDict)
    cache_tokens: int = 0
    encoder_queue: deque = field(default_factory=deque)
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    busy_until: float | None = None
    encoded: int = 0
    cache_hits: int = 0

    def has_work(self) -> bool:
        return bool(self.encoder_queue or self.waiting or self.running)

    def admit(self, request: SimRequest) -> None:
        if request.image in self.cache:
            self.cache.move_to_end(request.image)
            self.cache_hits += 1
            self.waiting.append(request)
        else:
            self.encoder_queue.append(request)

    def hold(self, image: str, tokens: int) -> None:
        self.cache[image] = tokens
        self.cache_tokens += tokens
        while self.cache_tokens > ENCODER_CACHE and len(self.cache) > 1:
            _, evicted = self.cache.popitem(last=False)
            self.cache_tokens -= evicted


def step(model: str, replica: Replica) -> tuple[float, list[SimRequest], list[SimRequest]]:
    """One engine step: (duration s, requests whose prefill ended this step, requests that produced a token)."""
    ms = 0.0
    if replica.encoder_queue:
        batch, tokens, seen = [], 0, set()
        while replica.encoder_queue and (not batch or tokens + replica.encoder_queue[0].image_tokens <= ENCODER_BUDGET):
            request = replica.encoder_queue.popleft()
            if request.image in replica.cache or request.image in seen:
                replica.waiting.append(request)  # encoded meanwhile (or in this batch)
                continue
            batch.append(request)
            seen.add(request.image)
            tokens += request.image_tokens
        ms += vision_ms([(r.side // 14) ** 2 for r in batch])
        for request in batch:
            replica.hold(request.image, request.image_tokens)
            replica.encoded += 1
            replica.waiting.append(request)
    decodes = [r for r in replica.running if r.to_prefill == 0]
    budget = STEP_TOKENS - len(decodes)
    prefilled, prefill_tokens = [], 0
    for request in list(replica.waiting):
        if budget <= 0 or len(replica.running) >= MAX_SEQS:
            break
        take = min(request.to_prefill, budget)
        request.to_prefill -= take
        budget -= take
        prefill_tokens += take
        if request.to_prefill == 0:
            replica.waiting.remove(request)
            replica.running.append(request)
            prefilled.append(request)
    ms += decode_ms(model, len(decodes)) + prefill_tokens * PREFILL_US_PER_TOKEN[model] / 1e3
    if prefill_tokens:
        ms += HOST_MS_WITH_IMAGES
    return ms / 1e3, prefilled, decodes


def simulate(model: str, replicas: int, policy: str, rate: float, num_requests: int, repeat: float, pool: int,
             seed: int, viral: float = 0.0) -> dict:
    rng = np.random.default_rng(seed)
    if policy == "affinity_unbounded":  # for comparison: affinity with no load bound
        config = RouterConfig("cache_aware", balance_abs_tokens=10**12, balance_rel=1e6, image_capacity_tokens=ENCODER_CACHE)
    else:
        config = RouterConfig(policy=policy, image_capacity_tokens=ENCODER_CACHE)
    router = Router(replicas, config)
    fleet = [Replica(index) for index in range(replicas)]
    popularity = 1.0 / np.arange(1, pool + 1) ** 1.1
    popularity /= popularity.sum()
    pool_sides = rng.choice(IMAGE_SIDES, size=pool)
    events: list = []
    arrival = 0.0
    requests = []
    for index in range(num_requests):
        arrival += rng.exponential(1.0 / rate)
        if viral and rng.random() < viral:
            image, side = "viral", 896
        elif repeat and rng.random() < repeat:
            k = int(rng.choice(pool, p=popularity))
            image, side = f"pool-{k}", int(pool_sides[k])
        else:
            image, side = f"unique-{index}", int(rng.choice(IMAGE_SIDES))
        image_tokens = (side // 28) ** 2
        prompt = image_tokens + TEXT_TOKENS
        requests.append(SimRequest(f"r{index}", arrival, image, side, image_tokens, prompt, prompt))
        heapq.heappush(events, (arrival, 0, index, -1))
    where: dict[str, int] = {}
    while events:
        now, kind, index, replica_index = heapq.heappop(events)
        if kind == 0:  # arrival
            request = requests[index]
            decision = router.route(RouteRequest(request.request_id, request.prompt_tokens, OUTPUT_TOKENS,
                                                 (ImageRef(request.image, 0, request.image_tokens),)))
            replica = fleet[decision.replica]
            where[request.request_id] = decision.replica
            replica.admit(request)
            if replica.busy_until is None:
                _start_step(model, replica, now, events)
            continue
        replica = fleet[replica_index]  # a step ended: its outputs
        prefilled, decoded = replica.pending
        for request in prefilled:
            request.first_token = now
            request.generated = 1
            router.on_output(request.request_id, 1)
        for request in decoded:
            request.generated += 1
            router.on_output(request.request_id, 1)
        for request in prefilled + decoded:
            if request.generated >= OUTPUT_TOKENS:
                request.finished = now
                replica.running.remove(request)
                router.finish(request.request_id)
        replica.busy_until = None
        if replica.has_work():
            _start_step(model, replica, now, events)
    duration = max(r.finished for r in requests) - requests[0].arrival
    good = 0
    ttfts, tpots = [], []
    for request in requests:
        ttft = request.first_token - request.arrival
        tpot = (request.finished - request.first_token) / (OUTPUT_TOKENS - 1)
        ttfts.append(ttft)
        tpots.append(tpot)
        good += ttft <= SLO_TTFT_S and tpot <= SLO_TPOT_S
    encoded = sum(replica.encoded for replica in fleet)
    return {
        "model": model, "replicas": replicas, "policy": policy, "rate": rate, "repeat": repeat,
        "goodput": good / duration, "slo_fraction": good / num_requests,
        "ttft_p50_ms": 1e3 * float(np.median(ttfts)), "tpot_mean_ms": 1e3 * float(np.mean(tpots)),
        "images_encoded": encoded, "distinct_images": len({r.image for r in requests}),
        "decisions": dict(router.decisions),
    }


def _start_step(model: str, replica: Replica, now: float, events: list) -> None:
    duration, prefilled, decoded = step(model, replica)
    replica.pending = (prefilled, decoded)
    replica.busy_until = now + duration
    heapq.heappush(events, (replica.busy_until, 1, 0, replica.index))


def capacity(rows: list[dict]) -> float:
    """The highest simulated rate at which >= 90% of the requests met the SLO (and every lower rate did)."""
    best = 0.0
    for row in sorted(rows, key=lambda r: r["rate"]):
        if row["slo_fraction"] < 0.9:
            break
        best = row["rate"]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="2B", choices=sorted(DECODE_MS))
    parser.add_argument("--replicas", default="1,2,4,8")
    parser.add_argument("--policies", default="round_robin,least_loaded,cache_aware,affinity_unbounded",
                        help="the router's policies, and affinity_unbounded (cache_aware without its load bound)")
    parser.add_argument("--per-replica-rates", default="4,8,10,12,14,16,18,20",
                        help="offered load per replica (req/s); the total is this x replicas")
    parser.add_argument("--requests-per-replica", type=int, default=300)
    parser.add_argument("--repeat", type=float, default=0.6, help="shared-images: chance a request's image is popular")
    parser.add_argument("--pool", type=int, default=400, help="shared-images: popular images")
    parser.add_argument("--viral", type=float, default=0.6, help="viral-image: share of requests with one same image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rates = [float(r) for r in args.per_replica_rates.split(",")]
    rows = []
    validation = []
    for rate, measured in MEASURED_TIME_MODE[args.model].items():
        row = simulate(args.model, 1, "least_loaded", rate, 300, 0.0, args.pool, args.seed)
        validation.append((rate, measured, row))
    workloads = (("image-mix", 0.0, 0.0), ("shared-images", args.repeat, 0.0), ("viral-image", 0.0, args.viral))
    for workload, repeat, viral in workloads:
        for replicas in (int(n) for n in args.replicas.split(",")):
            for policy in args.policies.split(","):
                for rate in rates:
                    row = simulate(args.model, replicas, policy, rate * replicas,
                                   args.requests_per_replica * replicas, repeat, args.pool, args.seed, viral)
                    row["workload"] = workload
                    rows.append(row)
    table = _markdown(args, rows, validation)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"sim-{args.model}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (out / f"sim-{args.model}.md").write_text(table)


def _markdown(args, rows: list[dict], validation) -> str:
    lines = [
        f"Qwen2-VL-{args.model}, time mode, one H200 per replica (simulated from measured figures; "
        f"vision a={VISION_A * 1e3:.2f} us/patch, b={VISION_B * 1e6:.3f} ns/patch^2; prefill "
        f"{PREFILL_US_PER_TOKEN[args.model]:.2f} us/token).",
        "",
        "One replica against the measured end-to-end runs (image-mix, 64-token prompts, 128 output tokens):",
        "",
        "| rate | measured goodput | simulated | measured TTFT p50 ms | simulated | measured TPOT mean ms | simulated |",
        "|---|---|---|---|---|---|---|",
    ]
    for rate, (goodput, ttft, tpot), row in validation:
        lines.append(f"| {rate} | {goodput:.2f} | {row['goodput']:.2f} | {ttft} | {row['ttft_p50_ms']:.0f} | {tpot} | "
                     f"{row['tpot_mean_ms']:.1f} |")
    policies = args.policies.split(",")
    lines += [
        "",
        "Capacity: the highest offered rate (req/s, total) at which >= 90% of requests met TTFT <= 2 s and TPOT <= 50 ms;"
        " in brackets, images encoded per distinct image at that rate (1.00 = each once in the cluster); >=: the"
        " highest rate simulated.",
        "",
        "| workload | replicas | " + " | ".join(policies) + " |",
        "|---|---|" + "---|" * len(policies),
    ]
    order = ["image-mix", "shared-images", "viral-image"]
    keys = sorted({(row["workload"], row["replicas"]) for row in rows}, key=lambda k: (order.index(k[0]), k[1]))
    for workload, replicas in keys:
        cells = []
        for policy in policies:
            series = [r for r in rows if (r["workload"], r["replicas"], r["policy"]) == (workload, replicas, policy)]
            best = capacity(series)
            at = next((r for r in series if r["rate"] == best), None)
            ratio = f" ({at['images_encoded'] / at['distinct_images']:.2f})" if at else ""
            at_least = ">= " if at is not None and best == max(r["rate"] for r in series) else ""
            cells.append(f"{at_least}{best:g}{ratio}")
        lines.append(f"| {workload} | {replicas} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
