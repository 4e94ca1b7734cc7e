"""The SM allocator: on every encoder dispatch and LM step, where the next encoder batch and the LM step run and how
many prefill tokens the LM step may take, chosen from measured resource-utility curves and the queues (pure: no
torch, no clock, no state of its own; the contract is in allocation_types.py).

Plans it weighs (`Placement`), each with a cap on the prefill chunk a decode step may carry:
- LM_WHOLE: nothing to encode, the LM gets every SM.
- SPLIT(e): the encoder batch on e SMs, the LM step (decodes plus a prefill chunk) on the rest, concurrently; the
  LM gets the whole GPU again once the encoder queue has drained.
- ENCODER_WHOLE: the next encoder batch on every SM while the LM waits for it, then the best SPLIT; it wins when
  little or nothing decodes (a batch on all SMs ends soonest) and the wait still meets the TPOT SLO.
- PREFILL_SPLIT(e) (when the engine can run it, `AllocatorConfig.prefill_split`): decode-only steps on the
  bandwidth side, the encoder and then prefill steps on the compute side of e SMs, so large prefills never land
  in a decode step (SGLang's PD multiplexing, with the encoder on the prefill side).

A plan is feasible when its predicted gap between a running sequence's tokens stays within `tpot_margin x
slo_tpot_ms` (less what the decodes have already waited); a decode step's prefill chunk is the largest the plan's
cap and that budget allow. Among feasible plans the allocator takes the least predicted cost: the queued requests'
summed TTFT, plus `miss_penalty_ms` per request predicted past the TTFT SLO, plus `decode_delay_weight` times the
delay the plan imposes on running decodes (allocation_forecast.py). Counting that delay is what keeps the TPOT
budget from being spent when the queue does not need it: a larger chunk or encoder share must buy more TTFT than
it costs the decodes. When no plan is feasible it takes the one with the smallest decode gap.

While an encoder batch is in flight the split cannot change (the LM must know which SMs are its own): the plans
are that split's, or waiting for a whole-device batch to end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spaceserve.sched.allocation_forecast import Phases, forecast, ready_times
from spaceserve.sched.allocation_situation import Situation, build_situation
from spaceserve.sched.allocation_types import (
    Allocation,
    AllocatorConfig,
    AllocatorState,
    Placement,
)
from spaceserve.sched.resource_curves import ResourceCurves, Split


@dataclass(frozen=True)
class _Plan:
    placement: Placement
    encoder_sms: int = 0
    """SMs for the queued encoder batches after the first."""
    first_batch_sms: int = 0
    lm_sms: int = 0
    """The LM's SMs while the encoder has work (PREFILL_SPLIT: the decode side)."""
    prefill_sms: int = 0
    chunk_cap: int = 0
    """Most prefill tokens a decode step carries under this plan."""


class SMAllocator:
    def __init__(self, curves: ResourceCurves, config: AllocatorConfig | None = None) -> None:
        self.curves = curves
        self.config = config or AllocatorConfig()
        self.total_sms = curves.total_sms
        self.splits: tuple[Split, ...] = curves.usable_splits()
        self._prefill_section = curves.lm_step.section(batch=0, context=0)

    # ---- predictions ---------------------------------------------------------------------------------------

    def encoder_batch_ms(self, sms, patches) -> np.ndarray:
        return self.curves.encoder_ms(sms, patches) + self.config.encoder_batch_overhead_ms

    def prefill_curve_ms(self, sms, tokens) -> np.ndarray:
        """A prefill-only step of `tokens` on `sms` SMs, on the bare curve (no learned scale, no overhead)."""
        return self._prefill_section(np.asarray(sms, dtype=np.float64), np.asarray(tokens, dtype=np.float64))

    def chunk_within(self, sms, cap, situation: Situation, budget_ms: float) -> np.ndarray:
        """Per (LM side, cap): the largest prefill chunk <= cap whose step with the running decodes stays within
        `budget_ms`; -1 where even the decodes alone exceed it. Without decodes: the cap."""
        sms, cap = np.broadcast_arrays(np.asarray(sms, dtype=np.float64), np.asarray(cap, dtype=np.int64))
        if situation.num_decodes == 0:
            return cap.copy()
        sides, side_of = np.unique(sms, return_inverse=True)
        grid, steps = situation.chunk_steps(sides)
        fits = np.sum(steps <= budget_ms, axis=1)  # steps grow with the chunk: the fitting chunks are a prefix
        largest = np.where(fits > 0, grid[np.maximum(fits - 1, 0)], -1)[side_of.reshape(sms.shape)]
        return np.where(largest >= 0, np.minimum(largest, cap), -1)

    # ---- deciding ---------------------------------------------------------------------------------------

    def decide(self, state: AllocatorState) -> Allocation:
        situation = self._situation(state)
        if situation.in_flight is not None and situation.in_flight.encoder_sms >= self.total_sms:
            return self._behind_whole_device_batch(situation)
        plans = self._plans(situation)
        if not plans:
            return Allocation(Placement.LM_WHOLE, 0, self.total_sms, situation.largest_chunk,
                              reason="nothing to encode, decode or prefill")
        evaluated = self._evaluate(plans, situation)
        if self.config.whole_device_encoder and situation.in_flight is None and situation.batches_patches.size:
            splits = [i for i, p in enumerate(plans) if p.placement is Placement.SPLIT]
            if splits:
                best = plans[min(splits, key=lambda i: evaluated["cost"][i])]
                whole = _Plan(Placement.ENCODER_WHOLE, best.encoder_sms, self.total_sms, best.lm_sms, 0, best.chunk_cap)
                extra = self._evaluate([whole], situation)
                plans.append(whole)
                evaluated = {k: np.concatenate([v, extra[k]]) for k, v in evaluated.items()}
        return self._choose(plans, evaluated, situation)

    def _chunk_caps(self, situation: Situation) -> list[int]:
        """Chunk caps to weigh: none, the granularity times powers of two, and the largest the backlog can use
        (only the largest without decodes: then a larger chunk costs nobody anything)."""
        largest = situation.largest_chunk
        if situation.num_decodes == 0 or largest == 0:
            return [largest]
        caps, cap = [0], self.config.prefill_granularity
        while cap < largest:
            caps.append(cap)
            cap *= 2
        return [*caps, largest]

    def _plans(self, situation: Situation) -> list[_Plan]:
        caps = self._chunk_caps(situation)
        in_flight = situation.in_flight
        sides = [self._split_of(in_flight.encoder_sms)] if in_flight is not None else list(self.splits)
        plans = []
        if situation.has_encoder_work:
            plans += [_Plan(Placement.SPLIT, s.encoder_sms, s.encoder_sms, s.lm_sms, 0, cap)
                      for s in sides for cap in caps]
            if not sides:  # a device measured without partitions: the encoder only ever runs on all of it
                plans += [_Plan(Placement.ENCODER_WHOLE, self.total_sms, self.total_sms, self.total_sms, 0, cap)
                          for cap in caps]
        elif situation.num_decodes or situation.pending_tokens:
            plans += [_Plan(Placement.LM_WHOLE, 0, 0, self.total_sms, 0, cap) for cap in caps]
        if self.config.prefill_split and situation.pending_tokens and situation.num_decodes:
            plans += [_Plan(Placement.PREFILL_SPLIT, s.encoder_sms, s.encoder_sms, s.lm_sms, s.encoder_sms, 0)
                      for s in sides]
        return plans

    def _split_of(self, encoder_sms: int) -> Split:
        for split in self.curves.splits:
            if split.encoder_sms == encoder_sms:
                return split
        return Split(encoder_sms, self.total_sms - encoder_sms)

    def _situation(self, state: AllocatorState) -> Situation:
        return build_situation(state, self.config, self.curves, self._prefill_section)

    def _evaluate(self, plans: list[_Plan], situation: Situation) -> dict[str, np.ndarray]:
        config, total, count = self.config, float(self.total_sms), len(plans)
        b = situation.num_decodes
        placement = np.array([p.placement.value for p in plans])
        whole_first = placement == Placement.ENCODER_WHOLE.value
        prefill_split = placement == Placement.PREFILL_SPLIT.value
        enc_sms = np.array([p.encoder_sms for p in plans], dtype=np.float64)
        first_sms = np.array([p.first_batch_sms for p in plans], dtype=np.float64)
        lm_sms = np.array([p.lm_sms for p in plans], dtype=np.float64)
        pf_sms = np.array([max(p.prefill_sms, 1) for p in plans], dtype=np.float64)
        caps = np.array([p.chunk_cap for p in plans], dtype=np.int64)

        patches = situation.batches_patches
        start = situation.in_flight_end_ms
        if patches.size:
            sms = np.repeat(enc_sms[:, None], patches.size, axis=1)
            sms[:, 0] = first_sms
            batch_end = start + np.cumsum(self.encoder_batch_ms(sms, patches[None, :]), axis=1)
            first_batch_ms = batch_end[:, 0] - start
            drain = batch_end[:, -1]
        else:
            batch_end = np.zeros((count, 0))
            first_batch_ms = np.zeros(count)
            drain = np.full(count, start if situation.has_encoder_work else 0.0)
        pause_end = np.where(whole_first, start + first_batch_ms, 0.0)

        budget = config.tpot_budget_ms
        # co-located: decodes + a prefill chunk on the LM side while the encoder has work (b), on all SMs after (c)
        chunk_b = self.chunk_within(lm_sms, caps, situation, budget)
        chunk_c = self.chunk_within(np.full(count, total), caps, situation, budget)
        rate_b, gap_b = self._rate_and_gap(lm_sms, chunk_b, situation)
        rate_c, gap_c = self._rate_and_gap(np.full(count, total), chunk_c, situation)
        decode_b = situation.step(lm_sms, 0)
        decode_c = np.full(count, situation.alone_gap_ms)
        # PREFILL_SPLIT: decode-only steps on the LM side; prefill steps on the compute side once the encoder is done
        largest = situation.largest_chunk
        prefill_step = situation.prefill_only(pf_sms, largest)
        prefill_rate = np.where(prefill_step > 0, largest / np.maximum(prefill_step, 1e-9), 0.0)
        rate_b, gap_b = np.where(prefill_split, 0.0, rate_b), np.where(prefill_split, decode_b, gap_b)
        rate_c, gap_c = np.where(prefill_split, prefill_rate, rate_c), np.where(prefill_split, decode_b, gap_c)
        decode_c = np.where(prefill_split, decode_b, decode_c)
        phases = Phases(pause_end, drain, rate_b, rate_c, gap_b, gap_c, decode_b, decode_c)
        ready = ready_times(batch_end, np.full(count, situation.in_flight_end_ms), situation.backlog)
        result = forecast(ready, situation.backlog, phases, situation.decode_lifetimes_ms, situation.alone_gap_ms)

        # this decision's own LM step: its chunk (within what the decodes have already waited) and the gap it gives
        stalled = situation.decode_stalled_ms
        step_sms = lm_sms if situation.has_encoder_work else np.full(count, total)
        chunk_now = self.chunk_within(step_sms, caps, situation, budget - stalled)
        _, step_bound = self._rate_and_gap(step_sms, np.maximum(chunk_now, 0), situation)
        _, step_ready = self._rate_and_gap(step_sms, np.clip(chunk_now, 0, situation.ready_now_tokens), situation)
        step_bound = np.where(prefill_split, decode_b, step_bound)
        step_ready = np.where(prefill_split, decode_b, step_ready)
        chunk_now = np.where(prefill_split, largest, chunk_now)
        after_pause = situation.step(lm_sms if patches.size > 1 else np.full(count, total), 0)
        gap_now = stalled + np.where(whole_first, first_batch_ms + after_pause, step_bound)
        tpot_ok = (gap_now <= budget) & ((chunk_now >= 0) | whole_first) if b else np.ones(count, dtype=bool)
        misses = np.sum(result.ttft_ms > config.slo_ttft_ms, axis=1)
        cost = (result.ttft_ms.sum(axis=1) + config.decode_delay_weight * result.decode_delay_ms
                + config.penalty_ms * misses)
        mean_ttft = result.ttft_ms.mean(axis=1) if situation.backlog.size else np.full(count, np.nan)
        return {"cost": cost, "tpot_ok": tpot_ok, "gap_now": gap_now, "step_ready": step_ready, "step_sms": step_sms,
                "chunk_now": chunk_now, "first_batch_ms": first_batch_ms, "prefill_step": prefill_step,
                "misses": misses, "mean_ttft": mean_ttft}

    def _rate_and_gap(self, sms: np.ndarray, chunk: np.ndarray, situation: Situation):
        chunk = np.maximum(chunk, 0)
        step = situation.step(sms, chunk)
        return np.where(step > 0, chunk / np.maximum(step, 1e-9), 0.0), step

    def _choose(self, plans: list[_Plan], ev: dict[str, np.ndarray], situation: Situation) -> Allocation:
        feasible = np.flatnonzero(ev["tpot_ok"])
        if feasible.size:
            pick = min(feasible, key=lambda i: (ev["cost"][i], plans[i].encoder_sms, -plans[i].chunk_cap, i))
            why = f"least predicted cost of {feasible.size} plans (of {len(plans)}) meeting the TPOT SLO"
        else:
            pick = min(range(len(plans)), key=lambda i: (ev["gap_now"][i], ev["cost"][i], i))
            why = f"none of {len(plans)} plans meets the TPOT SLO: the smallest decode gap"
        plan = plans[pick]
        has_batch = situation.batches_patches.size > 0
        whole_first = plan.placement is Placement.ENCODER_WHOLE
        prefill_split = plan.placement is Placement.PREFILL_SPLIT
        decodes = situation.num_decodes
        chunk = 0 if whole_first else int(max(ev["chunk_now"][pick], 0))
        lm_step = curve = None
        if not whole_first and (decodes or (chunk and situation.ready_now_tokens and not prefill_split)):
            lm_step = float(ev["step_ready"][pick])
            whole = ev["step_sms"][pick] >= self.total_sms
            scale = situation.scale_whole if whole else situation.scale_split
            curve = max(0.0, lm_step - situation.step_overhead_ms) / scale
        mean_ttft = ev["mean_ttft"][pick]
        return Allocation(
            placement=plan.placement,
            encoder_sms=plan.first_batch_sms if has_batch else 0,
            lm_sms={Placement.ENCODER_WHOLE: 0, Placement.LM_WHOLE: self.total_sms}.get(plan.placement, plan.lm_sms),
            prefill_tokens=chunk,
            prefill_sms=plan.prefill_sms if prefill_split else 0,
            predicted_lm_step_ms=lm_step,
            lm_step_curve_ms=curve,
            predicted_encoder_batch_ms=float(ev["first_batch_ms"][pick]) if has_batch else None,
            predicted_prefill_step_ms=float(ev["prefill_step"][pick]) if prefill_split and chunk else None,
            predicted_decode_gap_ms=float(ev["gap_now"][pick]) if decodes else None,
            decode_stalled_ms=situation.decode_stalled_ms,
            predicted_mean_ttft_ms=None if np.isnan(mean_ttft) else float(mean_ttft),
            predicted_ttft_misses=int(ev["misses"][pick]),
            tpot_ok=bool(ev["tpot_ok"][pick]),
            cost=float(ev["cost"][pick]),
            encoder_batch_patches=int(situation.batches_patches[0]) if has_batch else 0,
            considered=len(plans),
            reason=f"{_describe(plan, self.total_sms)}: {why}",
        )

    def _behind_whole_device_batch(self, situation: Situation) -> Allocation:
        """A whole-device batch runs alone: the LM waits for it unless its decodes would miss the TPOT SLO."""
        decodes = situation.num_decodes
        stalled = situation.decode_stalled_ms
        gap = stalled + situation.in_flight_end_ms + situation.alone_gap_ms
        if decodes and gap > self.config.tpot_budget_ms:
            return Allocation(Placement.ENCODER_WHOLE, 0, self.total_sms, 0,
                              predicted_lm_step_ms=situation.alone_gap_ms,
                              predicted_decode_gap_ms=stalled + situation.alone_gap_ms, decode_stalled_ms=stalled,
                              tpot_ok=False,
                              reason="whole-device batch in flight: the decodes cannot wait for it, they share the GPU")
        return Allocation(Placement.ENCODER_WHOLE, 0, 0, 0, predicted_decode_gap_ms=gap if decodes else None,
                          decode_stalled_ms=stalled, reason="whole-device batch in flight: the LM waits for it")


def _describe(plan: _Plan, total: int) -> str:
    cap = f", chunks <= {plan.chunk_cap}"
    if plan.placement is Placement.LM_WHOLE:
        return f"LM on all {total} SMs{cap}"
    if plan.placement is Placement.ENCODER_WHOLE:
        return f"next encoder batch on all {total} SMs, then encoder {plan.encoder_sms} / LM {plan.lm_sms}{cap}"
    if plan.placement is Placement.PREFILL_SPLIT:
        return f"encoder + prefill on {plan.encoder_sms} SMs, decode on {plan.lm_sms}"
    return f"encoder {plan.encoder_sms} / LM {plan.lm_sms}{cap}"
