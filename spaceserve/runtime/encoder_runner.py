"""Runs the vision tower over one EncoderBatch and returns each image's embedding rows by content hash.

Images the front left unprocessed (RawImage: uint8 pixels and a target size) are resized, normalised and
patchified here, on the device and the stream the batch runs on, just before the tower: on a GPU that takes
well under a millisecond where the front's CPU would spend tens, and the front sends 3 bytes a pixel instead of
the float32 patches.

A batch runs on the caller's current stream (the LM's in time mode, the worker's stream or partition otherwise).
With vision CUDA graphs (vision_graphs.py) a batch that fits the largest bucket replays the graph set captured on
that stream; otherwise, or past the largest bucket, or on a stream without a set, the tower runs eagerly.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from spaceserve.core.multimodal import RawImage
from spaceserve.core.scheduler_output import EncoderBatch
from spaceserve.models.config import ImageProcessorConfig
from spaceserve.models.vision_common import check_vision_grids
from spaceserve.multimodal.image import pixels_to_patches
from spaceserve.runtime.vision_graphs import VisionCUDAGraphs, check_item_pixels


class EncoderRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        image_config: ImageProcessorConfig,
        vision_graphs: VisionCUDAGraphs | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.image_config = image_config
        self.vision_graphs = vision_graphs
        self.num_graphed_batches = 0
        self.num_eager_batches = 0

    def attach_vision_graphs(self, vision_graphs: VisionCUDAGraphs | None) -> None:
        """Use these graphs from the next batch on (None: run eagerly)."""
        self.vision_graphs = vision_graphs

    @torch.inference_mode()
    def execute(self, batch: EncoderBatch) -> dict[str, torch.Tensor]:
        embeddings = self._embed(batch)
        rows = embeddings.split([item.num_tokens for item in batch.items])
        return {item.mm_hash: row for item, row in zip(batch.items, rows)}

    def _embed(self, batch: EncoderBatch) -> torch.Tensor:
        # patch rows where they are: preprocessed images on the host, NVDEC-decoded videos and raw images
        # preprocessed here on the device
        pixel_values = [self._patches(item.pixel_values) for item in batch.items]
        graph_set = None
        if self.vision_graphs is not None:
            stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
            graph_set = self.vision_graphs.for_stream(stream)
        if graph_set is not None:
            vision = self.model.config.vision
            grids = check_vision_grids(np.array([item.grid_thw for item in batch.items]).reshape(-1, 3), vision)
            check_item_pixels(pixel_values, grids, vision.patch_dim)
            size = graph_set.bucket_for(int(grids.prod(axis=1).sum()))
            if size is not None:
                self.num_graphed_batches += 1
                return graph_set.run(size, pixel_values, grids)
        self.num_eager_batches += 1
        pixels = torch.cat(pixel_values)
        # kept on the host: the towers read it there, and on the device that read would sync
        grid_thw = torch.tensor([item.grid_thw for item in batch.items], dtype=torch.long)
        return self.model.encode_images(pixels, grid_thw)

    def _patches(self, pixels: torch.Tensor | RawImage) -> torch.Tensor:
        if isinstance(pixels, RawImage):
            with warnings.catch_warnings():  # pixels received from the front are read-only; they are only read
                warnings.simplefilter("ignore", UserWarning)
                rgb = torch.as_tensor(pixels.rgb)
            return pixels_to_patches(self._to_device(rgb), pixels.height, pixels.width, self.image_config)
        return self._to_device(pixels)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Host rows go through pinned memory: a copy from pageable memory blocks the host until it is done (and
        behind whatever the stream runs), which the encoder's launch must never do beside a running LM step."""
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device, non_blocking=True)
