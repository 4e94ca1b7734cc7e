"""A published configuration runs end to end with dummy weights and no download (the 2B model on the CPU)."""

import numpy as np
import torch

from spaceserve import SamplingParams
from tests.llm_factory import make_llm


def test_qwen2_vl_2b_preset_generates_with_dummy_weights():
    llm = make_llm("Qwen/Qwen2-VL-2B-Instruct", load_format="dummy", max_model_len=512, max_num_seqs=4)
    model = llm.llm_engine.core.model
    assert next(model.parameters()).dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) > 2_000_000_000
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    prompt = {"prompt": "<|vision_start|><|image_pad|><|vision_end|>What is this?", "multi_modal_data": {"image": image}}
    output = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert len(output.token_ids) == 3 and output.finish_reason == "length"
    assert all(0 <= t < 151936 for t in output.token_ids)
    llm.llm_engine.check_idle_integrity()
