#!/usr/bin/env bash
# One device call on the GPU machine: install the carried wheels, then run the named sections, each under its own
# time limit, logging to $RESULTS/<section>.log; everything is packed into $OUT/results.tgz at the end (the device
# tool brings back at most 8 files). The commit is passed in, since the copied tree may carry no .git:
#
#   SPACESERVE_COMMIT=$(git rev-parse HEAD) bash scripts/gpu_round.sh tests vision host-2b
#
# Sections: tests (GPU tests of the engine, runtime and layers), vision (scripts/vision_graph_check.py),
# host-2b / host-7b (scripts/host_overhead_bench.py), and any other name whose command is given as
# SECTION_<name>="..." in the environment.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-/tmp/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi; python3 -c 'import torch, triton; print(torch.__version__, triton.__version__)'; echo "commit ${SPACESERVE_COMMIT:-?}"; } \
    >"$RESULTS/machine.txt" 2>&1

run() {  # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$RESULTS/sections.txt"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    local rc=$?
    echo "=== $name rc=$rc in $((SECONDS - start))s" | tee -a "$RESULTS/sections.txt"
    tail -n 25 "$RESULTS/$name.log"
}

for section in "$@"; do
    case $section in
        tests) run tests "${TESTS_LIMIT:-200}" bash -c "python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine \
            tests/runtime tests/layers tests/models; python3 -m pytest -q -p no:cacheprovider tests/engine/test_multiplex.py \
            tests/engine/test_async_scheduling.py tests/engine/test_engine_core_process.py tests/engine/test_core_preprocessing.py" ;;
        vision) run vision "${VISION_LIMIT:-240}" python3 scripts/vision_graph_check.py --out "$RESULTS/vision-graphs" ;;
        host-2b) run host-2b "${HOST_LIMIT:-240}" python3 scripts/host_overhead_bench.py Qwen/Qwen2-VL-2B-Instruct \
            --out-dir "$RESULTS/host-2b" --time-budget-s "$(( ${HOST_LIMIT:-240} - 20 ))" ${HOST_ARGS:-} ;;
        host-7b) run host-7b "${HOST_LIMIT:-240}" python3 scripts/host_overhead_bench.py Qwen/Qwen2-VL-7B-Instruct \
            --out-dir "$RESULTS/host-7b" --time-budget-s "$(( ${HOST_LIMIT:-240} - 20 ))" ${HOST_ARGS:-} ;;
        *) var="SECTION_${section//-/_}"; limit_var="LIMIT_${section//-/_}"
           run "$section" "${!limit_var:-240}" bash -c "${!var}" ;;
    esac
done
ps aux | grep -c '[c]ore_proc' >"$RESULTS/leftover_core_processes.txt"
tar czf "$OUT/results.tgz" -C "$RESULTS" .
