from spaceserve.core import Request, SamplingParams
from spaceserve.core.request import RequestStatus
from spaceserve.sched.stop import check_stop

EOS = 99


def request_with(params, outputs, prompt_len=5):
    request = Request("r", list(range(10, 10 + prompt_len)), params, eos_token_ids=(EOS,))
    for token in outputs:
        request.append_output_token(token)
    return request


def test_eos_stops_unless_ignored():
    assert check_stop(request_with(SamplingParams(max_tokens=9), [3, EOS]), 100) == RequestStatus.FINISHED_STOPPED
    assert check_stop(request_with(SamplingParams(max_tokens=9, ignore_eos=True), [3, EOS]), 100) is None


def test_min_tokens_defers_eos_and_stop_ids():
    params = SamplingParams(max_tokens=9, min_tokens=3, stop_token_ids=[7])
    assert check_stop(request_with(params, [3, EOS]), 100) is None
    assert check_stop(request_with(params, [3, 7]), 100) is None
    request = request_with(params, [3, 4, 7])
    assert check_stop(request, 100) == RequestStatus.FINISHED_STOPPED
    assert request.stop_reason == 7


def test_length_limits():
    assert check_stop(request_with(SamplingParams(max_tokens=2), [3, 4]), 100) == RequestStatus.FINISHED_LENGTH
    assert check_stop(request_with(SamplingParams(max_tokens=None), [3, 4]), 7) == RequestStatus.FINISHED_LENGTH
    assert check_stop(request_with(SamplingParams(max_tokens=None), [3]), 7) is None
