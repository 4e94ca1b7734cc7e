"""Runs the vision tower over one EncoderBatch and returns each image's embedding rows by content hash.

Images the front left unprocessed (RawImage: uint8 pixels and a target size) are resized, normalised and
patchified here, on the device and the stream the batch runs on, just before the tower: on a GPU that takes
well under a millisecond where the front's CPU would spend tens, and the front sends 3 bytes a pixel instead of
the float32 patches.
"""

from __future__ import annotations

import warnings

import torch

from spaceserve.core.multimodal import RawImage
from spaceserve.core.scheduler_output import EncoderBatch
from spaceserve.models.config import ImageProcessorConfig
from spaceserve.multimodal.image import pixels_to_patches


class EncoderRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, image_config: ImageProcessorConfig) -> None:
        self.model = model
        self.device = device
        self.image_config = image_config

    @torch.inference_mode()
    def execute(self, batch: EncoderBatch) -> dict[str, torch.Tensor]:
        pixel_values = torch.cat([self._pixel_values(item.pixel_values) for item in batch.items])
        # kept on the host: the towers read it there (.tolist()), and on the device that read would sync
        grid_thw = torch.tensor([item.grid_thw for item in batch.items], dtype=torch.long)
        embeddings = self.model.encode_images(pixel_values, grid_thw)
        rows = embeddings.split([item.num_tokens for item in batch.items])
        return {item.mm_hash: row for item, row in zip(batch.items, rows)}

    def _pixel_values(self, pixels: torch.Tensor | RawImage) -> torch.Tensor:
        # preprocessed images come from the host, NVDEC-decoded videos already sit on the device
        if isinstance(pixels, RawImage):
            with warnings.catch_warnings():  # pixels received from the front are read-only; they are only read
                warnings.simplefilter("ignore", UserWarning)
                rgb = torch.as_tensor(pixels.rgb)
            rgb = rgb.to(self.device, non_blocking=True)
            return pixels_to_patches(rgb, pixels.height, pixels.width, self.image_config)
        return pixels.to(self.device, non_blocking=True)
