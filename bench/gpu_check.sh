#!/usr/bin/env bash
# Everything this project checks on a real GPU, in one run sized for a short loan of a GPU
# machine (at most 9 minutes: GPU_CHECK_SECONDS, default 540): build the C++ extension against the torch that is
# there, the CUDA tests (tests/test_cuda.py, the >2^31-element one included), then the CUDA
# benchmarks: host overhead of a tiny step, the fused ELBO against eager and torch.compile
# (with img512, beyond the GPU's caches), and the objectives.
#
#   bash bench/gpu_check.sh OUTDIR        # writes OUTDIR/log.txt and OUTDIR/results.tgz
#
# (the two bench runs write to fp32/ and bf16/: their files have the same names.)
# Each stage has its own time limit and the run goes on past a failed stage, so that one
# failure still leaves the others' results; the exit status is that of the first failure.
set -uo pipefail
out="${1:?usage: bash bench/gpu_check.sh OUTDIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
res="$(mktemp -d)"
status=0
log="$out/log.txt"
export PYTHONUNBUFFERED=1

deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))  # the whole run, whatever the stages ask
stage() {  # stage NAME SECONDS CMD...: at most SECONDS, and never past the deadline
    local name="$1" limit="$2"; shift 2
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 20 ]; then echo "=== $name: skipped, no time left" | tee -a "$log"; if [ "$status" = 0 ]; then status=124; fi; return 124; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$log"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc $rc in $((SECONDS - t0))s" | tee -a "$log"
    if [ "$rc" != 0 ] && [ "$status" = 0 ]; then status=$rc; fi
    tar -czf "$out/results.tgz" -C "$res" .  # after every stage: what is done comes back
    return "$rc"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
} 2>&1 | tee -a "$log"

day="$(date -u +%F)"
if stage build 240 env MAX_JOBS="$(nproc)" "$py" setup.py -q build_ext --inplace; then
    stage import 60 "$py" -c "import vae_fast, torch; from vae_fast import _ext, _backend; print('kernels', _ext.module.cpu_capability(), '| triton on', _ext.triton_devices, '| cuda backend', _backend.resolve(torch.device('cuda')))"
    stage tests 180 env VAE_FAST_TEST_GPU=1 VAE_FAST_SKIP_AOT=1 "$py" -m pytest tests/test_cuda.py -m "" -q -n 8 -p no:cacheprovider
    stage overhead 60 "$py" -m bench --overhead --device cuda --out "$res"
    stage bench-fp32 150 "$py" -m bench --device cuda --cases mnist,celeba64,img256,img512 --likelihoods bernoulli,gaussian --dtypes fp32 --min-time 0.3 --out "$res/fp32"
    stage objectives 90 "$py" -m bench --objectives --device cuda --reps 30 --out "$res/objectives-cuda-$day"
    stage bench-bf16 90 "$py" -m bench --device cuda --cases celeba64,img256,img512 --likelihoods bernoulli --dtypes bf16 --min-time 0.3 --out "$res/bf16"
fi
ls -la "$res" | tee -a "$log"
exit "$status"
