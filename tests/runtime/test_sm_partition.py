"""SM partitions: the CPU tests drive a fake CUDA driver shaped like cuda.bindings.driver (Hopper rounding: groups
of at least 8 SMs, multiples of 8); the GPU tests make real green contexts."""

from __future__ import annotations

import enum
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from spaceserve.core.errors import ConfigError
from spaceserve.runtime import sm_partition
from spaceserve.runtime.sm_partition import (
    CudaDriverCallError,
    PartitionUnavailableError,
    SMPartitionManager,
    get_partition_manager,
    green_context_support,
)

CUDA0 = torch.device("cuda", 0)


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2


class FakeHandle:
    def __init__(self, value: int) -> None:
        self.value = value

    def __int__(self) -> int:
        return self.value


def sm_resource(count: int) -> SimpleNamespace:
    return SimpleNamespace(sm=SimpleNamespace(smCount=count))


class FakeDriver:
    """The calls SMPartitionManager makes, with the tuple shapes of cuda.bindings.driver."""

    CUresult = CUresult
    CUdevResourceType = SimpleNamespace(CU_DEV_RESOURCE_TYPE_SM="SM")
    CUdevice_attribute = SimpleNamespace(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR="major",
                                         CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR="minor")
    CUgreenCtxCreate_flags = SimpleNamespace(CU_GREEN_CTX_DEFAULT_STREAM="default-stream")
    CUstream_flags = SimpleNamespace(CU_STREAM_NON_BLOCKING="non-blocking")

    def __init__(self, total_sms: int = 132, granularity: int = 8, version: int = 13000,
                 capability: tuple[int, int] = (9, 0), failing_call: str | None = None) -> None:
        self.total_sms, self.granularity, self.version, self.capability = total_sms, granularity, version, capability
        self.failing_call = failing_call
        self.calls: list[tuple] = []
        self.next_handle = 1000
        self.streams: dict[int, FakeHandle] = {}  # stream handle -> the green context it was made in
        self.context_sms: dict[int, int] = {}  # green context handle -> its SM count

    def _record(self, name: str, *args):
        self.calls.append((name, *args))
        return CUresult.CUDA_ERROR_OUT_OF_MEMORY if name == self.failing_call else CUresult.CUDA_SUCCESS

    def _handle(self) -> FakeHandle:
        self.next_handle += 1
        return FakeHandle(self.next_handle)

    def count(self, name: str) -> int:
        return sum(1 for call in self.calls if call[0] == name)

    def cuInit(self, flags):
        return (self._record("cuInit", flags),)

    def cuDriverGetVersion(self):
        return self._record("cuDriverGetVersion"), self.version

    def cuDeviceGet(self, ordinal):
        return self._record("cuDeviceGet", ordinal), f"dev{ordinal}"

    def cuDeviceGetAttribute(self, attribute, device):
        return self._record("cuDeviceGetAttribute", attribute), self.capability[attribute == "minor"]

    def cuDevicePrimaryCtxRetain(self, device):
        return self._record("cuDevicePrimaryCtxRetain", device), "primary"

    def cuDeviceGetDevResource(self, device, kind):
        assert kind == "SM"
        return self._record("cuDeviceGetDevResource", device), sm_resource(self.total_sms)

    def cuDevSmResourceSplitByCount(self, nb_groups, resource, flags, min_count):
        err = self._record("cuDevSmResourceSplitByCount", nb_groups, min_count)
        granted = max(self.granularity, -(-min_count // self.granularity) * self.granularity)
        if granted > resource.sm.smCount:
            return err, [sm_resource(0)], 0, sm_resource(resource.sm.smCount)
        return err, [sm_resource(granted)], 1, sm_resource(resource.sm.smCount - granted)

    def cuDevResourceGenerateDesc(self, resources, count):
        assert len(resources) == count == 1
        return self._record("cuDevResourceGenerateDesc"), SimpleNamespace(sms=resources[0].sm.smCount)

    def cuGreenCtxCreate(self, desc, device, flags):
        assert flags == "default-stream"
        context = self._handle()
        self.context_sms[int(context)] = desc.sms
        return self._record("cuGreenCtxCreate", device), context

    def cuGreenCtxStreamCreate(self, context, flags, priority):
        assert flags == "non-blocking"
        stream = self._handle()
        self.streams[int(stream)] = context
        return self._record("cuGreenCtxStreamCreate", priority), stream

    def cuGetErrorName(self, err):
        return CUresult.CUDA_SUCCESS, CUresult(err).name.encode()


def assert_same_product(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # cuBLAS may pick another kernel (another summation order) for a partition's SM count than for the whole GPU.
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-3)


def sentinel_stream(handle: int, device: torch.device) -> SimpleNamespace:
    return SimpleNamespace(handle=handle, device=device)


def make_manager(driver: FakeDriver) -> SMPartitionManager:
    return SMPartitionManager(CUDA0, driver=driver, wrap_stream=sentinel_stream)


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(sm_partition, "_managers", {})


@pytest.mark.parametrize(("requested", "granted"), [(1, 8), (8, 8), (13, 16), (16, 16), (57, 64), (96, 96)])
def test_the_encoder_gets_its_count_rounded_up_and_the_language_model_the_rest(requested, granted):
    driver = FakeDriver(total_sms=132)
    partition = make_manager(driver).partition(requested)
    assert (partition.encoder_sms, partition.lm_sms, partition.total_sms) == (granted, 132 - granted, 132)
    encoder_context = driver.streams[partition.encoder_stream.handle]
    lm_context = driver.streams[partition.lm_stream.handle]
    assert encoder_context is not lm_context
    assert driver.context_sms[int(encoder_context)] == granted
    assert driver.context_sms[int(lm_context)] == 132 - granted
    assert partition.encoder_stream.device == partition.lm_stream.device == CUDA0


@pytest.mark.parametrize(("total", "granularity", "expected"),
                         [(132, 8, tuple(range(8, 129, 8))), (114, 2, tuple(range(2, 114, 2))), (16, 8, (8,))])
def test_grantable_counts_are_every_split_the_driver_gives_and_make_nothing(total, granularity, expected):
    driver = FakeDriver(total_sms=total, granularity=granularity)
    manager = make_manager(driver)
    assert manager.grantable_encoder_sms() == expected
    assert driver.count("cuGreenCtxCreate") == 0


def test_a_partition_is_made_once_per_count_and_several_coexist():
    driver = FakeDriver(total_sms=114)
    manager = make_manager(driver)
    assert manager.total_sms == 114
    first = manager.partition(20)
    assert manager.partition(20) is first
    second = manager.partition(40)
    assert manager.partition(20) is first and manager.partition(40) is second
    assert (second.encoder_sms, second.lm_sms) == (40, 74)
    assert driver.count("cuDevSmResourceSplitByCount") == 2
    # a context per side; the encoder's side has a second stream for prefill steps (engine/prefill_lane.py)
    assert driver.count("cuGreenCtxCreate") == 4 and driver.count("cuGreenCtxStreamCreate") == 6
    streams = {first.encoder_stream.handle, first.lm_stream.handle, first.prefill_stream.handle,
               second.encoder_stream.handle, second.lm_stream.handle, second.prefill_stream.handle}
    assert len(streams) == 6
    for split in (first, second):
        encoder_context = driver.streams[int(split.encoder_stream.handle)]
        assert driver.streams[int(split.prefill_stream.handle)] == encoder_context
        assert driver.context_sms[int(encoder_context)] == split.encoder_sms
        assert driver.streams[int(split.lm_stream.handle)] != encoder_context
    assert driver.count("cuDevicePrimaryCtxRetain") == 1


@pytest.mark.parametrize("requested", [0, -3, 132, 200])
def test_counts_that_leave_either_side_empty_are_refused_before_any_split(requested):
    driver = FakeDriver(total_sms=132)
    manager = make_manager(driver)
    with pytest.raises(ConfigError, match=f"encoder_sms.*{requested}"):
        manager.partition(requested)
    assert driver.count("cuDevSmResourceSplitByCount") == 0


def test_a_count_that_rounds_up_past_the_device_names_the_numbers_and_creates_nothing():
    driver = FakeDriver(total_sms=132)
    manager = make_manager(driver)
    for requested in (129, 130, 131):
        with pytest.raises(ConfigError, match=f"encoder_sms={requested} rounds up past the 132 SMs of cuda:0"):
            manager.partition(requested)
    assert driver.count("cuGreenCtxCreate") == 0
    assert manager.partition(124).lm_sms == 4  # a later valid request still works (4 = 132 - 128)


def test_a_count_whose_group_takes_every_sm_is_refused():
    driver = FakeDriver(total_sms=128)
    with pytest.raises(ConfigError, match=r"encoder_sms=121 rounds up to 128 of cuda:0's 128 SMs"):
        make_manager(driver).partition(121)


def test_a_non_integer_count_is_refused():
    with pytest.raises(ConfigError, match="must be an int"):
        make_manager(FakeDriver()).partition(16.0)


@pytest.mark.parametrize("failing_call", ["cuDevSmResourceSplitByCount", "cuGreenCtxCreate", "cuGreenCtxStreamCreate"])
def test_a_failing_driver_call_is_named_with_its_cuda_error_and_nothing_is_cached(failing_call):
    driver = FakeDriver()
    manager = make_manager(driver)
    driver.failing_call = failing_call
    with pytest.raises(CudaDriverCallError, match=f"{failing_call} failed with CUDA_ERROR_OUT_OF_MEMORY"):
        manager.partition(32)
    driver.failing_call = None
    assert manager.partition(32).encoder_sms == 32


def test_green_context_support_on_a_capable_device():
    assert green_context_support(CUDA0, driver=FakeDriver()) is None


@pytest.mark.parametrize(("driver", "reason"), [
    (FakeDriver(version=12030), r"CUDA 12\.3; green contexts need 12\.4 or newer"),
    (FakeDriver(capability=(5, 2)), r"compute capability 5\.2; green contexts need 6\.0"),
    (FakeDriver(total_sms=8), r"8 SMs cannot be split into two partitions"),
    (FakeDriver(failing_call="cuInit"), r"could not be initialised .*cuInit failed with CUDA_ERROR_OUT_OF_MEMORY"),
    (FakeDriver(failing_call="cuDeviceGetDevResource"), r"cuDeviceGetDevResource failed with CUDA_ERROR_OUT_OF"),
])
def test_green_context_support_gives_the_reason(driver, reason):
    found = green_context_support(CUDA0, driver=driver)
    assert found is not None and re.search(reason, found), found


def test_a_cpu_device_is_not_a_cuda_device(fresh_registry):
    assert green_context_support(torch.device("cpu"), driver=FakeDriver()) == "cpu is not a CUDA device"
    with pytest.raises(PartitionUnavailableError, match="cpu is not a CUDA device"):
        get_partition_manager("cpu", driver=FakeDriver())


def test_without_cuda_bindings_the_error_says_so(monkeypatch, fresh_registry):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    assert "cuda-bindings (cuda-python) is not importable" in green_context_support(CUDA0)
    with pytest.raises(PartitionUnavailableError, match=r"--multiplex space .*cuda-bindings \(cuda-python\) is not"):
        get_partition_manager(CUDA0)
    assert sm_partition._managers == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the real bindings on a machine without a driver")
def test_the_real_bindings_without_a_driver_say_the_driver_is_missing():
    pytest.importorskip("cuda.bindings")
    assert "CUDA driver could not be initialised" in green_context_support(CUDA0)


def test_one_manager_per_device(fresh_registry):
    driver = FakeDriver()
    manager = get_partition_manager(CUDA0, driver=driver, wrap_stream=sentinel_stream)
    assert get_partition_manager("cuda:0") is manager
    other = get_partition_manager("cuda:1", driver=driver, wrap_stream=sentinel_stream)
    assert other is not manager and other.device == torch.device("cuda", 1)
    assert ("cuDeviceGet", 1) in driver.calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestOnTheGPU:
    def test_a_real_partition_covers_the_device_and_runs_work_on_both_streams(self):
        device = torch.device("cuda", torch.cuda.current_device())
        reason = green_context_support(device)
        if reason is not None:
            pytest.skip(reason)
        manager = get_partition_manager(device)
        total = torch.cuda.get_device_properties(device).multi_processor_count
        assert manager.total_sms == total
        partition = manager.partition(13)
        assert partition.encoder_sms >= 13 and partition.encoder_sms + partition.lm_sms == total
        assert manager.partition(13) is partition
        generator = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(512, 384, device=device, generator=generator)
        b = torch.randn(384, 256, device=device, generator=generator)
        expected = a @ b
        torch.cuda.synchronize(device)
        results = []
        for stream in (partition.encoder_stream, partition.lm_stream):
            assert isinstance(stream, torch.cuda.Stream)
            with torch.cuda.stream(stream):
                results.append(a @ b)
            stream.synchronize()
        for result in results:
            assert_same_product(result, expected)

    def test_two_splits_coexist_on_the_device(self):
        device = torch.device("cuda", torch.cuda.current_device())
        if green_context_support(device) is not None:
            pytest.skip("no green contexts here")
        manager = get_partition_manager(device)
        small, large = manager.partition(16), manager.partition(64)
        assert small.encoder_sms >= 16 and large.encoder_sms >= 64
        assert small.encoder_sms + small.lm_sms == large.encoder_sms + large.lm_sms == manager.total_sms
        x = torch.randn(1024, 1024, device=device)
        for stream in (small.encoder_stream, small.lm_stream, large.encoder_stream, large.lm_stream):
            with torch.cuda.stream(stream):
                y = x @ x
            stream.synchronize()
            assert_same_product(y, x @ x)

    def test_partition_streams_order_with_ordinary_streams_and_capture_graphs(self):
        """What the runner relies on: events and wait_stream across green and primary contexts, and a CUDA graph
        captured on a partition's stream replaying there."""
        device = torch.device("cuda", torch.cuda.current_device())
        if green_context_support(device) is not None:
            pytest.skip("no green contexts here")
        partition = get_partition_manager(device).partition(32)
        generator = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(768, 768, device=device, generator=generator)
        w = torch.randn(768, 768, device=device, generator=generator)
        lm_stream, encoder_stream = partition.lm_stream, partition.encoder_stream
        lm_stream.wait_stream(torch.cuda.current_stream())
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(lm_stream):
            start.record()
            y = torch.relu(x @ w)
            end.record()
        encoder_stream.wait_stream(lm_stream)
        with torch.cuda.stream(encoder_stream):
            z = y @ w
        torch.cuda.current_stream().wait_stream(encoder_stream)
        assert_same_product(z, torch.relu(x @ w) @ w)
        end.synchronize()
        assert start.elapsed_time(end) > 0

        static_in = torch.randn(256, 768, device=device, generator=generator)
        graph = torch.cuda.CUDAGraph()
        lm_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(lm_stream):
            static_out = static_in @ w  # warm-up before capture
            with torch.cuda.graph(graph, stream=lm_stream):
                static_out = static_in @ w
        for _ in range(2):
            static_in.copy_(torch.randn(256, 768, device=device, generator=generator))
            lm_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(lm_stream):
                graph.replay()
            torch.cuda.current_stream().wait_stream(lm_stream)
            assert_same_product(static_out, static_in @ w)
