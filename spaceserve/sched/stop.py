from __future__ import annotations

from spaceserve.core.request import Request, RequestStatus


def check_stop(request: Request, max_model_len: int) -> RequestStatus | None:
    """Why the request stops after its newest token, or None. Stop strings are checked on text, elsewhere."""
    params = request.sampling_params
    if request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    if request.num_output_tokens >= params.min_tokens:
        token = request.output_token_ids[-1]
        if token in params.stop_token_ids:
            request.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if not params.ignore_eos and token in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
    if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    return None
