"""spaceserve: a serving engine for multimodal LLMs where images never stall text generation."""

from spaceserve.core.outputs import CompletionOutput, RequestOutput
from spaceserve.core.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # Importing the engine pulls in torch; keep `import spaceserve` light for the CUDA-free packages.
    if name == "LLM":
        from spaceserve.engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from spaceserve.engine.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(f"module 'spaceserve' has no attribute {name!r}")


__all__ = ["LLM", "LLMEngine", "CompletionOutput", "RequestOutput", "SamplingParams", "__version__"]
