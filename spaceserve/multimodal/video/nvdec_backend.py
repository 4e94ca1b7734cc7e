"""GPU decoding with torchcodec's NVDEC backend: frames are decoded and converted to RGB on the GPU and stay there.

RGB24 here is torchcodec's conversion on the GPU (its own CUDA kernel on NVDEC's NV12/P016 output, using the colour
matrix and range the stream declares). It may differ from PyAV's swscale conversion by a few levels; that is
expected across backends. Within this backend a frame gets the same pixels whichever session decodes it: a session
seeks (exact mode, torchcodec's own scan of the packets) to the keyframe of the first GOP of its chunk and every
frame it keeps depends only on frames from that keyframe on (GOP chunks never split a GOP; in an open GOP the
frames that reference the previous GOP are shown before their keyframe, so they belong to the previous chunk).
tests/multimodal/video/test_nvdec.py and the decode benchmark check sequential against GOP-parallel bit for bit.

torchcodec is imported lazily; when it is missing, cannot load FFmpeg's libraries, or the codec/profile is one
NVDEC cannot decode, callers get the reason as a string and fall back to the CPU.
"""

from __future__ import annotations

import functools

import torch

from spaceserve.multimodal.video.gop import PacketIndex

# Pixel formats NVDEC decodes per codec (4:2:0, 8 or 10 bit; 4:4:4 and 4:2:2 vary by GPU and are left to the CPU).
NVDEC_PIXEL_FORMATS: dict[str, frozenset[str]] = {
    "h264": frozenset({"yuv420p", "yuvj420p"}),
    "hevc": frozenset({"yuv420p", "yuvj420p", "yuv420p10le"}),
    "av1": frozenset({"yuv420p", "yuv420p10le"}),
    "vp9": frozenset({"yuv420p", "yuv420p10le"}),
    "vp8": frozenset({"yuv420p"}),
    "mpeg2video": frozenset({"yuv420p"}),
    "mpeg4": frozenset({"yuv420p"}),
}


class NvdecUnavailable(RuntimeError):
    """NVDEC cannot decode this video here; the message is the reason to log."""


@functools.cache
def _import_torchcodec():
    try:
        from torchcodec.decoders import VideoDecoder
    except Exception as exc:  # ImportError, or OSError/RuntimeError when FFmpeg's shared libraries are missing
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"torchcodec cannot be imported ({type(exc).__name__}: {first_line[:300]})"
    return VideoDecoder, None


def torchcodec_version() -> str | None:
    try:
        import torchcodec
    except Exception:
        return None
    return getattr(torchcodec, "__version__", "unknown")


def nvdec_unavailable_reason(index: PacketIndex, device: torch.device) -> str | None:
    """None when NVDEC should be able to decode this stream on `device`, else why not."""
    if device.type != "cuda":
        return f"NVDEC needs a CUDA device, got {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    formats = NVDEC_PIXEL_FORMATS.get(index.codec)
    if formats is None:
        return f"NVDEC does not decode codec {index.codec!r}"
    if index.pix_fmt not in formats:
        return f"NVDEC does not decode {index.codec} with pixel format {index.pix_fmt} (profile {index.profile})"
    _, reason = _import_torchcodec()
    return reason


def decode_frames_nvdec(
    source: str | bytes, index: PacketIndex, frame_indices: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """One NVDEC session decodes `frame_indices` on `device`: a [T, H, W, 3] uint8 tensor on that device."""
    return decode_with(open_decoder(source, index, device), index, frame_indices, device)


def open_decoder(source: str | bytes, index: PacketIndex, device: torch.device):
    """A torchcodec decoder for one session on `device`, reused for every frame that session decodes of this video.

    Raises NvdecUnavailable when torchcodec would silently fall back to its CPU path or disagrees with the
    packet index about the frame count (numbering would then differ from the CPU backend's).
    """
    video_decoder_class, reason = _import_torchcodec()
    if reason is not None:
        raise NvdecUnavailable(reason)
    with torch.cuda.device(device):
        try:
            decoder = video_decoder_class(
                source, device=str(device), dimension_order="NHWC", seek_mode="exact", num_ffmpeg_threads=1
            )
        except (RuntimeError, ValueError) as exc:
            raise NvdecUnavailable(f"torchcodec could not open the video on {device}: {exc}") from None
        fallback = decoder.cpu_fallback
        if fallback:
            raise NvdecUnavailable(f"torchcodec would decode on the CPU: {fallback}")
        if len(decoder) != index.num_frames:
            raise NvdecUnavailable(
                f"torchcodec counts {len(decoder)} frames, the packet index {index.num_frames}; numbering would differ"
            )
    return decoder


def decode_with(decoder, index: PacketIndex, frame_indices: tuple[int, ...] | list[int], device: torch.device):
    """Frames (ascending indices) from an open decoder: [T, H, W, 3] uint8 on its device. Asking for a chunk's
    frames a few at a time decodes exactly what one call would (torchcodec seeks, or decodes on, frame by frame)."""
    with torch.cuda.device(device):
        try:
            frames = decoder.get_frames_at(list(frame_indices)).data
        except RuntimeError as exc:
            raise NvdecUnavailable(f"NVDEC decoding failed on {device}: {exc}") from None
    if frames.shape[1:] != (index.height, index.width, 3):
        raise NvdecUnavailable(f"torchcodec returned frames of shape {tuple(frames.shape)}, expected NHWC RGB")
    return frames.contiguous()
