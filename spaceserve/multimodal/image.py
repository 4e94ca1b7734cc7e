"""Image loading and Qwen2-VL preprocessing in torch.

`preprocess_image` reproduces transformers' PIL-based ``Qwen2VLImageProcessorPil`` bit for bit, on CPU and on
CUDA alike: the bicubic resize is Pillow's fixed-point algorithm written with integer tensor ops (torch's own
uint8 antialiased bicubic differs from Pillow by a few levels), and rescale+normalise is a per-channel table
computed with transformers' exact float64-then-float32 arithmetic.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import PIL
import torch
from PIL import Image, UnidentifiedImageError

from spaceserve.core.errors import InvalidInputError
from spaceserve.core.multimodal import RawImage
from spaceserve.models.config import ImageProcessorConfig

ImageInput = Image.Image | np.ndarray | str | os.PathLike[str] | bytes | bytearray | memoryview

DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
MAX_ASPECT_RATIO = 200
_PIL_PRECISION_BITS = 22  # Pillow's fixed-point fraction bits for 8-bit images: 32 - 8 - 2
_PIL_ROUNDING = 1 << (_PIL_PRECISION_BITS - 1)  # added before the shift: round half up
_PILLOW_VERSION = tuple(int(part) for part in PIL.__version__.split(".")[:2])


def load_image(obj: ImageInput, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Turn a PIL image, numpy array, file path or encoded bytes into a validated RGB PIL image."""
    if isinstance(obj, Image.Image):
        image = obj
    elif isinstance(obj, np.ndarray):
        image = _image_from_array(obj, max_image_pixels)
    elif isinstance(obj, (str, os.PathLike)):
        image = _decode(_read_file(obj), max_image_pixels)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        image = _decode(bytes(obj), max_image_pixels)
    else:
        raise InvalidInputError(f"expected a PIL image, numpy array, path or bytes, got {type(obj).__name__}")
    _check_dimensions(image.width, image.height, max_image_pixels)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInputError(f"could not decode image: {exc}") from None
    if image.mode == "RGB":
        return image
    # transformers' convert_to_rgb is a plain convert: alpha is dropped, not composited onto white.
    try:
        return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot convert an image of mode {image.mode} to RGB: {exc}") from None


def _check_dimensions(width: int, height: int, max_image_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"image has zero size ({width}x{height})")
    if width * height > max_image_pixels:
        raise InvalidInputError(
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_image_pixels} pixels"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise InvalidInputError(f"image aspect ratio {ratio:.1f} ({width}x{height}) exceeds {MAX_ASPECT_RATIO}")


def _read_file(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise InvalidInputError(f"image file not found: {os.fspath(path)}") from None
    except OSError as exc:
        raise InvalidInputError(f"cannot read image file {os.fspath(path)}: {exc.strerror or exc}") from None


def _decode(data: bytes, max_image_pixels: int) -> Image.Image:
    if not data:
        raise InvalidInputError("image bytes are empty")
    with warnings.catch_warnings():
        # Our own max_image_pixels is the limit that matters; Pillow's softer warning is noise here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))  # lazy: reads only the header
        except Image.DecompressionBombError as exc:
            raise InvalidInputError(f"image is too large to decode: {exc}") from None
        except UnidentifiedImageError:
            raise InvalidInputError("could not decode image bytes: not a recognised image format") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise InvalidInputError(f"could not decode image bytes: {exc}") from None
    _check_dimensions(image.width, image.height, max_image_pixels)
    return image


def _image_from_array(array: np.ndarray, max_image_pixels: int) -> Image.Image:
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise InvalidInputError(f"expected an image array of shape (H, W) or (H, W, 3), got shape {array.shape}")
    _check_dimensions(array.shape[1], array.shape[0], max_image_pixels)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise InvalidInputError("a float image array must hold finite values in [0, 1]")
        array = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise InvalidInputError(f"expected a uint8 or float image array, got dtype {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) Qwen2-VL resizes to: multiples of `factor`, pixel count within [min, max], aspect kept.

    Same arithmetic as transformers' ``smart_resize`` (Python's round-half-to-even included).
    """
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InvalidInputError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {ratio}")
    resized_h = round(height / factor) * factor
    resized_w = round(width / factor) * factor
    if resized_h * resized_w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        resized_h = max(factor, math.floor(height / beta / factor) * factor)
        resized_w = max(factor, math.floor(width / beta / factor) * factor)
    elif resized_h * resized_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        resized_h = math.ceil(height * beta / factor) * factor
        resized_w = math.ceil(width * beta / factor) * factor
    return resized_h, resized_w


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: torch.Tensor | RawImage
    """float32 [grid_t*grid_h*grid_w, 3 * temporal_patch_size * patch_size**2], or the uint8 pixels and target size
    for the engine core to preprocess on its device (pixels_to_patches)."""
    grid_thw: tuple[int, int, int]
    merge_size: int

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    @property
    def num_tokens(self) -> int:
        return self.num_patches // self.merge_size**2


def preprocess_image(
    image: ImageInput,
    cfg: ImageProcessorConfig,
    device: torch.device | str | None = None,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> ProcessedImage:
    """Resize, normalise and patchify one image into Qwen2-VL's vision-encoder input.

    `min_pixels` / `max_pixels` override the config per request (vLLM's ``mm_processor_kwargs``).
    """
    min_pixels = cfg.min_pixels if min_pixels is None else min_pixels
    max_pixels = cfg.max_pixels if max_pixels is None else max_pixels
    if not 0 < min_pixels <= max_pixels:
        raise InvalidInputError(
            f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}"
        )
    rgb = load_image(image)
    height, width = smart_resize(rgb.height, rgb.width, cfg.factor, min_pixels, max_pixels)
    pixels = torch.from_numpy(np.array(rgb)).to(device)  # uint8 [H, W, 3]
    return ProcessedImage(pixels_to_patches(pixels, height, width, cfg), image_grid(height, width, cfg), cfg.merge_size)


def image_grid(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of an image resized to height x width."""
    return 1, height // cfg.patch_size, width // cfg.patch_size


def pixels_to_patches(pixels: torch.Tensor, height: int, width: int, cfg: ImageProcessorConfig) -> torch.Tensor:
    """uint8 [H, W, 3] (on any device) -> resized to height x width, normalised and patchified float32 rows on that
    device: the vision encoder's input. The same arithmetic on every device (bit-exact with transformers)."""
    resized = resize_bicubic_like_pillow(pixels, height, width).contiguous()
    table = torch.tensor(_normalization_table(cfg.image_mean, cfg.image_std), device=resized.device)
    channel_offsets = torch.arange(3, device=resized.device) * 256
    normalized = table.view(-1)[resized.long() + channel_offsets]
    return _patchify(normalized, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)


def _patchify(image: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """[H, W, C] -> [grid_h*grid_w, C*temporal*patch*patch], patches ordered merge-window by merge-window."""
    height, width, channels = image.shape
    grid_h, grid_w = height // patch, width // patch
    blocks = image.reshape(grid_h // merge, merge, patch, grid_w // merge, merge, patch, channels)
    # -> (block row, block col, row in block, col in block, channel, pixel row, pixel col)
    blocks = blocks.permute(0, 3, 1, 4, 6, 2, 5)
    # A still image is one frame repeated temporal_patch_size times, inserted between channel and pixel rows.
    frames = blocks.unsqueeze(5).expand(*blocks.shape[:5], temporal, patch, patch)
    return frames.reshape(grid_h * grid_w, channels * temporal * patch * patch)


@lru_cache(maxsize=8)
def _normalization_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[3, 256] float32: the normalised value of each uint8 level, computed as transformers does it."""
    rescaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    table = (rescaled[None, :] - mean32) / std32
    table.setflags(write=False)
    return table


def resize_bicubic_like_pillow(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pillow's ``Image.resize((width, height), BICUBIC)`` of 8-bit [H, W, C] pixels; int32 [height, width, C] out.

    Two passes, each rounded and clipped to 0..255, in Pillow's order; integer arithmetic, so the result is
    the same on every device.
    """
    pixels = pixels.to(torch.int32)
    if _pillow_resizes_height_first(pixels.shape[0], pixels.shape[1], height, width):
        return _resize_width(_resize_height(pixels, height), width)
    return _resize_height(_resize_width(pixels, width), height)


def _pillow_resizes_height_first(in_height: int, in_width: int, height: int, width: int) -> bool:
    """Whether the installed Pillow runs the vertical pass before the horizontal one (it changes the rounding)."""
    if _PILLOW_VERSION >= (13, 0):  # python-pillow/Pillow#9549, in C
        shrink_h, shrink_w = in_height - height, in_width - width
        return shrink_h > 0 and shrink_h > 2 * shrink_w
    if _PILLOW_VERSION >= (12, 2):  # python-pillow/Pillow#9524, in Image.resize: very tall images only
        return in_height > in_width * 100 and height < in_height
    return False


def _resize_height(pixels: torch.Tensor, height: int) -> torch.Tensor:
    return pixels if pixels.shape[0] == height else _resample_rows(pixels.contiguous(), height)


def _resize_width(pixels: torch.Tensor, width: int) -> torch.Tensor:
    if pixels.shape[1] == width:
        return pixels
    return _resample_rows(pixels.transpose(0, 1).contiguous(), width).transpose(0, 1)


def _resample_rows(pixels: torch.Tensor, out_size: int) -> torch.Tensor:
    """Resample along dim 0 of a contiguous int32 [N, M, C] tensor, so every tap gathers whole rows."""
    sources, weights = _pillow_bicubic_taps(pixels.shape[0], out_size)
    device = pixels.device
    sources_t = torch.tensor(sources, device=device)
    weights_t = torch.tensor(weights, device=device).unsqueeze(-1).unsqueeze(-1)
    out = torch.empty((out_size, *pixels.shape[1:]), dtype=torch.int32, device=device)
    # On CPU, column slices of ~1 MB keep each tap's gather and multiply-add in cache (about 4x faster).
    step = pixels.shape[1] if device.type != "cpu" else max(1, (1 << 18) // (out_size * pixels.shape[2]))
    for start in range(0, pixels.shape[1], step):
        columns = pixels[:, start : start + step]
        acc = torch.full((out_size, *columns.shape[1:]), _PIL_ROUNDING, dtype=torch.int32, device=device)
        for tap in range(sources.shape[1]):
            acc += columns.index_select(0, sources_t[:, tap]).mul_(weights_t[:, tap])
        out[:, start : start + step] = (acc >> _PIL_PRECISION_BITS).clamp_(0, 255)
    return out


@lru_cache(maxsize=64)
def _pillow_bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and int32 fixed-point weights, both [out_size, taps], as Pillow's precompute_coeffs.

    Taps past an output pixel's window have weight 0 (their index is clamped into range).
    """
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale  # the bicubic kernel spans +-2 input pixels, widened when downsampling
    num_taps = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    positions = first[:, None] + np.arange(num_taps)[None, :]
    weights = _pillow_bicubic_kernel((positions - center[:, None] + 0.5) * (1.0 / filter_scale))
    weights = np.where(np.arange(num_taps)[None, :] < count[:, None], weights, 0.0)
    total = np.cumsum(weights, axis=1)[:, -1:]  # sequential sum, the order Pillow adds in
    weights = np.divide(weights, total, out=weights.copy(), where=total != 0.0)
    scaled = weights * (1 << _PIL_PRECISION_BITS)
    fixed = np.trunc(np.where(weights < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    sources = np.minimum(positions, in_size - 1)
    fixed.setflags(write=False)
    sources.setflags(write=False)
    return sources, fixed


def _pillow_bicubic_kernel(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution with a = -0.5 (Pillow's choice), same operation order as Pillow."""
    a = -0.5
    x = np.abs(x)
    inner = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    outer = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))
