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


# ---- videos ------------------------------------------------------------------------------------------------

VIDEO_PAD = 269
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def random_frames(rng: np.random.Generator, num_frames: int, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def reference_video_inputs(frames: np.ndarray, min_pixels: int, max_pixels: int) -> tuple[torch.Tensor, list[int]]:
    """pixel_values_videos and grid for given frames, step by step as transformers 5.17's Qwen2VLVideoProcessor
    runs them on the CPU (torchvision's tensor resize there is torch's uint8 antialiased bicubic; then the fused
    float32 rescale+normalise, padding by the last frame, and its patchify)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()[None]  # [1, T, C, H, W]
    height, width = smart_resize(video.shape[-2], video.shape[-1], 28, min_pixels, max_pixels)
    flat = video.reshape(-1, 3, video.shape[-2], video.shape[-1])
    if (height, width) != tuple(flat.shape[-2:]):
        flat = torch.nn.functional.interpolate(
            flat, size=(height, width), mode="bicubic", align_corners=False, antialias=True
        )
    video = flat.reshape(1, -1, 3, height, width)
    mean = torch.tensor(CLIP_MEAN) * (1.0 / (1 / 255))
    std = torch.tensor(CLIP_STD) * (1.0 / (1 / 255))
    video = (video.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    if pad := -video.shape[1] % 2:
        video = torch.cat((video, video[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
    grid_t, grid_h, grid_w = video.shape[1] // 2, height // 14, width // 14
    patches = video.view(1, grid_t, 2, 3, grid_h // 2, 2, 14, grid_w // 2, 2, 14)
    patches = patches.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return patches.reshape(grid_t * grid_h * grid_w, 3 * 2 * 14 * 14), [grid_t, grid_h, grid_w]


@torch.inference_mode()
def reference_generate_mm(
    model,
    prompt_ids: list[int],
    image_inputs: tuple[torch.Tensor, torch.Tensor] | None,
    video_inputs: list[tuple[torch.Tensor, list[int]]],
    second_per_grid_ts: list[float] | None = None,
) -> list[int]:
    """transformers' greedy generate given processed images (pixel_values, image_grid_thw) and videos
    (pixel_values_videos rows and grid each); pads expand to t*h*w/4 tokens, in prompt order per modality."""
    image_grids = iter(image_inputs[1].tolist() if image_inputs is not None else [])
    video_grids = iter([grid for _, grid in video_inputs])
    expanded: list[int] = []
    for token in prompt_ids:
        if token == IMAGE_PAD:
            expanded += [token] * (int(np.prod(next(image_grids))) // 4)
        elif token == VIDEO_PAD:
            expanded += [token] * (int(np.prod(next(video_grids))) // 4)
        else:
            expanded.append(token)
    input_ids = torch.tensor([expanded])
    kwargs = {"mm_token_type_ids": (input_ids == IMAGE_PAD).int() + 2 * (input_ids == VIDEO_PAD).int()}
    if image_inputs is not None:
        kwargs |= {"pixel_values": image_inputs[0], "image_grid_thw": image_inputs[1]}
    if video_inputs:
        kwargs["pixel_values_videos"] = torch.cat([pixels for pixels, _ in video_inputs])
        kwargs["video_grid_thw"] = torch.tensor([grid for _, grid in video_inputs])
    if second_per_grid_ts is not None:
        kwargs["second_per_grid_ts"] = torch.tensor(second_per_grid_ts)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        **kwargs,
    )
    return out[0, input_ids.shape[1] :].tolist()
