#!/usr/bin/env bash
# What a session lent a GPU (the workplace's `device` tool) runs, in steps that each fit one
# 10-minute call, on the GPU machine's own preinstalled torch and triton (it has no internet:
# nothing is installed there; the package runs from the copied tree via PYTHONPATH).
#
#   bash benchmarks/gpu_session.sh test      # versions; builds lori_kernels._C if nvcc is there;
#                                            # the GPU tests, then the Triton/kernel test files
#   bash benchmarks/gpu_session.sh kernels   # lori bench --suite kernels on cuda
#   bash benchmarks/gpu_session.sh memory    # lori bench --suite memory, then storage
#   bash benchmarks/gpu_session.sh serving   # lori bench --suite serving on cuda (the Triton
#                                            # segmented expand; PEFT rows if peft is installed)
#   bash benchmarks/gpu_session.sh roofline  # after kernels: the roofline model's prediction beside
#                                            # each measured fwd+bwd ratio (roofline_vs_measured_cuda.csv)
#
# Logs and results go to $OUT (the folder the device tool brings back; default
# benchmarks/results/gpu_session); the kernels suite writes its CSV after every case, so a
# call cut off at its time limit still brings back what was measured. Copy the results files
# into benchmarks/results/, commit them, re-render the README tables (lori bench
# --report-only). Set LORI_BENCH_COMMIT to the commit measured: the copied tree has no .git.
set -uo pipefail
case "${1:-}" in
test | kernels | memory | serving | roofline) ;;
*)
    echo "usage: $0 test|kernels|memory|serving|roofline" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu_session}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python}
nvcc_bin=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc

case "${1:-}" in
test)
    {
        nvidia-smi
        $py -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
        command -v nvcc || ls "$nvcc_bin" || echo "no nvcc: the cuda_ext backend is not built"
    } >"$out/environment.txt" 2>&1
    cat "$out/environment.txt"
    if command -v nvcc >/dev/null || [ -x "$nvcc_bin" ]; then
        MAX_JOBS=${MAX_JOBS:-16} $py setup.py build_ext --inplace >"$out/build.log" 2>&1 \
            && echo "built lori_kernels._C" || echo "extension build failed: see build.log"
    fi
    # The large-shape GPU tests with autotuning (its trial runs must not add into in-place
    # outputs twice); the many small shapes of the kernel test files on one config each,
    # else compiling every config for every shape would not fit the call.
    $py -m pytest -q -m gpu tests/ 2>&1 | tee "$out/pytest_gpu.log" | tail -20
    LORI_TRITON_AUTOTUNE=0 $py -m pytest -q -m "not gpu" tests/test_triton.py tests/test_kernels.py tests/test_fused_layer.py \
        tests/test_ext_ops.py tests/test_rng.py 2>&1 | tee "$out/pytest_kernels.log" | tail -20
    ;;
kernels)
    $py -m lori.bench --device cuda --suite kernels --results "$out" 2>&1 | tee "$out/bench_kernels.log" | tail -60
    ;;
memory)
    for suite in memory storage; do
        $py -m lori.bench --device cuda --suite "$suite" --results "$out" 2>&1 | tee "$out/bench_$suite.log" | tail -30
    done
    ;;
serving)
    $py -m lori.bench --device cuda --suite serving --results "$out" 2>&1 | tee "$out/bench_serving.log" | tail -30
    ;;
roofline)
    $py -m lori.bench.roofline "$out" 2>&1 | tee "$out/roofline_vs_measured.log" | tail -60
    ;;
esac
