"""Engines for tests: a small KV cache, so that several can live at once on a GPU as well as on the CPU, and a short
CUDA-graph ladder (graphs stay exercised on the GPU without capturing dozens of sizes per engine)."""

from spaceserve import LLM

TEST_KV_CACHE_BYTES = 128 << 20
TEST_CUDA_GRAPH_SIZES = (1, 2, 4, 8, 16)


def make_llm(model: str, **kwargs) -> LLM:
    if "num_gpu_blocks_override" not in kwargs:
        kwargs.setdefault("kv_cache_memory_bytes", TEST_KV_CACHE_BYTES)
    kwargs.setdefault("cuda_graph_sizes", TEST_CUDA_GRAPH_SIZES)
    return LLM(model, **kwargs)
