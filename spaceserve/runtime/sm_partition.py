"""Disjoint SM partitions for `--multiplex space`: the vision encoder and the language model each get their own SMs.

Why one split through the driver: `torch.cuda.green_contexts.GreenContext.create(num_sms=N)` always takes the
first N SMs, so two contexts made that way overlap. Instead the device's SM resource is split once
(cuDevSmResourceSplitByCount) into a group for the encoder and the remainder for the language model; each side
gets a green context and a stream in it, wrapped for PyTorch as an ExternalStream. Kernels issued on a stream
run only on its context's SMs; memory is shared with the primary context, so tensors move freely between sides.

A CUDA graph runs on the SMs of the stream it was captured on, so the runner captures one set of decode graphs
per LM stream it switches between. Green contexts and their streams are never destroyed: destroying a context
detaches its streams, and captured graphs may still reference them, so they live as long as the process.

Every driver call goes through an injectable `driver` module (cuda.bindings.driver by default) and streams are
wrapped by an injectable `wrap_stream`, so all of this is testable without a GPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from spaceserve.core.errors import ConfigError, SpaceServeError
from spaceserve.runtime.device import device_with_index

MIN_DRIVER_VERSION = 12040  # CUDA 12.4: the first driver with green contexts
MIN_COMPUTE_CAPABILITY = (6, 0)  # the CUDA docs give SM split granularities from compute capability 6.x on

# wrap_stream(raw CUstream handle as int, device) -> a torch stream issuing work on that handle
StreamWrapper = Callable[[int, torch.device], torch.cuda.Stream]


class PartitionUnavailableError(ConfigError):
    """Disjoint SM partitions cannot be made on this device; the message says why."""


class CudaDriverCallError(SpaceServeError, RuntimeError):
    """A CUDA driver call returned an error; the message names the call and the CUDA error."""


def load_cuda_driver() -> Any:
    from cuda.bindings import driver

    return driver


def wrap_external_stream(handle: int, device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.ExternalStream(handle, device=device)


def _call(driver: Any, name: str, *args: Any) -> Any:
    """driver.<name>(*args), checked: returns the outputs after the CUresult (one value, a tuple, or None)."""
    err, *outputs = getattr(driver, name)(*args)
    if err != driver.CUresult.CUDA_SUCCESS:
        name_err, error_name = driver.cuGetErrorName(err)
        if name_err == driver.CUresult.CUDA_SUCCESS and error_name:
            error_name = error_name.decode() if isinstance(error_name, bytes) else str(error_name)
        else:
            error_name = repr(err)
        raise CudaDriverCallError(f"CUDA driver call {name} failed with {error_name}")
    if not outputs:
        return None
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _normalize(device: torch.device | str) -> torch.device:
    return device_with_index(device, lambda: torch.cuda.current_device() if torch.cuda.is_available() else 0)


def _init_driver(driver: Any) -> None:
    try:
        _call(driver, "cuInit", 0)
    except RuntimeError as exc:  # also cuda-bindings' own RuntimeError when libcuda.so cannot be loaded
        raise PartitionUnavailableError(f"the CUDA driver could not be initialised ({exc})") from exc


def _device_sm_resource(driver: Any, device: torch.device) -> tuple[Any, Any]:
    cu_device = _call(driver, "cuDeviceGet", device.index)
    sm_resource = _call(driver, "cuDeviceGetDevResource", cu_device, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM)
    return cu_device, sm_resource


def green_context_support(device: torch.device | str, *, driver: Any = None) -> str | None:
    """None when disjoint SM partitions can be made on `device`, else the reason in words."""
    device = _normalize(device)
    if device.type != "cuda":
        return f"{device} is not a CUDA device"
    if driver is None:
        try:
            driver = load_cuda_driver()
        except ImportError as exc:
            return f"cuda-bindings (cuda-python) is not importable ({exc}); install cuda-bindings >= 12.4"
    try:
        _init_driver(driver)
        version = _call(driver, "cuDriverGetVersion")
        if version < MIN_DRIVER_VERSION:
            return (f"the CUDA driver supports CUDA {version // 1000}.{version % 1000 // 10}; green contexts need "
                    f"{MIN_DRIVER_VERSION // 1000}.{MIN_DRIVER_VERSION % 1000 // 10} or newer")
        cu_device, sm_resource = _device_sm_resource(driver, device)
        attribute = driver.CUdevice_attribute
        capability = (_call(driver, "cuDeviceGetAttribute", attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                            cu_device),
                      _call(driver, "cuDeviceGetAttribute", attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                            cu_device))
        if capability < MIN_COMPUTE_CAPABILITY:
            return (f"{device} has compute capability {capability[0]}.{capability[1]}; green contexts need "
                    f"{MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or newer")
        # A trial split asking for the smallest group: it must succeed and leave SMs over.
        _, groups_made, remaining = _call(driver, "cuDevSmResourceSplitByCount", 1, sm_resource, 0, 1)
        if groups_made < 1 or remaining.sm.smCount < 1:
            return f"{device}'s {sm_resource.sm.smCount} SMs cannot be split into two partitions"
    except (PartitionUnavailableError, CudaDriverCallError) as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class SMPartition:
    encoder_sms: int  # SMs actually granted to the encoder group
    lm_sms: int  # the remainder, given to the language model
    total_sms: int
    encoder_stream: torch.cuda.Stream  # an ExternalStream on the encoder's green context
    lm_stream: torch.cuda.Stream  # an ExternalStream on the remainder's green context
    prefill_stream: torch.cuda.Stream | None = None
    """A second stream on the encoder's green context: prefill steps on the encoder's side (engine/prefill_lane.py)."""


class SMPartitionManager:
    """Splits one device's SMs; each requested encoder count is split once per process and cached."""

    def __init__(self, device: torch.device | str, *, driver: Any = None,
                 wrap_stream: StreamWrapper = wrap_external_stream) -> None:
        self.device = _normalize(device)
        if self.device.type != "cuda":
            raise PartitionUnavailableError(f"{self.device} is not a CUDA device")
        if driver is None:
            try:
                driver = load_cuda_driver()
            except ImportError as exc:
                raise PartitionUnavailableError(f"cuda-bindings (cuda-python) is not importable ({exc})") from exc
        self._driver = driver
        self._wrap_stream = wrap_stream
        _init_driver(driver)
        self._cu_device, self._sm_resource = _device_sm_resource(driver, self.device)
        # Green contexts retain the primary context anyway; making it active first (it is the one PyTorch
        # uses) avoids initialising it inside cuGreenCtxCreate. Never released: it lives as long as the process.
        _call(driver, "cuDevicePrimaryCtxRetain", self._cu_device)
        self.total_sms: int = self._sm_resource.sm.smCount
        self._partitions: dict[int, SMPartition] = {}
        self._green_contexts: list[tuple[Any, Any]] = []  # (context, stream) handles kept for the process lifetime
        self._lock = threading.Lock()

    def partition(self, encoder_sms: int) -> SMPartition:
        """The split giving the encoder `encoder_sms` SMs rounded up to the device's granularity (what the
        driver grants); the language model gets the rest. Cached: the same count returns the same object."""
        if isinstance(encoder_sms, bool) or not isinstance(encoder_sms, int):
            raise ConfigError(f"encoder_sms must be an int, got {encoder_sms!r}")
        if encoder_sms < 1:
            raise ConfigError(f"encoder_sms must be at least 1, got {encoder_sms}")
        if encoder_sms >= self.total_sms:
            raise ConfigError(f"encoder_sms={encoder_sms} leaves the language model no SMs: {self.device} has "
                              f"{self.total_sms}")
        with self._lock:
            cached = self._partitions.get(encoder_sms)
            if cached is None:
                cached = self._partitions[encoder_sms] = self._split(encoder_sms)
            return cached

    def grantable_encoder_sms(self) -> tuple[int, ...]:
        """Every encoder SM count a split can grant while leaving the LM some SMs, smallest first (8, 16, ..., 128
        on a 132-SM Hopper). Probes the driver's split only: no context is made."""
        counts: list[int] = []
        ask = 1
        while ask < self.total_sms:
            groups, groups_made, remaining = _call(self._driver, "cuDevSmResourceSplitByCount", 1,
                                                   self._sm_resource, 0, ask)
            if groups_made < 1 or remaining.sm.smCount < 1 or groups[0].sm.smCount < ask:
                break
            counts.append(groups[0].sm.smCount)
            ask = counts[-1] + 1
        return tuple(counts)

    def _split(self, encoder_sms: int) -> SMPartition:
        groups, groups_made, remaining = _call(self._driver, "cuDevSmResourceSplitByCount", 1, self._sm_resource,
                                               0, encoder_sms)
        if groups_made < 1 or groups[0].sm.smCount < 1:
            raise ConfigError(f"encoder_sms={encoder_sms} rounds up past the {self.total_sms} SMs of {self.device}; "
                              f"ask for fewer")
        granted = groups[0].sm.smCount
        if remaining.sm.smCount < 1:
            raise ConfigError(f"encoder_sms={encoder_sms} rounds up to {granted} of {self.device}'s "
                              f"{self.total_sms} SMs, leaving the language model none; ask for fewer")
        encoder_stream, prefill_stream = self._streams_on_green_context(groups[0], 2)
        (lm_stream,) = self._streams_on_green_context(remaining, 1)
        return SMPartition(encoder_sms=granted, lm_sms=remaining.sm.smCount, total_sms=self.total_sms,
                           encoder_stream=encoder_stream, lm_stream=lm_stream, prefill_stream=prefill_stream)

    def _streams_on_green_context(self, sm_resource: Any, count: int) -> list[torch.cuda.Stream]:
        driver = self._driver
        desc = _call(driver, "cuDevResourceGenerateDesc", [sm_resource], 1)
        context = _call(driver, "cuGreenCtxCreate", desc, self._cu_device,
                        driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM)
        streams = []
        for _ in range(count):
            stream = _call(driver, "cuGreenCtxStreamCreate", context, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, 0)
            self._green_contexts.append((context, stream))
            streams.append(self._wrap_stream(int(stream), self.device))
        return streams


_managers: dict[torch.device, SMPartitionManager] = {}
_managers_lock = threading.Lock()


def get_partition_manager(device: torch.device | str, *, driver: Any = None,
                          wrap_stream: StreamWrapper = wrap_external_stream) -> SMPartitionManager:
    """The process's one manager for `device`; PartitionUnavailableError with the reason when partitions cannot
    be made. `driver` and `wrap_stream` only matter when the manager is first made."""
    device = _normalize(device)
    with _managers_lock:
        manager = _managers.get(device)
        if manager is None:
            reason = green_context_support(device, driver=driver)
            if reason is not None:
                raise PartitionUnavailableError(f"--multiplex space needs disjoint SM partitions (green contexts), "
                                                f"which {device} cannot give: {reason}")
            manager = _managers[device] = SMPartitionManager(device, driver=driver, wrap_stream=wrap_stream)
        return manager
