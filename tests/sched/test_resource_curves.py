"""The curves model on synthetic grids: exact between points for multilinear data, monotone everywhere (noise,
extrapolation, missing points), the file round trip and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spaceserve.sched.resource_curves import (
    CURVES_FORMAT,
    Curve,
    CurvesError,
    CurvesFile,
    ResourceCurves,
    monotone_envelope,
)
from tests.sched.fake_curves import TOTAL_SMS, fake_curves

SMS = [8, 24, 48, 96, 132]
PATCHES = [256, 1024, 4096, 16384]


def bilinear(s, p):
    """Decreasing in SMs (below 200), increasing in patches, and multilinear: interpolation reproduces it exactly."""
    return (200.0 - np.asarray(s, float)) * (1.0 + np.asarray(p, float) / 100.0) / 10.0


def encoder_curve(values) -> Curve:
    return Curve("encoder", ("sms", "patches"), {"sms": SMS, "patches": PATCHES}, values)


def test_multilinear_data_is_reproduced_between_points():
    s, p = np.meshgrid(SMS, PATCHES, indexing="ij")
    curve = encoder_curve(bilinear(s, p))
    assert curve.num_raised == 0 and curve.num_filled == 0
    rng = np.random.default_rng(7)
    qs, qp = rng.uniform(8, 132, 500), rng.uniform(256, 16384, 500)
    np.testing.assert_allclose(curve(qs, qp), bilinear(qs, qp), rtol=1e-12)
    np.testing.assert_allclose(curve(s, p), bilinear(s, p), rtol=1e-12)


def test_extrapolation_continues_work_clamps_more_sms_scales_fewer():
    s, p = np.meshgrid(SMS, PATCHES, indexing="ij")
    curve = encoder_curve(bilinear(s, p))
    # beyond the largest patch count: the last segment's slope (exact for this data, linear in patches)
    assert curve(48, 3 * 16384) == pytest.approx(bilinear(48, 3 * 16384))
    # below the smallest: clamped (never predicted faster than the cheapest measured point)
    assert curve(48, 10) == pytest.approx(bilinear(48, 256))
    assert curve(500, 1024) == pytest.approx(bilinear(132, 1024))
    assert curve(4, 1024) == pytest.approx(bilinear(8, 1024) * 2)


def test_noisy_grids_become_monotone_everywhere():
    rng = np.random.default_rng(11)
    s, p = np.meshgrid(SMS, PATCHES, indexing="ij")
    noisy = bilinear(s, p) * rng.uniform(0.5, 1.5, s.shape)
    curve = encoder_curve(noisy)
    assert curve.num_raised > 0
    envelope = curve.envelope_ms
    assert np.all(envelope >= noisy - 1e-12)
    assert np.all(np.diff(envelope, axis=0) <= 1e-12) and np.all(np.diff(envelope, axis=1) >= -1e-12)
    qs = np.sort(rng.uniform(1, 200, (300, 2)), axis=1)
    qp = rng.uniform(0, 50000, (300, 1))
    assert np.all(curve(qs[:, 0], qp[:, 0]) >= curve(qs[:, 1], qp[:, 0]) - 1e-9)  # more SMs: never slower
    qp2 = np.sort(rng.uniform(0, 80000, (300, 2)), axis=1)
    qs2 = rng.uniform(1, 200, 300)
    assert np.all(curve(qs2, qp2[:, 0]) <= curve(qs2, qp2[:, 1]) + 1e-9)  # more work: never faster


def test_four_axis_curve_is_monotone_in_every_axis_with_noise():
    curves = fake_curves(noise=0.3, seed=3)
    rng = np.random.default_rng(5)
    base = [rng.uniform(1, 140, 400), rng.integers(0, 600, 400), rng.uniform(0, 20000, 400), rng.uniform(0, 20000, 400)]
    at = curves.lm_step(*base)
    for axis, step in ((0, 10.0), (1, 7), (2, 900.0), (3, 700.0)):
        moved = list(base)
        moved[axis] = base[axis] + step
        after = curves.lm_step(*moved)
        if axis == 0:
            assert np.all(after <= at + 1e-9)
        else:
            assert np.all(after >= at - 1e-9)


def test_section_equals_the_full_query():
    curves = fake_curves(noise=0.2, seed=1)
    section = curves.lm_step.section(batch=37, context=3000)
    rng = np.random.default_rng(2)
    sms, prefill = rng.uniform(1, 200, 800), rng.uniform(0, 30000, 800)
    np.testing.assert_allclose(section(sms, prefill), curves.lm_step(sms, 37, 3000, prefill), rtol=1e-12)
    with pytest.raises(ValueError, match="only work axes"):
        curves.lm_step.section(sms=4)


def test_missing_points_take_the_cheaper_neighbours_value():
    s, p = np.meshgrid(SMS, PATCHES, indexing="ij")
    values = bilinear(s, p)
    values[0, 3] = np.nan  # the most expensive point, e.g. a shape that did not fit
    values[2, 1] = np.nan
    curve = encoder_curve(values.tolist())
    assert curve.num_filled == 2
    assert curve(8, 16384) == pytest.approx(max(bilinear(8, 4096), bilinear(24, 16384)))
    assert np.all(np.isfinite(curve.envelope_ms))
    values[:, 0] = np.nan
    values[:, 1:] = np.nan
    with pytest.raises(CurvesError, match="cheapest corner"):
        encoder_curve(values)


def test_envelope_of_a_monotone_grid_is_the_grid():
    s, p = np.meshgrid(SMS, PATCHES, indexing="ij")
    values = bilinear(s, p)
    np.testing.assert_array_equal(monotone_envelope(values, (True, False)), values)


@pytest.mark.parametrize(
    "grid, values, message",
    [
        ({"sms": [8, 8, 16], "patches": [1, 2]}, np.ones((3, 2)), "strictly increasing"),
        ({"sms": [8, 16], "patches": [1, 2]}, np.ones((3, 2)), "shape"),
        ({"sms": [8, 16], "patches": [1, 2]}, -np.ones((2, 2)), "negative"),
        ({"sms": [8, 16]}, np.ones((2, 2)), "no grid"),
    ],
)
def test_bad_grids_are_refused_with_the_reason(grid, values, message):
    with pytest.raises(CurvesError, match=message):
        Curve("encoder", ("sms", "patches"), grid, values)


def test_empty_step_costs_nothing_and_splits_stay_in_range():
    curves = fake_curves(lm_sms=(36, 68, 100, 132), encoder_sms=(16, 32, 64, 96, 132))
    assert curves.lm_step_ms(64, 0, 4096, 0) == 0.0
    assert curves.lm_step_ms(64, 1, 4096, 0) > 0
    usable = curves.usable_splits()
    assert usable and all(s.encoder_sms >= 16 and s.lm_sms >= 36 for s in usable)
    assert len(usable) < len(curves.splits)


def test_file_round_trip_and_lookup_by_key(tmp_path):
    curves = fake_curves(noise=0.1)
    other = fake_curves()
    other_entry = other.to_entry()
    other_entry["key"] = {"device": "Fake H100", "model": "fake-2b", "dtype": "bfloat16"}
    file = CurvesFile()
    file.put(curves.to_entry())
    file.put(other_entry)
    path = tmp_path / "curves.json"
    file.write(path)
    document = json.loads(path.read_text())
    assert document["format"] == CURVES_FORMAT and len(document["entries"]) == 2
    loaded = ResourceCurves.load(path, device="Fake H200")
    assert loaded.total_sms == TOTAL_SMS and loaded.splits == curves.splits
    rng = np.random.default_rng(0)
    q = (rng.uniform(4, 132, 100), rng.integers(0, 300, 100), rng.uniform(100, 9000, 100), rng.uniform(0, 9000, 100))
    np.testing.assert_allclose(loaded.lm_step_ms(*q), curves.lm_step_ms(*q), rtol=1e-12)
    np.testing.assert_allclose(loaded.encoder_ms(q[0], q[3]), curves.encoder_ms(q[0], q[3]), rtol=1e-12)
    with pytest.raises(CurvesError, match="2 curve entries match"):
        ResourceCurves.load(path)
    with pytest.raises(CurvesError, match="Fake H100 / fake-2b / bfloat16"):
        ResourceCurves.load(path, model="other-model")


def test_unreadable_or_foreign_files_say_so(tmp_path):
    with pytest.raises(CurvesError, match="cannot read"):
        ResourceCurves.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CurvesError, match="not JSON"):
        ResourceCurves.load(bad)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(CurvesError, match=CURVES_FORMAT):
        ResourceCurves.load(bad)
    entry = fake_curves().to_entry()
    del entry["curves"]["lm_step"]
    with pytest.raises(CurvesError, match="malformed"):
        ResourceCurves.from_entry(entry)
