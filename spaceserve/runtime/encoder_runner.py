"""Runs the vision tower over one EncoderBatch and returns each image's embedding rows by content hash."""

from __future__ import annotations

import torch

from spaceserve.core.scheduler_output import EncoderBatch


class EncoderRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device

    @torch.inference_mode()
    def execute(self, batch: EncoderBatch) -> dict[str, torch.Tensor]:
        # images are preprocessed on the host, videos decoded with NVDEC already sit on the device
        pixel_values = torch.cat([item.pixel_values.to(self.device, non_blocking=True) for item in batch.items])
        # kept on the host: the towers read it there (.tolist()), and on the device that read would sync
        grid_thw = torch.tensor([item.grid_thw for item in batch.items], dtype=torch.long)
        embeddings = self.model.encode_images(pixel_values, grid_thw)
        rows = embeddings.split([item.num_tokens for item in batch.items])
        return {item.mm_hash: row for item, row in zip(batch.items, rows)}
