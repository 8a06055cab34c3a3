#!/usr/bin/env bash
# One prepared check of the CUDA kernels and the CUDA backend on a GPU machine, within one device
# call (BUDGET, 400 s by default, so a fix and a second run fit in a 15-minute loan). Needs nvcc
# and CMake only when it must build, PyTorch for the baselines; Node only from a carried bundle.
# In order, each step only while the budget allows (a skipped step is named in summary.txt):
#   1. the self-test binary: the carried one (device-bundle/, scripts/device-bundle.sh) if it
#      starts on this machine (its glibc/libstdc++), else built here for this GPU
#   2. the self-test under CUDA_LAUNCH_BLOCKING=1: every kernel against the CPU kernels, the model
#      on the CUDA backend against the CPU backend, the never-run tensor-core attention last;
#      it stops at the first sticky CUDA error and names the case ("N passed, N failed")
#   3. with device-bundle/ carried: the library and CLI on the GPU (scripts/device-e2e.mjs)
#   4. kernel benchmarks (ceilings measured in the same run: D2D copy, cuBLASLt GEMM), then
#      PyTorch on the same shapes (SDPA, fused AdamW, matmul, copy)
#   5. one 1.1B training run with the tensor-core attention (tokens/s, MFU, phase split), then
#      PyTorch's training step on the same shape and micro-batch (eager; torch.compile with
#      --torch-compile)
#   6. compute-sanitizer: memcheck once (--quick, kernels and a model step), racecheck on attention
#   7. the SIMT-attention training step, one step, last
# A build failure stops none of the PyTorch steps. What comes back from a device call is at most
# 8 files: $OUT (or ./device-check-out) gets summary.txt (every step, every FAIL line, every
# BENCH/TORCH figure) and logs.tar.gz (the full logs). Exit status: 0 when the self-test, the
# sanitizers and the e2e (where run) pass, 1 when one fails or nothing could be built, 2 when
# there is no usable GPU, 3 when misused.
#   scripts/device-check.sh [--no-build] [--rebuild] [--skip-bench] [--skip-train] [--torch-compile] [--dry-run]
#   --rebuild: build the self-test for this GPU even when device-bundle/ carries one
#   --dry-run: check tools and print the plan, run nothing that needs a GPU
# Environment: OUT, LIMA_SELFTEST (a carried binary), LIMA_BUILD_DIR, LIMA_CUDA_ARCHS,
# LIMA_CUBLASLT_LIB / LIMA_CUBLASLT_INC (cuBLASLt library and header), BUDGET, T_BUILD, T_TEST, ... (seconds)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 3
root=$(pwd)
out=${OUT:-$root/device-check-out}
mkdir -p "$out"
logs=$(mktemp -d)
# Whatever happens (a timeout of the whole call included), the logs go back as one archive.
trap 'tar -czf "$out/logs.tar.gz" -C "$logs" . 2> /dev/null' EXIT
build=${LIMA_BUILD_DIR:-$root/build-selftest}
no_build=0 skip_bench=0 skip_train=0 torch_compile=0 dry=0 rebuild=0
for a in "$@"; do
  case "$a" in
    --no-build) no_build=1 ;;
    --skip-bench) skip_bench=1 ;;
    --skip-train) skip_train=1 ;;
    --torch-compile) torch_compile=1 ;;
    --rebuild) rebuild=1 ;;
    --dry-run) dry=1 ;;
    *) echo "usage: $0 [--no-build] [--rebuild] [--skip-bench] [--skip-train] [--torch-compile] [--dry-run]" >&2; exit 3 ;;
  esac
done
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
say() { echo "== [$(elapsed)s] $*" | tee -a "$out/summary.txt"; }
# lines FILE PATTERN: every line of FILE matching PATTERN into the summary (at most 300, counted).
lines() {
  local n
  n=$(grep -cE "$2" "$1" 2> /dev/null || true)
  grep -E "$2" "$1" 2> /dev/null | head -300 | cut -c1-400 | tee -a "$out/summary.txt"
  (( ${n:-0} > 300 )) && say "($n lines matched $2 in $(basename "$1"); the first 300 are above, all in logs.tar.gz)"
  return 0
}
: > "$out/summary.txt"

# Deadlines per step (seconds) and the whole run's budget: a step that could overrun the budget
# is skipped and says so. Correctness (self-test, e2e) comes before speed, speed before the
# sanitizers (slow, and a race report does not change a figure), the slow SIMT step last.
T_BUILD=${T_BUILD:-150} T_TEST=${T_TEST:-80} T_E2E=${T_E2E:-60} T_BENCH=${T_BENCH:-45} T_TORCH=${T_TORCH:-40}
T_TRAIN=${T_TRAIN:-60} T_TORCH_TRAIN=${T_TORCH_TRAIN:-80} T_MEMCHECK=${T_MEMCHECK:-60} T_RACECHECK=${T_RACECHECK:-40}
T_SIMT=${T_SIMT:-40} BUDGET=${BUDGET:-400}
# room SECONDS WHAT: true when a step of SECONDS fits in what is left of BUDGET.
room() {
  if (( $(elapsed) + $1 <= BUDGET )); then return 0; fi
  say "skipped $2: ${1}s would overrun the ${BUDGET}s budget (at $(elapsed)s)"
  return 1
}

nvcc_bin=${CUDACXX:-$(command -v nvcc || true)}
[[ -z "$nvcc_bin" && -x /usr/local/cuda/bin/nvcc ]] && nvcc_bin=/usr/local/cuda/bin/nvcc
sanitizer=$(command -v compute-sanitizer || true)
[[ -z "$sanitizer" && -x /usr/local/cuda/bin/compute-sanitizer ]] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
python=$(command -v python3 || true)
say "tools: nvcc=${nvcc_bin:-missing} cmake=$(command -v cmake || echo missing) compute-sanitizer=${sanitizer:-missing} python3=${python:-missing}"
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee -a "$out/summary.txt"
else
  say "nvidia-smi not found"
fi

# cuBLASLt: the module searches the toolkit and pip's nvidia wheels itself (and says what it
# loaded: "cuBLASLt:" in the self-test's first lines); LIMA_CUBLASLT_LIB names a file. The
# header, where found, lets a build here check our declarations against it.
lt_inc=${LIMA_CUBLASLT_INC:-}
if [[ -z "$lt_inc" && -n "$nvcc_bin" ]]; then
  toolkit_inc=$(dirname "$(readlink -f "$nvcc_bin")")/../include
  [[ -f "$toolkit_inc/cublasLt.h" ]] && lt_inc=$(cd "$toolkit_inc" && pwd)
fi
if [[ -z "$lt_inc" && -n "$python" ]]; then
  lt_inc=$("$python" scripts/find-cublaslt.py 2> /dev/null | grep -m1 '\.h$' | xargs -r dirname)
fi
[[ -n "${LIMA_CUBLASLT_LIB:-}" ]] && export LIMA_CUBLASLT_LIB
say "cuBLASLt header: ${lt_inc:-not found}${LIMA_CUBLASLT_LIB:+; library LIMA_CUBLASLT_LIB=$LIMA_CUBLASLT_LIB}"
lt_flag=""
[[ -n "$lt_inc" ]] && lt_flag="-DLIMA_CUBLASLT_INCLUDE_DIR=$lt_inc"

torch_ok=0
[[ -n "$python" ]] && "$python" -c "import torch; assert torch.cuda.is_available()" 2> /dev/null && torch_ok=1
[[ $torch_ok == 0 ]] && say "PyTorch with CUDA not available: the PyTorch baselines are skipped"

# starts BINARY: the binary loads on this machine (its glibc and libstdc++ are new enough): an
# unknown flag must give the self-test's usage exit (3), not the loader's 127.
starts() {
  "$1" --no-such-flag > "$logs/starts.log" 2>&1
  [[ $? == 3 ]]
}

# ---- 1. the self-test binary
# A bundle built from other sources (an older checkout) would test stale code: it is ignored.
bundle=0
if [[ -d device-bundle ]]; then
  here=$(scripts/source-stamp.sh)
  built=$(cat device-bundle/SOURCES 2> /dev/null || echo none)
  if [[ "$here" == "$built" ]]; then
    bundle=1
  else
    say "device-bundle/ was built from other sources (bundle $built, tree $here): ignoring it; run scripts/device-bundle.sh"
  fi
fi
selftest=${LIMA_SELFTEST:-}
if [[ -z "$selftest" && $rebuild == 0 && $bundle == 1 && -x device-bundle/lima_cuda_selftest ]]; then
  if starts device-bundle/lima_cuda_selftest; then
    selftest=$root/device-bundle/lima_cuda_selftest
    say "using the carried self-test (device-bundle/); --rebuild builds one for this GPU"
  else
    say "the carried self-test does not start here: $(head -c 300 "$logs/starts.log" | tr '\n' ' '); building one"
  fi
fi
if [[ -z "$selftest" && $no_build == 1 ]]; then
  for c in "$build/lima_cuda_selftest" "$root/build-cuda/lima_cuda_selftest"; do
    [[ -x "$c" ]] && selftest=$c && break
  done
  [[ -z "$selftest" ]] && say "--no-build but no built lima_cuda_selftest found"
elif [[ -z "$selftest" ]]; then
  if [[ -z "$nvcc_bin" ]] || ! command -v cmake > /dev/null; then
    say "cannot build: nvcc and cmake are needed"
  else
    # This GPU's architecture only (compute_cap 9.0 -> 90): four times less to compile.
    arch=${LIMA_CUDA_ARCHS:-}
    if [[ -z "$arch" ]] && command -v nvidia-smi > /dev/null; then
      arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
    fi
    arch=${arch:-90}
    gen=()
    command -v ninja > /dev/null && gen=(-G Ninja)
    say "configure + build lima_cuda_selftest for sm_$arch in $build"
    if [[ $dry == 1 ]]; then
      echo "   (dry run) cmake -S . -B $build ${gen[*]} -DLIMA_WERROR=OFF -DCMAKE_CUDA_COMPILER=$nvcc_bin -DCMAKE_CUDA_ARCHITECTURES=$arch $lt_flag"
      selftest=$build/lima_cuda_selftest
    elif timeout "$T_BUILD" bash -c "cmake -S . -B '$build' ${gen[*]} -DCMAKE_BUILD_TYPE=Release -DLIMA_WERROR=OFF \
        -DCMAKE_CUDA_COMPILER='$nvcc_bin' -DCMAKE_CUDA_ARCHITECTURES='$arch' $lt_flag > '$logs/build.log' 2>&1 &&
        cmake --build '$build' --target lima_cuda_selftest -j \$(nproc) >> '$logs/build.log' 2>&1"; then
      selftest=$build/lima_cuda_selftest
    else
      say "BUILD FAILED (the last lines follow; build.log in logs.tar.gz); the PyTorch steps still run"
      grep -E "error|Error" "$logs/build.log" | head -20 | tee -a "$out/summary.txt"
      tail -20 "$logs/build.log"
    fi
  fi
fi
say "self-test binary: ${selftest:-none}"
if [[ $dry == 1 ]]; then
  say "(dry run) would run, each while the ${BUDGET}s budget allows: CUDA_LAUNCH_BLOCKING=1 $selftest; device-e2e (bundle); $selftest --bench; scripts/torch-baseline.py; $selftest --bench-train --attention tc --steps 3; scripts/torch-train-baseline.py; $sanitizer --tool memcheck $selftest --quick; $sanitizer --tool racecheck $selftest --quick --kernels-only --filter attention; $selftest --bench-train --attention simt --steps 1"
  exit 0
fi

# ---- 2. self-test
st=1
if [[ -n "$selftest" ]]; then
  say "self-test (full, CUDA_LAUNCH_BLOCKING=1)"
  CUDA_LAUNCH_BLOCKING=1 timeout "$T_TEST" "$selftest" > "$logs/selftest.log" 2>&1
  st=$?
  lines "$logs/selftest.log" "^(lima_cuda_selftest|cuBLASLt)"
  lines "$logs/selftest.log" "^FAIL"
  tail -1 "$logs/selftest.log" | tee -a "$out/summary.txt"
  say "self-test exit status $st (0 pass, 1 failures, 2 no device, 124 timeout)"
  if [[ $st == 2 ]]; then
    grep -m1 "nothing was run" "$logs/selftest.log" | tee -a "$out/summary.txt"
    say "no usable GPU: stopping (exit 2)"
    exit 2
  fi
fi

# ---- 3. the library and CLI on the GPU, with the carried bundle's Node (correctness first)
e2e=0
if [[ $bundle == 1 && -f device-bundle/node.xz ]] && room "$T_E2E" "the library + CLI end to end"; then
  node_bin=/tmp/lima-node
  xz -dc device-bundle/node.xz > "$node_bin" && chmod +x "$node_bin"
  if "$node_bin" --version > "$logs/node.log" 2>&1; then
    say "library + CLI end to end (device-bundle/, scripts/device-e2e.mjs, Node $(cat "$logs/node.log"))"
    (cd device-bundle && timeout "$T_E2E" "$node_bin" scripts/device-e2e.mjs) > "$logs/e2e.log" 2>&1
    e2e=$?
    lines "$logs/e2e.log" "^(PASS|FAIL)|passed, "
    say "e2e exit status $e2e (0 pass, 1 failures, 2 no device, 124 timeout)"
  else
    say "the bundled Node does not start here: $(head -c 300 "$logs/node.log" | tr '\n' ' '); e2e not run"
  fi
elif [[ $bundle == 0 ]]; then
  say "no current device-bundle/ carried (scripts/device-bundle.sh): the library and CLI were not run on the GPU"
fi

# ---- 4. kernel benchmarks, ours then PyTorch's on the same shapes
if [[ $skip_bench == 0 ]]; then
  if [[ -n "$selftest" ]] && room "$T_BENCH" "the kernel benchmarks"; then
    say "kernel benchmarks (random operands; ceilings measured in the same run)"
    timeout "$T_BENCH" "$selftest" --bench > "$logs/bench.log" 2>&1
    lines "$logs/bench.log" "^BENCH"
  fi
  if [[ $torch_ok == 1 ]] && room "$T_TORCH" "the PyTorch kernel baseline"; then
    say "PyTorch kernel baseline"
    timeout "$T_TORCH" "$python" scripts/torch-baseline.py > "$logs/torch.log" 2>&1
    lines "$logs/torch.log" "^TORCH|Error"
  fi
fi

# ---- 5. training throughput with the tensor-core attention, then PyTorch's on that micro-batch
batch=""
if [[ $skip_train == 0 ]]; then
  if [[ -n "$selftest" ]] && room "$T_TRAIN" "the training benchmark (tensor-core attention)"; then
    say "training throughput (1.1B LLaMA, T 2048, bf16, tensor-core attention; MFU against this run's cuBLASLt ceiling)"
    timeout "$T_TRAIN" "$selftest" --bench-train --attention tc --steps 3 > "$logs/bench-train-tc.log" 2>&1
    lines "$logs/bench-train-tc.log" "^BENCH"
    batch=$(grep -oE 'micro-batch [0-9]+' "$logs/bench-train-tc.log" | head -1 | grep -oE '[0-9]+')
  fi
  if [[ $torch_ok == 1 ]] && room "$T_TORCH_TRAIN" "the PyTorch training baseline"; then
    compile_flag=--no-compile
    [[ $torch_compile == 1 ]] && compile_flag=""
    say "PyTorch training baseline (batch ${batch:-4})"
    PYTHONUNBUFFERED=1 timeout "$T_TORCH_TRAIN" "$python" scripts/torch-train-baseline.py --batch "${batch:-4}" $compile_flag \
      > "$logs/torch-train.log" 2>&1
    lines "$logs/torch-train.log" "^TORCH|Error"
  fi
fi

# ---- 6. sanitizers: memcheck once, racecheck on the attention kernels
mc=0
if [[ -z "$sanitizer" || -z "$selftest" ]]; then
  say "compute-sanitizer or the self-test missing: sanitizers skipped"
elif room "$T_MEMCHECK" "memcheck"; then
  say "compute-sanitizer memcheck --quick (kernels and a model step)"
  timeout "$T_MEMCHECK" "$sanitizer" --tool memcheck --error-exitcode 9 "$selftest" --quick > "$logs/memcheck.log" 2>&1
  mc=$?
  lines "$logs/memcheck.log" "ERROR SUMMARY|passed, |^FAIL"
  say "memcheck exit status $mc (0 clean, 9 errors found, 124 timeout)"
  if [[ $mc != 0 ]] && grep -q "Device not supported" "$logs/memcheck.log"; then
    # Seen on gVisor machines: the sanitizer cannot attach there; nothing was checked either way.
    say "compute-sanitizer does not support this machine's runtime: sanitizers not done (not a failure)"
    mc=0
    sanitizer=""
  fi
  if [[ -n "$sanitizer" ]] && room "$T_RACECHECK" "racecheck"; then
    say "compute-sanitizer racecheck: the attention kernels (--quick)"
    timeout "$T_RACECHECK" "$sanitizer" --tool racecheck --error-exitcode 9 "$selftest" --quick --kernels-only --filter attention \
      > "$logs/racecheck.log" 2>&1
    rc=$?
    lines "$logs/racecheck.log" "RACECHECK SUMMARY|ERROR SUMMARY|passed, |^FAIL"
    say "racecheck exit status $rc (0 clean, 9 hazards found, 124 timeout)"
    [[ $mc == 0 ]] && mc=$rc
  fi
fi

# ---- 7. the SIMT attention's training step, one step, last (the slow fallback)
if [[ $skip_train == 0 && -n "$selftest" ]] && room "$T_SIMT" "the SIMT training step"; then
  say "training throughput with the SIMT attention (one step)"
  timeout "$T_SIMT" "$selftest" --bench-train --attention simt --steps 1 > "$logs/bench-train-simt.log" 2>&1
  lines "$logs/bench-train-simt.log" "^BENCH"
fi
say "done in $(elapsed)s; full logs in $out/logs.tar.gz"
[[ -n "$selftest" && $st == 0 && $mc == 0 && $e2e == 0 ]]
