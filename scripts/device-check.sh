#!/usr/bin/env bash
# One prepared check of the CUDA kernels and the CUDA backend on a GPU machine, within one device
# call (BUDGET, 540 s by default) on an H100. Needs nvcc, CMake and (for the baselines) PyTorch;
# Node only from a carried bundle.
#   1. build lima_cuda_selftest for this GPU only (or use a carried build: LIMA_SELFTEST=path)
#   2. the self-test: every CUDA kernel against the CPU kernels, and the model on the CUDA backend
#      against the CPU backend (one step, 20 AdamW steps, decoding) ("N passed, N failed")
#   3. with device-bundle/ carried (scripts/device-bundle.sh): the library and CLI on the GPU
#      against the CPU with the bundled Node (scripts/device-e2e.mjs)
#   4. compute-sanitizer memcheck on the reduced set of kernels (--quick) and on one training step
#      of the model on the CUDA backend, fp32 and bf16
#   5. training throughput of a 1.1B LLaMA (--bench-train: tokens/s, MFU; SIMT and tensor-core
#      attention) and PyTorch's on the same shape and batch (eager; torch.compile with --torch-compile)
#   6. kernel benchmarks with the ceilings measured in the same run (D2D copy, cuBLASLt GEMM)
#   7. PyTorch on the same shapes (SDPA, fused AdamW, matmul, copy) as the side-by-side baseline
# Logs go to $OUT (or ./device-check-out). Exit status: 0 when the self-test, memcheck and the
# e2e (where run) pass, 1 when one fails, 2 when there is no usable GPU, 3 when it cannot build
# or was misused.
#   scripts/device-check.sh [--no-build] [--rebuild] [--skip-bench] [--skip-train] [--torch-compile] [--dry-run]
#   --rebuild: build the self-test for this GPU even when device-bundle/ carries one
#   --dry-run: check tools and print the plan, run nothing that needs a GPU
# Environment: OUT (logs), LIMA_SELFTEST (a carried binary), LIMA_BUILD_DIR, LIMA_CUDA_ARCHS,
# LIMA_CUBLASLT_LIB / LIMA_CUBLASLT_INC (cuBLASLt library and header), T_BUILD, T_TEST, ... (seconds)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 3
root=$(pwd)
out=${OUT:-$root/device-check-out}
mkdir -p "$out"
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
: > "$out/summary.txt"

# Deadlines per step (seconds), and a budget for the whole run (BUDGET, default 540: one device
# call may take 600): a step that could overrun the budget is skipped and says so. Correctness
# (self-test, e2e, memcheck) comes before speed.
T_BUILD=${T_BUILD:-150} T_TEST=${T_TEST:-90} T_MEMCHECK=${T_MEMCHECK:-45} T_BENCH=${T_BENCH:-45} T_TORCH=${T_TORCH:-45}
T_TRAIN=${T_TRAIN:-75} T_TORCH_TRAIN=${T_TORCH_TRAIN:-100} T_E2E=${T_E2E:-100} BUDGET=${BUDGET:-540}
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
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader | tee -a "$out/summary.txt"
else
  say "nvidia-smi not found"
fi

# cuBLASLt: the toolkit's, or the one PyTorch's wheels bring (dlopen needs its directory on
# LD_LIBRARY_PATH); its header, where found, lets the build check our declarations.
# LIMA_CUBLASLT_LIB / LIMA_CUBLASLT_INC override the search.
lt_lib=${LIMA_CUBLASLT_LIB:-$(ldconfig -p 2> /dev/null | grep -o '/[^ ]*libcublasLt\.so\.1[1-9]' | head -1)}
lt_inc=${LIMA_CUBLASLT_INC:-}
if [[ -z "$lt_inc" && -n "$nvcc_bin" ]]; then
  toolkit_inc=$(dirname "$(readlink -f "$nvcc_bin")")/../include
  [[ -f "$toolkit_inc/cublasLt.h" ]] && lt_inc=$(cd "$toolkit_inc" && pwd)
fi
if [[ -n "$python" ]]; then
  while IFS= read -r f; do
    case "$f" in
      *.h) [[ -z "$lt_inc" ]] && lt_inc=$(dirname "$f") ;;
      *) [[ -z "$lt_lib" ]] && lt_lib=$f ;;
    esac
  done < <("$python" scripts/find-cublaslt.py 2> /dev/null)
fi
if [[ -n "$lt_lib" ]]; then
  lt_dir=$(dirname "$lt_lib")
  export LD_LIBRARY_PATH="$lt_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
say "cuBLASLt library: ${lt_lib:-not found}; header: ${lt_inc:-not found}"
lt_flag=""
[[ -n "$lt_inc" ]] && lt_flag="-DLIMA_CUBLASLT_INCLUDE_DIR=$lt_inc"

# ---- 1. build
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
# A carried bundle's self-test (built for sm_80-90 + PTX by scripts/device-bundle.sh) saves the
# build's device minutes; --rebuild forces a build for this GPU.
if [[ -z "$selftest" && $rebuild == 0 && $bundle == 1 && -x device-bundle/lima_cuda_selftest ]]; then
  selftest=$root/device-bundle/lima_cuda_selftest
  say "using the carried self-test (device-bundle/); --rebuild builds one for this GPU"
fi
if [[ -z "$selftest" ]]; then
  if [[ $no_build == 1 ]]; then
    for c in "$build/lima_cuda_selftest" "$root/build-cuda/lima_cuda_selftest"; do
      [[ -x "$c" ]] && selftest=$c && break
    done
    [[ -z "$selftest" ]] && { say "--no-build but no built lima_cuda_selftest found"; exit 3; }
  else
    if [[ -z "$nvcc_bin" ]] || ! command -v cmake > /dev/null; then
      say "cannot build: nvcc and cmake are needed"; exit 3
    fi
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
    else
      if ! timeout "$T_BUILD" bash -c "cmake -S . -B '$build' ${gen[*]} -DCMAKE_BUILD_TYPE=Release -DLIMA_WERROR=OFF \
          -DCMAKE_CUDA_COMPILER='$nvcc_bin' -DCMAKE_CUDA_ARCHITECTURES='$arch' $lt_flag > '$out/build.log' 2>&1 &&
          cmake --build '$build' --target lima_cuda_selftest -j \$(nproc) >> '$out/build.log' 2>&1"; then
        say "BUILD FAILED (see build.log)"; tail -40 "$out/build.log"; exit 1
      fi
    fi
    selftest=$build/lima_cuda_selftest
  fi
fi
say "self-test binary: $selftest"
if [[ $dry == 1 ]]; then
  say "(dry run) would run: $selftest; $sanitizer --tool memcheck $selftest --quick --kernels-only (and --filter 'model step tiny'); $selftest --bench-train [--attention tc]; $python scripts/torch-train-baseline.py; $selftest --bench; $python scripts/torch-baseline.py (each only while the ${BUDGET}s budget allows)"
  [[ $bundle == 1 && -f device-bundle/node.xz ]] && say "(dry run) would run: device-bundle/scripts/device-e2e.mjs with the bundled Node"
  exit 0
fi

# ---- 2. self-test
say "self-test (full)"
timeout "$T_TEST" "$selftest" > "$out/selftest.log" 2>&1
st=$?
grep -E "^FAIL" "$out/selftest.log" | head -50
tail -1 "$out/selftest.log" | tee -a "$out/summary.txt"
say "self-test exit status $st (0 pass, 1 failures, 2 no device, 124 timeout)"
if [[ $st == 2 ]]; then
  grep -m1 "nothing was run" "$out/selftest.log"
  say "no usable GPU: stopping (exit 2)"
  exit 2
fi

# ---- 3. the library and CLI on the GPU, with the carried bundle's Node (correctness first)
e2e=0
if [[ $bundle == 1 && -f device-bundle/node.xz ]]; then
  say "library + CLI end to end (device-bundle/, scripts/device-e2e.mjs)"
  node_bin=/tmp/lima-node
  xz -dc device-bundle/node.xz > "$node_bin" && chmod +x "$node_bin"
  (cd device-bundle && timeout "$T_E2E" "$node_bin" scripts/device-e2e.mjs) > "$out/e2e.log" 2>&1
  e2e=$?
  grep -E "^(PASS|FAIL)|passed, " "$out/e2e.log" | cut -c1-300 | tee -a "$out/summary.txt"
  say "e2e exit status $e2e (0 pass, 1 failures, 2 no device, 124 timeout)"
else
  say "no current device-bundle/ carried (scripts/device-bundle.sh): the library and CLI were not run on the GPU"
fi

# ---- 4. memcheck on the reduced set of kernels, then on one model step
mc=0
if [[ -z "$sanitizer" ]]; then
  say "compute-sanitizer not found: memcheck skipped"
elif room "$T_MEMCHECK" "memcheck"; then
  say "compute-sanitizer memcheck --quick --kernels-only"
  timeout "$T_MEMCHECK" "$sanitizer" --tool memcheck --error-exitcode 9 "$selftest" --quick --kernels-only \
    > "$out/memcheck.log" 2>&1
  mc=$?
  grep -E "ERROR SUMMARY|passed, " "$out/memcheck.log" | tail -2 | tee -a "$out/summary.txt"
  say "memcheck exit status $mc (0 clean, 9 errors found, 124 timeout)"
  if [[ $mc != 0 ]] && grep -q "Device not supported" "$out/memcheck.log"; then
    # Seen on gVisor machines: the sanitizer cannot attach there; nothing was checked either way.
    say "compute-sanitizer does not support this machine's runtime: memcheck not done (not a failure)"
    mc=0
    sanitizer=""
  fi
  if [[ -n "$sanitizer" ]] && room "$T_MEMCHECK" "the model memcheck"; then
    say "compute-sanitizer memcheck: one model step on the CUDA backend"
    timeout "$T_MEMCHECK" "$sanitizer" --tool memcheck --error-exitcode 9 "$selftest" --quick --filter "model step tiny" \
      > "$out/memcheck-model.log" 2>&1
    mcm=$?
    grep -E "ERROR SUMMARY|passed, " "$out/memcheck-model.log" | tail -2 | tee -a "$out/summary.txt"
    say "model memcheck exit status $mcm (0 clean, 9 errors found, 124 timeout)"
    [[ $mc == 0 ]] && mc=$mcm
  fi
fi

torch_ok=0
[[ -n "$python" ]] && "$python" -c "import torch; assert torch.cuda.is_available()" 2> /dev/null && torch_ok=1
[[ $torch_ok == 0 ]] && say "PyTorch with CUDA not available: the PyTorch baselines are skipped"

# ---- 5. training throughput, ours then PyTorch's on the same shape and micro-batch
if [[ $skip_train == 0 ]] && room "$T_TRAIN" "the training benchmark"; then
  say "training throughput (1.1B LLaMA, T 2048, bf16; MFU against the cuBLASLt ceiling of this run)"
  timeout "$T_TRAIN" "$selftest" --bench-train 2>&1 | tee "$out/bench-train.log" | grep -E "^BENCH" | tee -a "$out/summary.txt"
  if room "$T_TRAIN" "the training benchmark with tensor-core attention"; then
    timeout "$T_TRAIN" "$selftest" --bench-train --attention tc --steps 3 2>&1 | tee "$out/bench-train-tc.log" |
      grep -E "^BENCH" | tee -a "$out/summary.txt"
  fi
  batch=$(grep -oE 'micro-batch [0-9]+' "$out/bench-train.log" | head -1 | grep -oE '[0-9]+')
  if [[ $torch_ok == 1 ]] && room "$T_TORCH_TRAIN" "the PyTorch training baseline"; then
    compile_flag=--no-compile
    [[ $torch_compile == 1 ]] && compile_flag=""
    say "PyTorch training baseline (batch ${batch:-4})"
    PYTHONUNBUFFERED=1 timeout "$T_TORCH_TRAIN" "$python" scripts/torch-train-baseline.py --batch "${batch:-4}" $compile_flag 2>&1 |
      tee "$out/torch-train.log" | grep -E "^TORCH|Error" | tee -a "$out/summary.txt"
  fi
fi

# ---- 6/7. kernel benchmarks, ours then PyTorch's on the same shapes
if [[ $skip_bench == 0 ]] && room "$T_BENCH" "the kernel benchmarks"; then
  say "kernel benchmarks (ceilings measured in the same run)"
  timeout "$T_BENCH" "$selftest" --bench 2>&1 | tee "$out/bench.log" | grep -E "^BENCH" | tee -a "$out/summary.txt"
  if [[ $torch_ok == 1 ]] && room "$T_TORCH" "the PyTorch kernel baseline"; then
    say "PyTorch baseline"
    timeout "$T_TORCH" "$python" scripts/torch-baseline.py 2>&1 | tee "$out/torch.log" | grep -E "^TORCH" | tee -a "$out/summary.txt"
  fi
fi
say "done in $(elapsed)s; logs in $out"
[[ $st == 0 && $mc == 0 && $e2e == 0 ]]
