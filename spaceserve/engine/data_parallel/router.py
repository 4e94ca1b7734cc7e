"""Which data-parallel replica gets a request: least outstanding work, with affinity for the replica that already
holds the request's images (their content hashes) or its prompt prefix (its KV block hashes), so an image repeated
across requests is encoded once per cluster rather than once per replica, and a shared prefix is prefilled once.

The router cannot see the replicas' caches; it keeps an approximation of each: the images and prefix blocks it sent
there, least recently used first out, bounded by the replica's encoder-cache tokens and KV blocks (the replicas
evict the same way under the same pressure). A replica's outstanding work is, over its requests in flight, the
prompt tokens it still has to compute (those its cache does not cover) plus the tokens still to generate; the
router learns progress from the outputs the front receives.

Affinity is bounded (SGLang's cache-aware router has the same two thresholds): a replica holding the request's data
gets it only while its work after taking it stays within `balance_rel` x the least-loaded replica's work after
taking it plus `balance_abs_tokens`; otherwise the least-loaded one does. So a popular image can never pile all its
requests onto one replica.

Pure logic (no torch, no I/O): the DP client calls it under its lock; the goodput simulation (scripts/) drives the
same class.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from spaceserve.config import ROUTER_POLICIES

REASONS = ("image_affinity", "prefix_affinity", "least_loaded", "affinity_overloaded", "round_robin", "retry")
"""Why a request went where it did (the label of spaceserve:router_decisions_total). affinity_overloaded: a replica
held the request's data but was too loaded, so the least-loaded one took it; retry: re-sent after its replica died
before the request produced anything."""


class NoReplicaError(RuntimeError):
    """Every replica has failed."""


@dataclass(frozen=True)
class RouterConfig:
    policy: str = "cache_aware"
    balance_abs_tokens: int = 2048
    balance_rel: float = 1.25
    image_capacity_tokens: int = 16384
    """Per replica: how many embedding rows of images the router remembers (the replica's encoder cache)."""
    prefix_capacity_blocks: int = 65536
    """Per replica: how many KV block hashes the router remembers (the replica's KV blocks)."""

    def __post_init__(self) -> None:
        if self.policy not in ROUTER_POLICIES:
            raise ValueError(f"router policy must be one of {', '.join(ROUTER_POLICIES)}, got {self.policy!r}")
        if self.balance_abs_tokens < 0 or self.balance_rel < 1.0:
            raise ValueError("balance_abs_tokens must be >= 0 and balance_rel >= 1")


@dataclass(frozen=True)
class ImageRef:
    mm_hash: str
    offset: int
    num_tokens: int


@dataclass(frozen=True)
class RouteRequest:
    """What the router needs to know about a request."""

    request_id: str
    num_prompt_tokens: int
    max_new_tokens: int
    images: tuple[ImageRef, ...] = ()
    block_hashes: tuple[bytes, ...] = ()
    """Chained hashes of the prompt's first full KV blocks (kvcache/prefix_hash.py)."""
    block_size: int = 16


@dataclass(frozen=True)
class RouteDecision:
    replica: int
    reason: str
    cached_tokens: int
    """Prompt tokens the router expects the replica to have cached (prefix) or encoded (images)."""


@dataclass
class ReplicaState:
    alive: bool = True
    outstanding_tokens: int = 0
    requests: int = 0
    routed: int = 0
    images: OrderedDict[str, int] = field(default_factory=OrderedDict)
    image_tokens: int = 0
    blocks: OrderedDict[bytes, None] = field(default_factory=OrderedDict)


@dataclass
class _InFlight:
    replica: int
    prompt_tokens: int
    """Uncached prompt tokens, outstanding until the request's first token."""
    new_tokens: int
    started: bool = False


class Router:
    def __init__(self, num_replicas: int, config: RouterConfig | None = None) -> None:
        if num_replicas < 1:
            raise ValueError(f"a router needs at least one replica, got {num_replicas}")
        self.config = config or RouterConfig()
        self.replicas = [ReplicaState() for _ in range(num_replicas)]
        self.decisions: Counter[str] = Counter()
        self._in_flight: dict[str, _InFlight] = {}
        self._next_turn = 0

    # ---- decisions -----------------------------------------------------------------------------------------

    def route(self, request: RouteRequest, retry: bool = False) -> RouteDecision:
        """Pick a live replica for `request` and account for it there. Raises NoReplicaError if none lives."""
        if request.request_id in self._in_flight:
            raise ValueError(f"request {request.request_id!r} is already routed")
        alive = [index for index, replica in enumerate(self.replicas) if replica.alive]
        if not alive:
            raise NoReplicaError("every data-parallel replica has failed")
        cached = {index: self._cached_tokens(index, request) for index in alive}
        policy = self.config.policy
        if policy == "round_robin":
            replica, reason = self._take_turn(alive), "round_robin"
        else:
            replica, reason = self._least_loaded(alive, request, cached), "least_loaded"
            if policy == "cache_aware":
                replica, reason = self._with_affinity(alive, request, cached, replica)
        if retry:
            reason = "retry"
        self._account(replica, request, cached[replica][0] + cached[replica][1])
        self.decisions[reason] += 1
        return RouteDecision(replica, reason, cached[replica][0] + cached[replica][1])

    def _with_affinity(
        self, alive: list[int], request: RouteRequest, cached: dict[int, tuple[int, int]], least: int
    ) -> tuple[int, str]:
        candidates = sorted((i for i in alive if sum(cached[i]) > 0), key=lambda i: (-sum(cached[i]), i))
        if not candidates:
            return least, "least_loaded"
        config = self.config
        bound = self._load_after(least, request, cached) * config.balance_rel + config.balance_abs_tokens
        for index in candidates:
            if self._load_after(index, request, cached) <= bound:
                prefix, images = cached[index]
                return index, "prefix_affinity" if prefix >= images else "image_affinity"
        return least, "affinity_overloaded"

    def _least_loaded(self, alive: list[int], request: RouteRequest, cached: dict[int, tuple[int, int]]) -> int:
        return min(
            alive,
            key=lambda i: (self._load_after(i, request, cached), self.replicas[i].requests, self.replicas[i].routed, i),
        )

    def _take_turn(self, alive: list[int]) -> int:
        count = len(self.replicas)
        for step in range(count):
            index = (self._next_turn + step) % count
            if index in alive:
                self._next_turn = index + 1
                return index
        raise AssertionError("unreachable: alive is not empty")

    def _load_after(self, index: int, request: RouteRequest, cached: dict[int, tuple[int, int]]) -> int:
        return self.replicas[index].outstanding_tokens + self._cost(request, sum(cached[index]))

    @staticmethod
    def _cost(request: RouteRequest, cached_tokens: int) -> int:
        return max(request.num_prompt_tokens - cached_tokens, 0) + request.max_new_tokens

    def _cached_tokens(self, index: int, request: RouteRequest) -> tuple[int, int]:
        """(prompt tokens in the replica's prefix cache, tokens of images it holds that the prefix does not cover)."""
        replica = self.replicas[index]
        matched = 0
        for block_hash in request.block_hashes:
            if block_hash not in replica.blocks:
                break
            matched += 1
        prefix = matched * request.block_size
        images = sum(
            image.num_tokens
            for image in request.images
            if image.offset + image.num_tokens > prefix and image.mm_hash in replica.images
        )
        return prefix, images

    # ---- bookkeeping ---------------------------------------------------------------------------------------

    def _account(self, index: int, request: RouteRequest, cached_tokens: int) -> None:
        replica = self.replicas[index]
        flight = _InFlight(index, max(request.num_prompt_tokens - cached_tokens, 0), request.max_new_tokens)
        self._in_flight[request.request_id] = flight
        replica.outstanding_tokens += flight.prompt_tokens + flight.new_tokens
        replica.requests += 1
        replica.routed += 1
        for image in request.images:
            self._remember_image(replica, image)
        for block_hash in request.block_hashes:
            replica.blocks[block_hash] = None
            replica.blocks.move_to_end(block_hash)
        while len(replica.blocks) > self.config.prefix_capacity_blocks:
            replica.blocks.popitem(last=False)

    def _remember_image(self, replica: ReplicaState, image: ImageRef) -> None:
        if image.mm_hash in replica.images:
            replica.images.move_to_end(image.mm_hash)
            return
        replica.images[image.mm_hash] = image.num_tokens
        replica.image_tokens += image.num_tokens
        while replica.image_tokens > self.config.image_capacity_tokens and len(replica.images) > 1:
            _, tokens = replica.images.popitem(last=False)
            replica.image_tokens -= tokens

    def replica_of(self, request_id: str) -> int | None:
        flight = self._in_flight.get(request_id)
        return None if flight is None else flight.replica

    def on_output(self, request_id: str, num_new_tokens: int) -> None:
        """A request produced tokens: its prompt is computed, and it has that many fewer to generate."""
        flight = self._in_flight.get(request_id)
        if flight is None:
            return
        replica = self.replicas[flight.replica]
        done = min(num_new_tokens, flight.new_tokens)
        if not flight.started and num_new_tokens:
            flight.started = True
            done += flight.prompt_tokens
            flight.prompt_tokens = 0
        flight.new_tokens -= min(num_new_tokens, flight.new_tokens)
        replica.outstanding_tokens -= done

    def finish(self, request_id: str) -> None:
        """The request finished, was aborted or failed: its remaining work leaves its replica. Unknown ids are
        ignored."""
        flight = self._in_flight.pop(request_id, None)
        if flight is None:
            return
        replica = self.replicas[flight.replica]
        replica.outstanding_tokens -= flight.prompt_tokens + flight.new_tokens
        replica.requests -= 1

    def remove_replica(self, index: int) -> list[str]:
        """The replica failed: nothing is routed to it again. Returns the ids of its requests in flight (forgotten
        here; the caller retries or fails them)."""
        replica = self.replicas[index]
        replica.alive = False
        lost = [request_id for request_id, flight in self._in_flight.items() if flight.replica == index]
        for request_id in lost:
            self.finish(request_id)
        replica.images.clear()
        replica.image_tokens = 0
        replica.blocks.clear()
        return lost

    @property
    def num_alive(self) -> int:
        return sum(replica.alive for replica in self.replicas)
