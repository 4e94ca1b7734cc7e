"""`spaceserve bench`: seeded serving workloads, Poisson/gamma arrivals, in-process or OpenAI-API backends,
latency and throughput metrics (TTFT, TPOT, ITL, end-to-end, goodput) written as JSON lines and plots."""
