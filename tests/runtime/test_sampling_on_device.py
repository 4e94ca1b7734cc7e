"""Sampling on the device keeps the sampler's semantics: greedy is the exact argmax after banning, seeded rows draw
the same tokens in any batch, random rows follow softmax(logits / T) restricted by top-k / top-p."""

import pytest
import torch

from spaceserve.core import SamplingParams
from spaceserve.layers.sampler import SamplingRow, sample_on_device, sampling_metadata_from_rows

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def logits_for(rows, vocab, seed):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_take_the_argmax_after_banning_whatever_shares_the_batch(device):
    logits = logits_for(6, 40, seed=3).to(device)
    top2 = logits.topk(2, dim=-1).indices.tolist()
    greedy = SamplingParams(temperature=0)
    rows = [
        SamplingRow(greedy, None),
        SamplingRow(SamplingParams(temperature=0.9, top_k=4), None),
        SamplingRow(greedy, None, (top2[2][0],)),
        SamplingRow(SamplingParams(temperature=1.3, top_p=0.7, seed=5), torch.Generator(device).manual_seed(5)),
        SamplingRow(greedy, None),
        SamplingRow(greedy, None, (top2[5][0], top2[5][1])),
    ]
    tokens = sample_on_device(logits.clone(), sampling_metadata_from_rows(rows, 40, torch.device(device))).tolist()
    assert tokens[0] == top2[0][0] and tokens[4] == top2[4][0]
    assert tokens[2] == top2[2][1]
    assert tokens[5] == logits[5].topk(3).indices[2].item()
    assert tokens[1] in logits[1].topk(4).indices.tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_draw_the_same_tokens_in_any_batch(device):
    vocab = 60
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=99)
    target = logits_for(1, vocab, seed=4).to(device)

    def draws(others: int, position: int) -> list[int]:
        generator = torch.Generator(device).manual_seed(99)
        tokens = []
        for step in range(25):
            batch = logits_for(others + 1, vocab, seed=100 + step + 7 * others).to(device)
            batch[position] = target[0]
            rows = [SamplingRow(SamplingParams(temperature=0.8), None)] * (others + 1)
            rows[position] = SamplingRow(params, generator)
            metadata = sampling_metadata_from_rows(rows, vocab, torch.device(device))
            tokens.append(sample_on_device(batch, metadata)[position].item())
        return tokens

    alone = draws(0, 0)
    assert draws(3, 2) == alone and draws(6, 0) == alone
    assert len(set(alone)) > 3


def test_random_rows_follow_the_filtered_distribution():
    vocab, draws = 8, 6000
    logits = logits_for(1, vocab, seed=8) * 0.5
    for params in (SamplingParams(temperature=0.7), SamplingParams(temperature=1.2, top_k=3), SamplingParams(top_p=0.6)):
        scaled = logits[0] / params.temperature
        order = scaled.argsort(descending=True)
        keep = torch.zeros(vocab, dtype=torch.bool)
        probs_sorted = scaled[order].softmax(-1)
        mass_before = probs_sorted.cumsum(0) - probs_sorted
        allowed = (mass_before < params.top_p) & (torch.arange(vocab) < (params.top_k if params.top_k > 0 else vocab))
        keep[order[allowed]] = True
        expected = scaled.masked_fill(~keep, float("-inf")).softmax(-1)
        generator = torch.Generator().manual_seed(1)
        rows = [SamplingRow(params, generator)] * 1
        counts = torch.zeros(vocab)
        metadata = sampling_metadata_from_rows(rows, vocab, torch.device("cpu"))
        for _ in range(draws):
            counts[sample_on_device(logits.clone(), metadata)[0]] += 1
        frequency = counts / draws
        assert frequency[~keep].sum() == 0
        assert (frequency - expected).abs().max() < 0.025


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_never_synchronises_the_host():
    rows = [
        SamplingRow(SamplingParams(temperature=0), None, (3,)),
        SamplingRow(SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=1), torch.Generator("cuda").manual_seed(1)),
        SamplingRow(SamplingParams(temperature=1.0), None),
    ]
    metadata = sampling_metadata_from_rows(rows, 1000, torch.device("cuda"))
    logits = torch.randn(3, 1000, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sample_on_device(logits, metadata)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.shape == (3,) and tokens.device.type == "cuda"
