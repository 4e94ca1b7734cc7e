"""The vision towers' fused Triton kernels (LayerNorm + residual, the MLP activations with and without the up
projection, the 2-D rotary on q and k) equal their torch references on fresh random inputs with inputs left
untouched, and a tower with every kernel switched on gives the torch path's embeddings.

The rotary only multiplies and adds in float32, so it must match exactly; the norms sum in another order and exp/erf
may differ by an ulp, so those must be within rounding (tests/layers/test_fused_ops.assert_within_rounding).

Without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) at small shapes; with CUDA the same tests
also run at Qwen2-VL sizes (marked gpu)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import spaceserve.layers.layer_norm as layer_norm_module  # noqa: E402
import spaceserve.layers.norm as norm_module  # noqa: E402
import spaceserve.models.vision_common as vision_common  # noqa: E402
from spaceserve.layers.layer_norm import LayerNorm, layer_norm_reference  # noqa: E402
from spaceserve.layers.triton_ops.layer_norm import layer_norm_triton  # noqa: E402
from spaceserve.layers.triton_ops.vision_ops import ACTIVATIONS, activation_triton, vision_rotary_triton  # noqa: E402
from spaceserve.models.config import ModelConfig  # noqa: E402
from spaceserve.models.qwen2_5_vl.vision import Qwen2_5_VisionTransformer  # noqa: E402
from spaceserve.models.qwen2_vl.vision import Qwen2VisionTransformer  # noqa: E402
from spaceserve.models.resolve import PRESETS_DIR  # noqa: E402
from spaceserve.models.vision_common import activation, apply_vision_rotary, vision_rotary_cos_sin  # noqa: E402
from tests.layers.test_fused_ops import assert_within_rounding  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(random.randrange(2**31))


def _randn(gen, *shape, dtype, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=gen) * scale + offset).to(dtype=dtype, device=DEVICE)


def assert_norm_within_rounding(got, expected, weight, bias):
    """Within one ulp of each element plus the float32 cancellation of the mean, which scales with the row's output
    range rather than with each element; and (16-bit) almost every element identical."""
    assert not got.isnan().any(), "the kernel left elements unwritten"
    eps = torch.finfo(expected.dtype).eps
    scale = (weight.float().abs().max() * 4 + bias.float().abs().max()).item()
    torch.testing.assert_close(got.float(), expected.float(), rtol=eps, atol=8 * torch.finfo(torch.float32).eps * scale)
    if expected.dtype != torch.float32:
        assert (got != expected).float().mean().item() <= 0.01


NORM_CASES = [pytest.param(r, h, id=f"{r}x{h}") for r, h in [(1, 32), (7, 40), (5, 1280)]] + [
    pytest.param(r, h, id=f"{r}x{h}", marks=gpu_only) for r, h in [(9216, 1280), (333, 1536)]
]


@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add-norm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "hidden"), NORM_CASES)
def test_layer_norm_matches_reference(gen, rows, hidden, dtype, with_residual):
    x = _randn(gen, rows, hidden + 8, dtype=dtype, scale=3.0, offset=1.5)[:, :hidden]  # a strided view, off-centre
    residual = _randn(gen, rows, hidden, dtype=dtype, scale=2.0) if with_residual else None
    weight = (1.0 + 0.2 * torch.randn(hidden, generator=gen)).to(dtype=dtype, device=DEVICE)
    bias = (0.3 * torch.randn(hidden, generator=gen)).to(dtype=dtype, device=DEVICE)
    before = [t.clone() for t in (x, weight, bias) + ((residual,) if with_residual else ())]

    got, got_residual = layer_norm_triton(x, weight, bias, 1e-6, residual)
    expected, expected_residual = layer_norm_reference(x, weight, bias, 1e-6, residual)

    assert_norm_within_rounding(got, expected, weight, bias)
    if with_residual:
        assert torch.equal(got_residual, expected_residual)
    else:
        assert got_residual is None
    for old, new in zip(before, (x, weight, bias) + ((residual,) if with_residual else ())):
        assert torch.equal(old, new), "an input was modified"


def test_layer_norm_module_returns_the_residual_only_when_given_one(gen):
    norm = LayerNorm(40, eps=1e-6).to(DEVICE)
    x, residual = _randn(gen, 3, 40, dtype=torch.float32), _randn(gen, 3, 40, dtype=torch.float32)
    normed, summed = norm(x, residual)
    assert torch.equal(summed, x + residual)
    torch.testing.assert_close(normed, norm(x + residual), rtol=0, atol=0)
    assert isinstance(norm(x), torch.Tensor)


ACT_CASES = [pytest.param(shape, id="x".join(map(str, shape))) for shape in [(1, 80), (5, 128), (3, 1100)]] + [
    pytest.param(shape, id="x".join(map(str, shape)), marks=gpu_only) for shape in [(9216, 5120), (700, 3420)]
]


@pytest.mark.parametrize("with_up", [False, True], ids=["act", "act-mul"])
@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ACT_CASES)
def test_activations_match_reference(gen, shape, dtype, name, with_up):
    x = _randn(gen, *shape, dtype=dtype, scale=4.0)  # far into the tails
    up = _randn(gen, *shape, dtype=dtype) if with_up else None
    before = x.clone()
    got = activation_triton(x, name, up)
    expected = activation(name)(x)
    expected = expected if up is None else expected * up
    assert_within_rounding(got, expected)
    assert torch.equal(x, before)


def test_activation_rejects_unknown_names_and_mismatched_up(gen):
    x = _randn(gen, 2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="no fused kernel"):
        activation_triton(x, "gelu")
    with pytest.raises(ValueError, match="does not match"):
        activation_triton(x, "silu", _randn(gen, 2, 4, dtype=torch.float32))


ROPE_CASES = [pytest.param(n, h, d, id=f"{n}tok-{h}h-d{d}") for n, h, d in [(5, 2, 16), (9, 3, 80), (2, 16, 80)]] + [
    pytest.param(n, h, d, id=f"{n}tok-{h}h-d{d}", marks=gpu_only) for n, h, d in [(9216, 16, 80), (1000, 16, 80)]
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "heads", "head_dim"), ROPE_CASES)
def test_vision_rotary_matches_reference_exactly(gen, tokens, heads, head_dim, dtype):
    positions = torch.randint(0, 200, (tokens, 2), generator=gen, dtype=torch.int32).to(DEVICE)
    cos, sin = vision_rotary_cos_sin(positions, head_dim)
    qkv = _randn(gen, tokens, 3, heads, head_dim, dtype=dtype, scale=2.0)
    q, k, _ = qkv.unbind(1)  # strided views, as the attention passes them
    before = qkv.clone()
    got_q, got_k = vision_rotary_triton(q, k, cos, sin)
    assert torch.equal(got_q, apply_vision_rotary(q, cos, sin))
    assert torch.equal(got_k, apply_vision_rotary(k, cos, sin))
    assert got_q.is_contiguous() and got_k.is_contiguous()
    assert torch.equal(qkv, before)


def test_vision_rotary_rejects_bad_tables(gen):
    q = _randn(gen, 3, 2, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="cos/sin"):
        vision_rotary_triton(q, q, q[:, 0, :8], q[:, 0, :8])
    with pytest.raises(ValueError, match="float32"):
        table = _randn(gen, 3, 16, dtype=torch.bfloat16)
        vision_rotary_triton(q, q, table, table)


def _tower(preset: str) -> torch.nn.Module:
    config = ModelConfig.from_hf_dict(json.loads((PRESETS_DIR / preset / "config.json").read_text())).vision
    tower = (Qwen2VisionTransformer if preset == "tiny-qwen2-vl" else Qwen2_5_VisionTransformer)(config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in tower.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return tower.eval().to(DEVICE)


@pytest.mark.parametrize("preset", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_a_tower_on_the_fused_kernels_equals_the_torch_path(monkeypatch, preset):
    tower = _tower(preset)
    config = tower.config
    grids = torch.tensor([[1, 4, 6], [2, 8, 4], [1, 10, 10]])
    rng = np.random.default_rng(random.randrange(2**31))
    pixels = torch.from_numpy(rng.standard_normal((int(grids.prod(-1).sum()), config.patch_dim), dtype=np.float32))
    pixels = pixels.to(DEVICE)
    with torch.inference_mode():
        reference = tower(pixels, grids)
        for module in (vision_common, layer_norm_module, norm_module):
            monkeypatch.setattr(module, "use_fused_ops", lambda x: True)
        fused = tower(pixels, grids)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
