"""Resource-utility curves: measured latency of the vision encoder and of one language-model step as functions of
the SMs they get and the work they carry, held as a model the SM allocator queries (pure numpy, no torch).

`spaceserve profile` measures the curves on a GPU and writes them with `CurvesFile`; one file holds entries keyed by
(device, model, dtype). A curve is a rectangular grid of medians:

- encoder: ms of one encoder batch against (sms, patches);
- lm_step: ms of one LM step against (sms, batch, context, prefill_tokens): `batch` decodes with `context` tokens of
  KV each, plus one prefill chunk of `prefill_tokens` (a mixed step; batch 0 is a prefill-only step).

Queries interpolate multilinearly between measured points and are monotone by construction: on load each grid is
raised to its monotone upper envelope (more SMs never slower, more work never faster; a point that measured faster
than one with more SMs or less work takes that point's time), which also fills points that could not be measured
(e.g. a shape that did not fit the KV cache) from their cheaper neighbours. Outside the grid: work below the
smallest point is clamped to it; work beyond the largest continues the last segment's slope (never decreasing, so
a batch twice the largest measured one is predicted, not clamped to the largest); SMs above the largest measured
count are clamped; below the smallest the time scales as 1/SMs (a compute-bound kernel's law, pessimistic for
bandwidth-bound ones). Every query broadcasts over numpy arrays, so the allocator evaluates all candidate splits
in one call.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CURVES_FORMAT = "spaceserve-sm-curves/1"
ENCODER_AXES = ("sms", "patches")
LM_STEP_AXES = ("sms", "batch", "context", "prefill_tokens")
SM_AXIS = "sms"
_FAR = 64.0
"""Work axes are extended to a virtual point this many times their largest measured value (last-segment slope);
beyond it, queries are clamped."""


class CurvesError(ValueError):
    """A curves file or entry is malformed, or holds no entry for the asked key."""


class Curve:
    """One measured grid (median ms per point) and its monotone multilinear interpolant."""

    def __init__(self, name: str, axes: Sequence[str], grid: Mapping[str, Sequence[float]], values_ms: Any) -> None:
        self.name = name
        self.axes = tuple(axes)
        if SM_AXIS not in self.axes:
            raise CurvesError(f"curve {name!r} has no {SM_AXIS!r} axis: {self.axes}")
        missing = [a for a in self.axes if a not in grid]
        if missing:
            raise CurvesError(f"curve {name!r} has no grid for axes {missing}")
        self.grid = tuple(np.asarray(grid[a], dtype=np.float64) for a in self.axes)
        for axis, points in zip(self.axes, self.grid):
            if points.ndim != 1 or points.size == 0 or not np.all(np.isfinite(points)) or np.any(points < 0):
                raise CurvesError(f"curve {name!r}: axis {axis!r} must be a non-empty list of numbers >= 0")
            if np.any(np.diff(points) <= 0):
                raise CurvesError(f"curve {name!r}: axis {axis!r} must be strictly increasing, got {points.tolist()}")
        raw = np.asarray(_nan_for_none(values_ms), dtype=np.float64)
        shape = tuple(p.size for p in self.grid)
        if raw.shape != shape:
            raise CurvesError(f"curve {name!r}: values have shape {raw.shape}, the grid {shape}")
        if np.any(raw[np.isfinite(raw)] < 0):
            raise CurvesError(f"curve {name!r}: negative latencies")
        self.raw_ms = raw
        self.decreasing = tuple(a == SM_AXIS for a in self.axes)
        envelope = monotone_envelope(raw, self.decreasing)
        unfilled = int(np.isnan(envelope).sum())
        if unfilled:
            raise CurvesError(
                f"curve {name!r}: {unfilled} points have no measured point with more SMs or less work to fill them "
                f"from (the cheapest corner must be measured)"
            )
        self.num_filled = int(np.isnan(raw).sum())
        """Points that were not measured and took their value from the envelope."""
        self.num_raised = int(np.sum(envelope > np.nan_to_num(raw, nan=np.inf)))
        """Measured points raised to keep the curve monotone (noise, or a real non-monotonicity)."""
        self._grid, self._values = _extend_work_axes(list(self.grid), envelope, self.decreasing)
        self._sm_index = self.axes.index(SM_AXIS)

    def section(self, **fixed: float) -> Curve:
        """This curve with some coordinates fixed, as a curve over the others: the same values as querying with
        them (multilinear interpolation is separable), at a fraction of the cost for repeated queries."""
        unknown = set(fixed) - set(self.axes)
        if unknown or SM_AXIS in fixed:
            raise ValueError(f"curve {self.name!r}: can fix only work axes of {self.axes}, not {sorted(fixed)}")
        kept = [k for k, a in enumerate(self.axes) if a not in fixed]
        mesh = np.meshgrid(*(self._grid[k] for k in kept), indexing="ij")
        coords, it = [], iter(mesh)
        for axis in self.axes:
            coords.append(np.full(mesh[0].shape, float(fixed[axis])) if axis in fixed else next(it))
        values = self(*coords)  # the SM coordinates are grid points: no below-range scaling happened
        section = Curve.__new__(Curve)
        section.name = f"{self.name}[{', '.join(f'{k}={v:g}' for k, v in fixed.items())}]"
        section.axes = tuple(self.axes[k] for k in kept)
        section.grid = tuple(self.grid[k] for k in kept)
        section.raw_ms = values[tuple(slice(0, g.size) for g in section.grid)]
        section.decreasing = tuple(self.decreasing[k] for k in kept)
        section.num_filled = section.num_raised = 0
        section._grid = [self._grid[k] for k in kept]
        section._values = values
        section._sm_index = section.axes.index(SM_AXIS)
        return section

    @property
    def envelope_ms(self) -> np.ndarray:
        """The monotone grid the queries interpolate (measured points, raised and filled)."""
        return self._values[tuple(slice(0, p.size) for p in self.grid)]

    def __call__(self, *coords: Any) -> np.ndarray:
        if len(coords) != len(self.axes):
            raise TypeError(f"curve {self.name!r} takes {len(self.axes)} coordinates {self.axes}, got {len(coords)}")
        arrays = np.broadcast_arrays(*(np.asarray(c, dtype=np.float64) for c in coords))
        sms = arrays[self._sm_index]
        lowest = self.grid[self._sm_index][0]
        scale = np.where(sms < lowest, lowest / np.maximum(sms, 1e-9), 1.0)
        indices, weights = [], []
        for points, x in zip(self._grid, arrays):
            x = np.clip(x, points[0], points[-1])
            if points.size == 1:
                indices.append(np.zeros(x.shape, dtype=np.intp))
                weights.append(None)
                continue
            i = np.clip(np.searchsorted(points, x, side="right") - 1, 0, points.size - 2)
            indices.append(i)
            weights.append((x - points[i]) / (points[i + 1] - points[i]))
        result = np.zeros(arrays[0].shape, dtype=np.float64)
        moving = [k for k, w in enumerate(weights) if w is not None]
        for corner in itertools.product((0, 1), repeat=len(moving)):
            weight = np.ones(arrays[0].shape, dtype=np.float64)
            index = list(indices)
            for k, upper in zip(moving, corner):
                weight = weight * (weights[k] if upper else 1.0 - weights[k])
                index[k] = indices[k] + upper
            result += weight * self._values[tuple(index)]
        return result * scale

    def to_json(self) -> dict[str, Any]:
        return {
            "axes": list(self.axes),
            "grid": {a: [_number(v) for v in p] for a, p in zip(self.axes, self.grid)},
            "median_ms": _none_for_nan(self.raw_ms),
        }


def monotone_envelope(values: np.ndarray, decreasing: Sequence[bool]) -> np.ndarray:
    """The smallest grid >= `values` that is non-increasing along the `decreasing` axes and non-decreasing along the
    others; NaN points take the envelope of their measured neighbours (NaN where none is cheaper)."""
    out = np.array(values, dtype=np.float64)
    for axis, down in enumerate(decreasing):
        if down:
            out = np.flip(np.fmax.accumulate(np.flip(out, axis), axis=axis), axis)
        else:
            out = np.fmax.accumulate(out, axis=axis)
    return out


def _extend_work_axes(grid: list[np.ndarray], values: np.ndarray, decreasing: Sequence[bool]):
    """Append to each work axis with >= 2 points a virtual point far beyond it, valued by the last segment's slope
    (itself made monotone across the other axes), so extrapolation is multilinear interpolation on a monotone grid."""
    for axis, down in enumerate(decreasing):
        points = grid[axis]
        if down or points.size < 2:
            continue
        last = np.take(values, [-1], axis=axis)
        prev = np.take(values, [-2], axis=axis)
        slope = np.maximum(last - prev, 0.0) / (points[-1] - points[-2])
        slope = monotone_envelope(slope, decreasing)
        far = points[-1] * _FAR
        values = np.concatenate([values, last + slope * (far - points[-1])], axis=axis)
        grid[axis] = np.append(points, far)
    return grid, values


@dataclass(frozen=True)
class CurvesKey:
    device: str
    model: str
    dtype: str

    def __str__(self) -> str:
        return f"{self.device} / {self.model} / {self.dtype}"


@dataclass(frozen=True)
class Split:
    encoder_sms: int
    lm_sms: int


class ResourceCurves:
    """The curves of one (device, model, dtype): what the allocator predicts with."""

    def __init__(
        self,
        key: CurvesKey,
        total_sms: int,
        splits: Sequence[Split],
        encoder: Curve,
        lm_step: Curve,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if total_sms < 1:
            raise CurvesError(f"total_sms must be >= 1, got {total_sms}")
        if encoder.axes != ENCODER_AXES or lm_step.axes != LM_STEP_AXES:
            raise CurvesError(f"curves need axes {ENCODER_AXES} and {LM_STEP_AXES}, got {encoder.axes}, {lm_step.axes}")
        for split in splits:
            if split.encoder_sms < 1 or split.lm_sms < 1 or split.encoder_sms + split.lm_sms != total_sms:
                raise CurvesError(f"split {split} does not divide the {total_sms} SMs into two non-empty sides")
        self.key = key
        self.total_sms = int(total_sms)
        self.splits = tuple(sorted(set(splits), key=lambda s: s.encoder_sms))
        self.encoder = encoder
        self.lm_step = lm_step
        self.meta = dict(meta or {})

    def encoder_ms(self, sms: Any, patches: Any) -> np.ndarray:
        return self.encoder(sms, patches)

    def lm_step_ms(self, sms: Any, batch: Any, context: Any, prefill_tokens: Any) -> np.ndarray:
        """A step of `batch` decodes at `context` plus `prefill_tokens` of prefill; 0 for an empty step."""
        value = self.lm_step(sms, batch, context, prefill_tokens)
        empty = (np.asarray(batch) <= 0) & (np.asarray(prefill_tokens) <= 0)
        return np.where(empty, 0.0, value)

    def usable_splits(self) -> tuple[Split, ...]:
        """Splits whose two sides both lie within the measured SM ranges (no extrapolation in SMs)."""
        enc_lo, lm_lo = self.encoder.grid[0][0], self.lm_step.grid[0][0]
        return tuple(s for s in self.splits if s.encoder_sms >= enc_lo and s.lm_sms >= lm_lo)

    # ---- the file --------------------------------------------------------------------------------------------

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> ResourceCurves:
        try:
            key = CurvesKey(**entry["key"])
            curves = entry["curves"]
            encoder = Curve("encoder", curves["encoder"]["axes"], curves["encoder"]["grid"],
                            curves["encoder"]["median_ms"])
            lm_step = Curve("lm_step", curves["lm_step"]["axes"], curves["lm_step"]["grid"],
                            curves["lm_step"]["median_ms"])
            splits = [Split(int(s["encoder_sms"]), int(s["lm_sms"])) for s in entry["splits"]]
            total = int(entry["total_sms"])
        except (KeyError, TypeError) as exc:
            raise CurvesError(f"malformed curves entry: missing or wrong {exc}") from None
        meta = {k: v for k, v in entry.items() if k not in ("key", "curves", "splits", "total_sms")}
        return cls(key, total, splits, encoder, lm_step, meta)

    def to_entry(self) -> dict[str, Any]:
        return {
            "key": {"device": self.key.device, "model": self.key.model, "dtype": self.key.dtype},
            "total_sms": self.total_sms,
            "splits": [{"encoder_sms": s.encoder_sms, "lm_sms": s.lm_sms} for s in self.splits],
            **self.meta,
            "curves": {"encoder": self.encoder.to_json(), "lm_step": self.lm_step.to_json()},
        }

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str | None = None, model: str | None = None,
             dtype: str | None = None) -> ResourceCurves:
        """The entry of `path` matching the given key parts (all of them when None); exactly one must match."""
        entries = CurvesFile.read(path).entries
        wanted = {"device": device, "model": model, "dtype": dtype}
        matching = [e for e in entries.values() if all(v is None or e["key"][k] == v for k, v in wanted.items())]
        if len(matching) != 1:
            known = "; ".join(entries) or "none"
            asked = ", ".join(f"{k}={v}" for k, v in wanted.items() if v is not None) or "any"
            raise CurvesError(f"{path}: {len(matching)} curve entries match ({asked}); entries: {known}")
        return cls.from_entry(matching[0])


@dataclass
class CurvesFile:
    """The JSON document: {"format": ..., "entries": {"<device> / <model> / <dtype>": entry}}."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> CurvesFile:
        try:
            with open(path, encoding="utf-8") as file:
                document = json.load(file)
        except OSError as exc:
            raise CurvesError(f"cannot read SM curves {path}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise CurvesError(f"{path} is not JSON: {exc}") from None
        if not isinstance(document, dict) or document.get("format") != CURVES_FORMAT:
            raise CurvesError(f"{path} is not a {CURVES_FORMAT} file")
        return cls(dict(document.get("entries") or {}))

    def put(self, entry: Mapping[str, Any]) -> str:
        """Add or replace the entry of its key; returns the key."""
        key = str(CurvesKey(**entry["key"]))
        self.entries[key] = dict(entry)
        return key

    def write(self, path: str | os.PathLike[str]) -> None:
        document = {"format": CURVES_FORMAT, "entries": self.entries}
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as file:
            json.dump(document, file, indent=1, allow_nan=False)
            file.write("\n")
        os.replace(tmp, path)


def _nan_for_none(values: Any) -> Any:
    if isinstance(values, (list, tuple)):
        return [_nan_for_none(v) for v in values]
    return math.nan if values is None else values


def _none_for_nan(values: np.ndarray) -> Any:
    return [_none_for_nan(v) for v in values] if values.ndim else (None if math.isnan(values) else float(values))


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)
