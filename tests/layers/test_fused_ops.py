"""The fused Triton kernels (RMSNorm + residual, M-RoPE on q and k, SiLU-and-mul) equal their torch references on
fresh random inputs, with outputs poisoned first and inputs left untouched; and an engine with the fused kernels
gives the same greedy tokens as one on the torch path.

Rotary only multiplies and adds, so it must match exactly. RMSNorm sums in another order and SiLU's exp may differ
by an ulp from the reference's, so they must be within one ulp everywhere and exact nearly everywhere.

Without CUDA the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) at small shapes; with CUDA the same
tests also run at Qwen2-VL sizes (marked gpu)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

import spaceserve.layers.activation as activation_module  # noqa: E402
import spaceserve.layers.norm as norm_module  # noqa: E402
import spaceserve.layers.rotary as rotary_module  # noqa: E402
from spaceserve import SamplingParams  # noqa: E402
from spaceserve.layers.activation import silu_and_mul_reference  # noqa: E402
from spaceserve.layers.norm import RMSNorm, rms_norm_reference  # noqa: E402
from spaceserve.layers.rotary import MRotaryEmbedding, apply_rotary  # noqa: E402
from spaceserve.layers.triton_ops import fused_ops, fused_ops_enabled, use_fused_ops  # noqa: E402
from spaceserve.layers.triton_ops.rms_norm import rms_norm_triton  # noqa: E402
from spaceserve.layers.triton_ops.rotary import rotary_qk_triton  # noqa: E402
from spaceserve.layers.triton_ops.silu_mul import silu_and_mul_triton  # noqa: E402
from tests.engine.parity import random_image, random_prompt  # noqa: E402
from tests.llm_factory import make_llm  # noqa: E402
from tests.tiny_checkpoints import make_tiny_checkpoint  # noqa: E402
from tests.tiny_tokenizer import write_tiny_tokenizer  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(random.randrange(2**31))


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=DEVICE)


def _poisoned(shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_within_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """16-bit outputs: every element within one ulp of the reference and almost all identical (the float32
    intermediates differ by an ulp, which moves a 16-bit rounding only rarely). float32 outputs: within a few ulps
    (one ulp more in a row's variance scales the whole row)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert not actual.isnan().any(), "the kernel left elements unwritten (poison survived)"
    ulps, max_mismatch = (8, 1.0) if expected.dtype == torch.float32 else (1, 0.01)
    # the ulp of the larger of the two: a result one ulp away across a power of two is two of the smaller's ulps
    magnitude = torch.maximum(expected.float().abs(), actual.float().abs()).clamp_min(torch.finfo(expected.dtype).tiny)
    ulp = torch.exp2(torch.floor(torch.log2(magnitude))) * torch.finfo(expected.dtype).eps
    diff = (actual.float() - expected.float()).abs()
    assert (diff <= ulps * ulp).all(), f"max error {diff.max().item()} exceeds {ulps} ulp"
    mismatch = (actual != expected).float().mean().item()
    assert mismatch <= max_mismatch, f"{mismatch:.2%} of elements differ from the reference"


# ---- RMSNorm (+ residual) ----

NORM_SMALL = [(1, 40), (7, 64), (5, 96), (3, 1536)]
NORM_REAL = [(1, 1536), (64, 1536), (333, 3584), (17, 1280), (9, 8192)]
NORM_CASES = [pytest.param(rows, hidden, id=f"{rows}x{hidden}") for rows, hidden in NORM_SMALL] + [
    pytest.param(rows, hidden, id=f"{rows}x{hidden}", marks=gpu_only) for rows, hidden in NORM_REAL
]


@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add-norm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "hidden"), NORM_CASES)
def test_rms_norm_matches_reference(gen, rows, hidden, dtype, with_residual):
    # x is a view with a wider row stride, as a slice of a projection's output would be
    x = _randn(gen, rows, hidden + 8, dtype=dtype, scale=3.0)[:, :hidden]
    residual = _randn(gen, rows, hidden, dtype=dtype, scale=2.0) if with_residual else None
    weight = (1.0 + 0.2 * torch.randn(hidden, generator=gen)).to(dtype=dtype, device=DEVICE)
    eps = float(np.exp(random.uniform(np.log(1e-6), np.log(1e-5))))
    inputs = [t.clone() for t in (x, weight) + ((residual,) if with_residual else ())]
    out = _poisoned((rows, hidden), dtype)
    residual_out = _poisoned((rows, hidden), dtype) if with_residual else None

    got, got_residual = rms_norm_triton(x, weight, eps, residual, out=out, residual_out=residual_out)
    expected, expected_residual = rms_norm_reference(x, weight, eps, residual)

    assert got is out
    assert_within_rounding(got, expected)
    if with_residual:
        assert got_residual is residual_out
        torch.testing.assert_close(got_residual, expected_residual, rtol=0, atol=0)
    else:
        assert got_residual is None
    for before, after in zip(inputs, (x, weight) + ((residual,) if with_residual else ())):
        assert torch.equal(before, after), "an input was modified"


def test_rms_norm_float32_weight_on_bf16_input_promotes_like_reference(gen):
    x = _randn(gen, 6, 96, dtype=torch.bfloat16)
    residual = _randn(gen, 6, 96, dtype=torch.bfloat16)
    weight = (1.0 + 0.2 * torch.randn(96, generator=gen)).to(DEVICE)
    got, got_residual = rms_norm_triton(x, weight, 1e-6, residual)
    expected, expected_residual = rms_norm_reference(x, weight, 1e-6, residual)
    assert got.dtype == expected.dtype == torch.float32
    assert_within_rounding(got, expected)
    assert torch.equal(got_residual, expected_residual)


def test_rms_norm_rejects_mismatched_inputs(gen):
    x = _randn(gen, 4, 64, dtype=torch.float32)
    weight = torch.ones(64, device=DEVICE)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_triton(x, weight, 1e-6, _randn(gen, 4, 32, dtype=torch.float32))
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(x, torch.ones(32, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="out must be"):
        rms_norm_triton(x, weight, 1e-6, out=torch.empty(4, 63, device=DEVICE))


# ---- M-RoPE on q and k ----

ROPE_SMALL = [(5, 4, 2, 16, (2, 3, 3)), (9, 3, 1, 32, (4, 6, 6)), (2, 2, 2, 80, (8, 16, 16))]
ROPE_REAL = [(1, 12, 2, 128, (16, 24, 24)), (64, 12, 2, 128, (16, 24, 24)), (700, 28, 4, 128, (16, 24, 24))]
ROPE_CASES = [pytest.param(*case, id=f"{case[0]}tok-{case[1]}q{case[2]}k-d{case[3]}") for case in ROPE_SMALL] + [
    pytest.param(*case, id=f"{case[0]}tok-{case[1]}q{case[2]}k-d{case[3]}", marks=gpu_only) for case in ROPE_REAL
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "q_heads", "kv_heads", "head_dim", "section"), ROPE_CASES)
def test_rotary_qk_matches_reference_exactly(gen, tokens, q_heads, kv_heads, head_dim, section, dtype):
    rope = MRotaryEmbedding(head_dim, 1_000_000.0, section).to(DEVICE)
    positions = torch.randint(0, 30_000, (3, tokens), generator=gen).to(DEVICE)  # three axes differ (images)
    cos, sin = rope.cos_sin(positions, dtype)
    q_size, kv_size = q_heads * head_dim, kv_heads * head_dim
    qkv = _randn(gen, tokens, q_size + 2 * kv_size, dtype=dtype, scale=2.0)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)  # strided views, as the model passes them
    q, k = q.view(tokens, q_heads, head_dim), k.view(tokens, kv_heads, head_dim)
    qkv_before = qkv.clone()
    q_out = _poisoned(q.shape, dtype)
    k_out = _poisoned(k.shape, dtype)

    got_q, got_k = rotary_qk_triton(q, k, cos, sin, q_out=q_out, k_out=k_out)

    assert got_q is q_out and got_k is k_out
    torch.testing.assert_close(got_q, apply_rotary(q, cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(got_k, apply_rotary(k, cos, sin), rtol=0, atol=0)
    assert torch.equal(qkv, qkv_before), "q/k were modified in place"


def test_rotary_qk_rejects_mismatched_tables(gen):
    q = _randn(gen, 3, 2, 16, dtype=torch.float32)
    k = _randn(gen, 3, 1, 16, dtype=torch.float32)
    table = _randn(gen, 3, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="cos/sin"):
        rotary_qk_triton(q, k, table, table)
    with pytest.raises(ValueError, match="dtype"):
        full = _randn(gen, 3, 16, dtype=torch.bfloat16)
        rotary_qk_triton(q, k, full, full)


# ---- SiLU-and-mul ----

SILU_SMALL = [((1, 80),), ((5, 128),), ((2, 3, 2200),)]  # 1100 wide: two column blocks, the second partly masked
SILU_REAL = [((1, 17920),), ((64, 17920),), ((300, 37888),)]  # Qwen2-VL-2B / 7B gate_up widths
SILU_CASES = [pytest.param(*case, id="x".join(map(str, case[0]))) for case in SILU_SMALL] + [
    pytest.param(*case, id="x".join(map(str, case[0])), marks=gpu_only) for case in SILU_REAL
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SILU_CASES)
def test_silu_and_mul_matches_reference(gen, shape, dtype):
    gate_up = _randn(gen, *shape, dtype=dtype, scale=4.0)  # reaches far into silu's tails
    before = gate_up.clone()
    out = _poisoned((*shape[:-1], shape[-1] // 2), dtype)

    got = silu_and_mul_triton(gate_up, out=out)

    assert got is out
    assert_within_rounding(got, silu_and_mul_reference(gate_up))
    assert torch.equal(gate_up, before)


def test_silu_and_mul_rejects_odd_width(gen):
    with pytest.raises(ValueError, match="even"):
        silu_and_mul_triton(_randn(gen, 2, 7, dtype=torch.float32))


# ---- dispatch ----


def test_switch_forces_the_torch_path_and_restores():
    x = torch.zeros(1, device=DEVICE)
    initially = fused_ops_enabled()
    with fused_ops(False):
        assert not use_fused_ops(x)
    assert fused_ops_enabled() == initially
    assert not use_fused_ops(torch.zeros(1))  # CPU tensors always take the torch path


def test_rms_norm_module_returns_the_residual_only_when_given_one(gen):
    norm = RMSNorm(64).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.2 * torch.randn(64, generator=gen))
    x, residual = _randn(gen, 3, 64, dtype=torch.float32), _randn(gen, 3, 64, dtype=torch.float32)
    alone = norm(x)
    normed, summed = norm(x, residual)
    assert isinstance(alone, torch.Tensor)
    torch.testing.assert_close(summed, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(normed, norm(x + residual), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("_", [pytest.param(None, id="qwen2-vl-2b-sizes", marks=gpu_only)])
def test_modules_on_cuda_dispatch_to_the_kernels(gen, dtype, _):
    norm = RMSNorm(1536).to(device=DEVICE, dtype=dtype)
    x, residual = _randn(gen, 64, 1536, dtype=dtype), _randn(gen, 64, 1536, dtype=dtype)
    fused_normed, fused_summed = norm(x, residual)
    with fused_ops(False):
        torch_normed, torch_summed = norm(x, residual)
    assert_within_rounding(fused_normed, torch_normed)
    assert torch.equal(fused_summed, torch_summed)


# ---- the engine: fused kernels vs the torch path, greedy tokens ----

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


def _prompts():
    rng = np.random.default_rng(random.randrange(2**31))
    prompts = []
    for sizes in ([], [(70, 95)]):
        images = [random_image(rng, h, w) for h, w in sizes]
        ids = random_prompt(rng, len(images), text_len=int(rng.integers(5, 20)))
        prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": images}})
    return prompts


def _force_fused_on_cpu(monkeypatch):
    """The layers only pick the kernels for CUDA tensors; under the interpreter the test makes them pick them."""
    for module in (norm_module, rotary_module, activation_module):
        monkeypatch.setattr(module, "use_fused_ops", lambda x: True)


@pytest.mark.parametrize(
    ("architecture", "engine_args"),
    [
        pytest.param("qwen2_vl", {}, id="qwen2_vl"),
        pytest.param("qwen2_5_vl", {}, id="qwen2_5_vl-graphed", marks=gpu_only),
        pytest.param("qwen2_vl", {"enforce_eager": True}, id="qwen2_vl-eager", marks=gpu_only),
    ],
)
def test_engine_with_fused_kernels_gives_the_torch_path_tokens(tmp_path, monkeypatch, architecture, engine_args):
    path = make_tiny_checkpoint(tmp_path, architecture, seed=random.randrange(1000))
    write_tiny_tokenizer(path)
    prompts = _prompts()
    with fused_ops(False):
        expected = [o.outputs[0].token_ids for o in make_llm(str(path), **engine_args).generate(prompts, GREEDY)]
    if not HAS_CUDA:
        _force_fused_on_cpu(monkeypatch)
    with fused_ops(True):
        llm = make_llm(str(path), **engine_args)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == expected
    llm.llm_engine.check_idle_integrity()
