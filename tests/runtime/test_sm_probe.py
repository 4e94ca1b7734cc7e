"""The SM-split probe (runtime/sm_probe.py): GEMM shapes taken from the model, a side whose child process cannot run
them counted as failed (not a crash of the caller), and no usable split refused by name. On a GPU (marked gpu) the
engine's default splits run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from spaceserve.models.config import ModelConfig
from spaceserve.models.resolve import PRESETS_DIR
from spaceserve.runtime import sm_probe

HAS_CUDA = torch.cuda.is_available()


def _config(preset: str = "tiny-qwen2-vl") -> SimpleNamespace:
    model = ModelConfig.from_hf_dict(json.loads((PRESETS_DIR / preset / "config.json").read_text()))
    return SimpleNamespace(model_config=model)


def test_gemm_shapes_are_the_models_projections():
    config = _config()
    text, vision = config.model_config.text, config.model_config.vision
    shapes = sm_probe.model_gemm_shapes(config)
    assert (256, text.hidden_size, text.intermediate_size) in shapes
    assert (9216, vision.hidden_size, vision.intermediate_size) in shapes
    assert sm_probe._parse_shapes("1x2x3,40x50x60") == ((1, 2, 3), (40, 50, 60))


@pytest.mark.skipif(HAS_CUDA, reason="the failure path: a side whose child cannot run CUDA")
def test_a_side_that_cannot_run_is_failed_not_raised():
    probes = sm_probe.probe_splits([8, 16], ((4, 8, 8),), timeout_s=120)
    assert set(probes) == {(8, "encoder"), (8, "lm"), (16, "encoder"), (16, "lm")}
    assert all(not p.ok and p.error.startswith("probe exited") for p in probes.values())
    usable, failed = sm_probe.usable_encoder_groups(0, [8], ((4, 8, 8),))
    assert usable == () and {p.side for p in failed} == {"encoder", "lm"}


def test_no_usable_split_is_refused_by_name(monkeypatch):
    from spaceserve.core.errors import ConfigError
    from spaceserve.runtime import multiplex

    failed = (sm_probe.SideProbe(120, "lm", 12, False, "CUBLAS_STATUS_EXECUTION_FAILED"),)
    monkeypatch.setattr(sm_probe, "usable_encoder_groups", lambda *a: ((), failed))
    partitions = (SimpleNamespace(encoder_sms=120),)
    with pytest.raises(ConfigError, match=r"lm side of 120 \(12 SMs\): CUBLAS_STATUS_EXECUTION_FAILED"):
        multiplex._runnable(partitions, _config(), torch.device("cuda", 0))
    kept = (SimpleNamespace(encoder_sms=32), SimpleNamespace(encoder_sms=120))
    monkeypatch.setattr(sm_probe, "usable_encoder_groups", lambda *a: ((32,), failed))
    assert multiplex._runnable(kept, _config(), torch.device("cuda", 0)) == kept[:1]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_default_splits_run_on_this_gpu():
    from spaceserve.runtime.multiplex import _default_encoder_sms
    from spaceserve.runtime.sm_partition import get_partition_manager, green_context_support

    device = torch.device("cuda", 0)
    if green_context_support(device):
        pytest.skip(green_context_support(device))
    counts = sorted({get_partition_manager(device).partition(n).encoder_sms for n in _default_encoder_sms(device)})
    probes = sm_probe.probe_splits(counts, sm_probe.model_gemm_shapes(_config()))
    assert all(p.ok for p in probes.values()), [p for p in probes.values() if not p.ok]
