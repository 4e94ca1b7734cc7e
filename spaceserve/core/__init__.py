from spaceserve.core.errors import ConfigError, InvalidInputError, SpaceServeError
from spaceserve.core.multimodal import MultiModalFeature, PlaceholderRange, VideoChunk
from spaceserve.core.outputs import CompletionOutput, RequestOutput
from spaceserve.core.request import Request, RequestStatus
from spaceserve.core.sampling_params import SamplingParams
from spaceserve.core.scheduler_output import EncoderBatch, ModelRunnerOutput, ScheduledSequence, SchedulerOutput

__all__ = [
    "CompletionOutput",
    "ConfigError",
    "EncoderBatch",
    "InvalidInputError",
    "ModelRunnerOutput",
    "MultiModalFeature",
    "PlaceholderRange",
    "Request",
    "RequestOutput",
    "RequestStatus",
    "SamplingParams",
    "ScheduledSequence",
    "SchedulerOutput",
    "SpaceServeError",
    "VideoChunk",
]
