"""The error every video decoding path raises for input it cannot turn into frames."""

from __future__ import annotations

from spaceserve.core.errors import InvalidInputError


class InvalidVideoError(InvalidInputError):
    """Bytes that are not a video, a truncated file, no decodable video stream, a codec nothing here can decode,
    a zero or unknown frame rate: the message names the problem."""
