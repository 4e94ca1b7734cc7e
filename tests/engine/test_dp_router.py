"""The data-parallel router: least outstanding work, affinity for the replica holding a request's images or prefix,
bounded so affinity never overloads a replica, load that follows the outputs, and failed replicas left out."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from spaceserve.engine.data_parallel.router import ImageRef, NoReplicaError, RouteRequest, Router, RouterConfig
from spaceserve.kvcache.prefix_hash import hash_block


def _blocks(tokens: list[int], block_size: int = 16) -> tuple[bytes, ...]:
    hashes, parent = [], None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block(parent, tokens[start : start + block_size])
        hashes.append(parent)
    return tuple(hashes)


def _request(rng, request_id: str, images=(), prompt=None, max_new: int | None = None) -> RouteRequest:
    prompt = prompt if prompt is not None else list(rng.integers(0, 1000, int(rng.integers(20, 200))))
    return RouteRequest(
        request_id,
        num_prompt_tokens=len(prompt) + sum(image.num_tokens for image in images),
        max_new_tokens=int(rng.integers(1, 64)) if max_new is None else max_new,
        images=tuple(images),
        block_hashes=_blocks(prompt),
    )


def _image(rng, offset: int = 0) -> ImageRef:
    return ImageRef(f"img-{rng.integers(1 << 62):x}", offset, int(rng.integers(16, 400)))


def test_least_loaded_takes_the_replica_with_the_least_work_after_the_request():
    rng = np.random.default_rng(0)
    router = Router(3, RouterConfig(policy="least_loaded"))
    for index in range(40):
        request = _request(rng, f"r{index}")
        expected = min(
            range(3),
            key=lambda i: (router.replicas[i].outstanding_tokens, router.replicas[i].requests, router.replicas[i].routed, i),
        )
        assert router.route(request).replica == expected
        if rng.random() < 0.4:  # some finish, so the loads differ
            router.finish(f"r{int(rng.integers(0, index + 1))}")
    assert router.decisions == {"least_loaded": 40}


def test_idle_replicas_take_requests_in_turn():
    rng = np.random.default_rng(1)
    router = Router(3)
    replicas = []
    for index in range(6):
        request = _request(rng, f"r{index}", max_new=8, prompt=[int(t) for t in rng.integers(0, 1000, 10)])
        replicas.append(router.route(request).replica)
        router.finish(request.request_id)
    assert replicas == [0, 1, 2, 0, 1, 2]


def test_a_repeated_image_goes_to_the_replica_that_encoded_it():
    rng = np.random.default_rng(2)
    router = Router(4)
    image = _image(rng, offset=3)
    first = router.route(_request(rng, "first", [image]))
    router.finish("first")
    for index in range(3):  # others fill the rest, so least-loaded would go elsewhere
        router.route(_request(rng, f"other{index}", [_image(rng)], max_new=4))
    again = router.route(_request(rng, "again", [image], max_new=4))
    assert again.replica == first.replica and again.reason == "image_affinity"
    assert again.cached_tokens == image.num_tokens
    assert router.decisions["image_affinity"] == 1


def test_a_shared_prefix_goes_to_the_replica_that_holds_it():
    rng = np.random.default_rng(3)
    router = Router(2)
    system = [int(t) for t in rng.integers(0, 1000, 160)]
    first = router.route(_request(rng, "a", prompt=system + [1, 2, 3]))
    router.finish("a")
    router.route(_request(rng, "filler", max_new=4))  # the other replica is now the least loaded
    second = router.route(_request(rng, "b", prompt=system + [7, 8, 9, 10]))
    assert second.replica == first.replica and second.reason == "prefix_affinity"
    assert second.cached_tokens == 160
    different = router.route(_request(rng, "c", prompt=[int(t) for t in rng.integers(0, 1000, 160)]))
    assert different.reason == "least_loaded"


@pytest.mark.parametrize("home_load, expected", [(1000, "image_affinity"), (1001, "affinity_overloaded")])
def test_affinity_is_bounded_by_the_least_loaded_replicas_work(home_load, expected):
    router = Router(2, RouterConfig(balance_abs_tokens=500, balance_rel=1.5))
    image = ImageRef("popular", 0, 300)
    seed = router.route(RouteRequest("seed", 300, home_load - 300, (image,)))  # replica 0 holds it, work = home_load
    assert (seed.replica, router.replicas[0].outstanding_tokens) == (0, home_load)
    # replica 0 after taking it: home_load + 100 (image cached); replica 1: 0 + 300 + 100; bound 400 * 1.5 + 500
    decision = router.route(RouteRequest("again", 300, 100, (image,)))
    assert decision.reason == expected
    assert decision.replica == (0 if expected == "image_affinity" else 1)


def test_a_flood_of_one_image_spreads_once_its_replica_is_loaded():
    rng = np.random.default_rng(8)
    config = RouterConfig(balance_abs_tokens=1000, balance_rel=1.25)
    router = Router(3, config)
    image = ImageRef("viral", 5, 256)
    for index in range(60):
        router.route(_request(rng, f"r{index}", [image], max_new=int(rng.integers(50, 150))))
        loads = sorted(replica.outstanding_tokens for replica in router.replicas)
        assert loads[-1] <= (loads[0] + 450) * config.balance_rel + config.balance_abs_tokens
    assert all(replica.requests > 0 for replica in router.replicas)
    assert router.decisions["image_affinity"] + router.decisions["prefix_affinity"] > 30


def test_outstanding_work_follows_outputs_and_returns_to_zero():
    rng = np.random.default_rng(5)
    router = Router(3)
    expected: dict[str, list] = {}  # id -> [replica, prompt cost left, new tokens left]
    for step in range(300):
        if expected and rng.random() < 0.6:
            request_id = list(expected)[int(rng.integers(0, len(expected)))]
            record = expected[request_id]
            if rng.random() < 0.2:
                router.finish(request_id)
                del expected[request_id]
            else:
                produced = int(rng.integers(1, 5))
                router.on_output(request_id, produced)
                record[1], record[2] = 0, max(record[2] - produced, 0)
        else:
            request = _request(rng, f"r{step}")
            decision = router.route(request)
            expected[request.request_id] = [
                decision.replica, request.num_prompt_tokens - decision.cached_tokens, request.max_new_tokens
            ]
        for index, replica in enumerate(router.replicas):
            mine = [record for record in expected.values() if record[0] == index]
            assert replica.requests == len(mine)
            assert replica.outstanding_tokens == sum(record[1] + record[2] for record in mine)
    for request_id in list(expected):
        router.finish(request_id)
    assert all(replica.outstanding_tokens == 0 and replica.requests == 0 for replica in router.replicas)


def test_a_failed_replica_gets_nothing_and_gives_back_its_requests():
    rng = np.random.default_rng(6)
    router = Router(3, RouterConfig(policy="round_robin"))
    placed = {f"r{i}": router.route(_request(rng, f"r{i}")).replica for i in range(9)}
    lost = router.remove_replica(1)
    assert sorted(lost) == sorted(rid for rid, replica in placed.items() if replica == 1)
    assert router.replicas[1].requests == 0 and router.replicas[1].outstanding_tokens == 0
    assert [router.route(_request(rng, f"s{i}")).replica for i in range(4)] == [0, 2, 0, 2]
    retried = router.route(_request(rng, lost[0]), retry=True)
    assert retried.reason == "retry" and retried.replica != 1
    router.remove_replica(0)
    router.remove_replica(2)
    assert router.num_alive == 0
    with pytest.raises(NoReplicaError):
        router.route(_request(rng, "late"))


def test_the_image_memory_is_bounded_and_forgets_the_least_recent_first():
    rng = np.random.default_rng(7)
    router = Router(2, RouterConfig(image_capacity_tokens=1000))
    images = [ImageRef(f"i{k}", 0, 300) for k in range(4)]
    for index, image in enumerate(images):
        router.route(_request(rng, f"r{index}", [image], prompt=[], max_new=1))
    replica_images = [replica.images for replica in router.replicas]
    assert all(sum(held.values()) <= 1000 for held in replica_images)
    held_somewhere = {h for held in replica_images for h in held}
    assert held_somewhere == {image.mm_hash for image in images}  # 2 each: nothing evicted yet
    for index in range(4, 12):
        router.route(_request(rng, f"r{index}", [ImageRef(f"new{index}", 0, 300)], prompt=[], max_new=1))
    assert all(sum(held.values()) <= 1000 for held in (r.images for r in router.replicas))
    assert not any(image.mm_hash in replica.images for image in images for replica in router.replicas)


def test_the_router_imports_without_torch():
    code = "import sys, spaceserve.engine.data_parallel.router; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
