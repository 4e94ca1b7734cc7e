import torch

from spaceserve.core import SamplingParams
from spaceserve.layers.sampler import SamplingRow, sample


def random_logits(rows, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_takes_the_argmax_and_respects_banned_tokens():
    logits = random_logits(3)
    top = logits.argmax(-1).tolist()
    rows = [SamplingRow(SamplingParams(temperature=0), None), SamplingRow(SamplingParams(temperature=0), None, (top[1],))]
    rows.append(SamplingRow(SamplingParams(temperature=0), None))
    tokens = sample(logits.clone(), rows)
    assert tokens[0] == top[0] and tokens[2] == top[2]
    assert tokens[1] != top[1] and tokens[1] == logits[1].topk(2).indices[1].item()


def test_seeded_rows_reproduce_whatever_else_is_in_the_batch():
    logits = random_logits(4, seed=1)
    params = SamplingParams(temperature=1.0, seed=123)

    def draw(batch_rows):
        gen = torch.Generator().manual_seed(123)
        rows = [SamplingRow(params, gen)] + [SamplingRow(SamplingParams(temperature=0.7), None)] * (batch_rows - 1)
        return [sample(logits[:batch_rows].clone(), rows)[0] for _ in range(20)]

    alone = [sample(logits[:1].clone(), [SamplingRow(params, g)])[0] for g in [torch.Generator().manual_seed(123)] for _ in range(20)]
    assert draw(4) == alone
    assert len(set(alone)) > 1


def test_top_k_and_top_p_restrict_the_support():
    logits = random_logits(1, vocab=30, seed=2)
    order = logits[0].argsort(descending=True).tolist()
    gen = torch.Generator().manual_seed(0)
    top_k = {sample(logits.clone(), [SamplingRow(SamplingParams(temperature=5.0, top_k=3), gen)])[0] for _ in range(200)}
    assert top_k <= set(order[:3]) and len(top_k) == 3
    probs = logits[0].softmax(-1)[order]
    keep = int((probs.cumsum(0) - probs < 0.5).sum())
    top_p = {sample(logits.clone(), [SamplingRow(SamplingParams(temperature=1.0, top_p=0.5), gen)])[0] for _ in range(300)}
    assert top_p <= set(order[:keep])
    assert sample(logits.clone(), [SamplingRow(SamplingParams(temperature=1.0, top_k=1), gen)])[0] == order[0]
