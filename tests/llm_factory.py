"""Engines for tests: a small KV cache, so that several can live at once on a GPU as well as on the CPU."""

from spaceserve import LLM

TEST_KV_CACHE_BYTES = 128 << 20


def make_llm(model: str, **kwargs) -> LLM:
    if "num_gpu_blocks_override" not in kwargs:
        kwargs.setdefault("kv_cache_memory_bytes", TEST_KV_CACHE_BYTES)
    return LLM(model, **kwargs)
