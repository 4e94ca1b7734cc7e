"""Content hashes of images, the keys under which processed images and their encoder outputs are cached."""

from __future__ import annotations

import hashlib
import json

from PIL import Image


def hash_image(image: Image.Image, **processing_kwargs: int | float | str | None) -> str:
    """Hex sha256 over the image's mode, size, palette and pixel bytes plus the processing parameters.

    Pass every parameter that changes the processed output (e.g. ``min_pixels``, ``max_pixels``); a parameter
    given as None counts as absent, so callers should pass effective values rather than None-means-default.
    """
    header = {
        "mode": image.mode,
        "size": list(image.size),
        "processing": {key: value for key, value in sorted(processing_kwargs.items()) if value is not None},
    }
    encoded_header = json.dumps(header, sort_keys=True).encode()
    digest = hashlib.sha256()
    # Length-prefix the header so no header/pixel split of the same byte stream can collide.
    digest.update(len(encoded_header).to_bytes(8, "little"))
    digest.update(encoded_header)
    palette = image.getpalette() if image.mode in ("P", "PA") else None
    palette_bytes = bytes(palette) if palette is not None else b""
    digest.update(len(palette_bytes).to_bytes(8, "little"))
    digest.update(palette_bytes)
    digest.update(image.tobytes())
    return digest.hexdigest()


def hash_video(content: bytes | memoryview, kind: str, **settings: int | float | str | bool | None) -> str:
    """Hex sha256 of a video: its encoded bytes (kind "bytes") or raw frame bytes with their shape (kind
    "frames:TxHxWxC"), plus every sampling and processing setting that changes what the encoder sees."""
    header = {"video": kind, "processing": {key: value for key, value in sorted(settings.items()) if value is not None}}
    encoded_header = json.dumps(header, sort_keys=True).encode()
    digest = hashlib.sha256()
    digest.update(len(encoded_header).to_bytes(8, "little"))
    digest.update(encoded_header)
    digest.update(content)
    return digest.hexdigest()
