"""Shared helpers for greedy parity against transformers: random prompts with images, and the reference run."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from spaceserve.models.resolve import PRESETS_DIR

VISION_START, VISION_END, IMAGE_PAD = 265, 266, 268
MAX_NEW_TOKENS = 12


def random_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_prompt(rng: np.random.Generator, num_images: int, text_len: int = 9) -> list[int]:
    """Random text token ids with one `<|vision_start|><|image_pad|><|vision_end|>` per image spread among them."""
    ids: list[int] = [int(t) for t in rng.integers(0, 256, text_len)]
    for _ in range(num_images):
        ids += [VISION_START, IMAGE_PAD, VISION_END] + [int(t) for t in rng.integers(0, 256, text_len)]
    return ids


def reference_processor():
    """transformers' PIL processor at the tiny preset's pixel limits. The limits go in per call: passing them to
    the constructor in transformers 5.17 rewrites the class-wide default for every later instance."""
    import json

    raw = json.loads((PRESETS_DIR / "tiny-qwen2-vl" / "preprocessor_config.json").read_text())
    size = {"shortest_edge": raw["min_pixels"], "longest_edge": raw["max_pixels"]}
    processor = Qwen2VLImageProcessorPil()
    return lambda images: processor(images=images, size=size, return_tensors="pt")


@torch.inference_mode()
def reference_generate(model, processor, prompt_ids: list[int], images: list[Image.Image]) -> list[int]:
    """transformers' greedy generate on its own preprocessing, with each image pad expanded independently."""
    kwargs = {}
    expanded = list(prompt_ids)
    if images:
        processed = processor(images)
        grids = processed["image_grid_thw"]
        expanded = []
        grid_iter = iter(grids.tolist())
        for token in prompt_ids:
            count = int(np.prod(next(grid_iter))) // 4 if token == IMAGE_PAD else 1
            expanded += [token] * count
        kwargs = {"pixel_values": processed["pixel_values"], "image_grid_thw": grids}
    input_ids = torch.tensor([expanded])
    if images:  # transformers 5 builds M-RoPE positions from these type ids (1 = image token)
        kwargs["mm_token_type_ids"] = (input_ids == IMAGE_PAD).int()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        **kwargs,
    )
    return out[0, input_ids.shape[1] :].tolist()
