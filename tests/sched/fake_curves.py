"""Resource curves from an analytic model shaped like Qwen2-VL-2B on a 132-SM Hopper: the encoder is compute-bound
(time ~ patches / SMs), a decode step is bandwidth-bound and saturates with few SMs, a prefill chunk is
compute-bound. Used to test the curves model and the allocator without a GPU."""

from __future__ import annotations

import numpy as np

from spaceserve.sched.resource_curves import Curve, CurvesKey, ResourceCurves, Split

TOTAL_SMS = 132
SPLIT_SMS = tuple(range(8, TOTAL_SMS, 8))  # Hopper: groups of 8 SMs


def encoder_model(sms, patches, *, per_patch_ms=0.004, fixed_ms=1.0):
    sms, patches = np.broadcast_arrays(np.asarray(sms, float), np.asarray(patches, float))
    return fixed_ms + per_patch_ms * patches * TOTAL_SMS / sms


def lm_model(sms, batch, context, prefill, *, weights_ms=1.5, kv_ms_per_mtoken=0.35, prefill_ms_per_token=0.002,
             saturating_sms=36):
    sms, batch, context, prefill = np.broadcast_arrays(*(np.asarray(x, float) for x in (sms, batch, context, prefill)))
    bandwidth_share = np.minimum(1.0, sms / saturating_sms)
    memory = (weights_ms + kv_ms_per_mtoken * batch * context / 1e6) / bandwidth_share
    compute = prefill_ms_per_token * (prefill + batch) * TOTAL_SMS / sms
    step = np.maximum(memory, compute) + 0.1 * np.minimum(memory, compute)
    return np.where((batch <= 0) & (prefill <= 0), 0.0, step)


def fake_curves(
    *,
    encoder_sms=SPLIT_SMS + (TOTAL_SMS,),
    lm_sms=tuple(TOTAL_SMS - s for s in reversed(SPLIT_SMS)) + (TOTAL_SMS,),
    patches=(256, 1024, 4096, 9216, 16384),
    batches=(0, 1, 16, 64, 256),
    contexts=(512, 2048, 8192),
    prefill=(0, 512, 2048, 8192),
    encoder_kwargs=None,
    lm_kwargs=None,
    noise=0.0,
    seed=0,
) -> ResourceCurves:
    rng = np.random.default_rng(seed)
    s, p = np.meshgrid(encoder_sms, patches, indexing="ij")
    enc = encoder_model(s, p, **(encoder_kwargs or {}))
    grid = np.meshgrid(lm_sms, batches, contexts, prefill, indexing="ij")
    lm = lm_model(*grid, **(lm_kwargs or {}))
    if noise:
        enc = enc * rng.uniform(1 - noise, 1 + noise, enc.shape)
        lm = lm * rng.uniform(1 - noise, 1 + noise, lm.shape)
    return ResourceCurves(
        CurvesKey("Fake H200", "fake-2b", "bfloat16"),
        TOTAL_SMS,
        [Split(e, TOTAL_SMS - e) for e in SPLIT_SMS],
        Curve("encoder", ("sms", "patches"), {"sms": encoder_sms, "patches": patches}, enc),
        Curve("lm_step", ("sms", "batch", "context", "prefill_tokens"),
              {"sms": lm_sms, "batch": batches, "context": contexts, "prefill_tokens": prefill}, lm),
    )
