"""`cuda` without an index names the calling thread's current device; code that hands a device to another thread or
process (where "current" differs) resolves the index first."""

from __future__ import annotations

from collections.abc import Callable

import torch


def device_with_index(device: torch.device | str, current_index: Callable[[], int] | None = None) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", (current_index or torch.cuda.current_device)())
