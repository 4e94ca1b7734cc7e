"""Data parallelism on the Ray backend: two replicas as Ray actors in a placement group on a local Ray instance,
reached over TCP. The same scenarios as the mp backend (tests/engine/dp_scenarios.py)."""

from __future__ import annotations

import pytest

from spaceserve.core.errors import ConfigError
from tests.engine import dp_scenarios
from tests.engine.dp_scenarios import model_dir, reference  # noqa: F401 - module-scoped fixtures

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = dp_scenarios.start_engine(model_dir, data_parallel_size=2, data_parallel_backend="ray")
    try:
        yield engine
    finally:
        engine.shutdown()
    assert not ray.is_initialized()  # the instance started for the run is gone with it


def test_ray_refuses_more_replicas_than_the_cluster_can_place(model_dir):
    # first in the module: no Ray instance is running yet, so the one started for it must be gone after
    with pytest.raises(ConfigError, match="replicas need .* CPU on the Ray cluster"):
        dp_scenarios.start_engine(model_dir, data_parallel_size=64, data_parallel_backend="ray")
    assert not ray.is_initialized()


def test_ray_replicas_are_actors_in_a_placement_group_and_answer_like_one_engine(engine, reference):
    placements = engine.health()["replicas"]
    assert [p["backend"] for p in placements] == ["ray", "ray"] and len({p["pid"] for p in placements}) == 2
    dp_scenarios.check_same_greedy_answers(engine, reference, seed=15, count=6)


def test_ray_a_repeated_image_goes_to_the_replica_that_encoded_it(engine):
    dp_scenarios.check_repeated_image_goes_where_it_was_encoded(engine, seed=16)


def test_ray_a_killed_actor_fails_or_retries_its_requests_and_the_rest_serve(engine, reference):
    dp_scenarios.check_replica_failure(engine, reference, seed=17)
