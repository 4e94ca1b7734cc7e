"""Video inputs: decoding (PyAV on the CPU, NVDEC on CUDA, GOP-parallel FlashCodec), synthetic clips, and the
Qwen2-VL frame sampling and preprocessing (sampling.py, processor.py)."""

from spaceserve.multimodal.video.decode import (
    DecodedFrames,
    IndexedVideo,
    VideoMetadata,
    decode_frames,
    index_video,
    probe_video,
)
from spaceserve.multimodal.video.errors import InvalidVideoError
from spaceserve.multimodal.video.decoder_pool import DecoderPoolConfig, VideoDecoderPool
from spaceserve.multimodal.video.pyav_backend import PyAVOptions
from spaceserve.multimodal.video.synthetic import make_clip

__all__ = [
    "DecodedFrames",
    "DecoderPoolConfig",
    "IndexedVideo",
    "InvalidVideoError",
    "PyAVOptions",
    "VideoDecoderPool",
    "VideoMetadata",
    "decode_frames",
    "index_video",
    "make_clip",
    "probe_video",
]
