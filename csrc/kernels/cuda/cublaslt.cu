// cuBLASLt opened at run time with dlopen, so the module builds and loads where the library is
// absent (CI has no cuBLAS) and uses it where it exists. The dozen entry points and enum values
// we need are declared here; when the real cublasLt.h is on the include path, static_asserts
// check every declaration against it.
#include <dlfcn.h>

#include <cstddef>
#include <mutex>

#include "kernels/cuda/common.cuh"

namespace lima::cuda {

namespace lt {

using Status = int;                  // cublasStatus_t
using Handle = void*;                // cublasLtHandle_t
using MatmulDesc = void*;            // cublasLtMatmulDesc_t
using MatrixLayout = void*;          // cublasLtMatrixLayout_t
using Preference = void*;            // cublasLtMatmulPreference_t

struct MatmulAlgo {                  // cublasLtMatmulAlgo_t
  uint64_t data[8];
};
struct HeuristicResult {             // cublasLtMatmulHeuristicResult_t
  MatmulAlgo algo;
  size_t workspaceSize;
  Status state;
  float wavesCount;
  int reserved[4];
};

constexpr int kComputeF32 = 68;      // CUBLAS_COMPUTE_32F
constexpr int kR32F = 0;             // CUDA_R_32F
constexpr int kR16BF = 14;           // CUDA_R_16BF
constexpr int kDescTransA = 3;       // CUBLASLT_MATMUL_DESC_TRANSA
constexpr int kDescTransB = 4;       // CUBLASLT_MATMUL_DESC_TRANSB
constexpr int kOpN = 0, kOpT = 1;    // CUBLAS_OP_N, CUBLAS_OP_T
constexpr int kPrefMaxWorkspace = 1; // CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES
// CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_{A,B,C,D}_BYTES (uint32_t, default 256)
constexpr int kPrefAlignA = 5, kPrefAlignB = 6, kPrefAlignC = 7, kPrefAlignD = 8;

using CreateFn = Status (*)(Handle*);
using DestroyFn = Status (*)(Handle);
using DescCreateFn = Status (*)(MatmulDesc*, int, int);
using DescSetFn = Status (*)(MatmulDesc, int, const void*, size_t);
using DescDestroyFn = Status (*)(MatmulDesc);
using LayoutCreateFn = Status (*)(MatrixLayout*, int, uint64_t, uint64_t, int64_t);
using LayoutDestroyFn = Status (*)(MatrixLayout);
using PrefCreateFn = Status (*)(Preference*);
using PrefSetFn = Status (*)(Preference, int, const void*, size_t);
using PrefDestroyFn = Status (*)(Preference);
using HeuristicFn = Status (*)(Handle, MatmulDesc, MatrixLayout, MatrixLayout, MatrixLayout, MatrixLayout,
                               Preference, int, HeuristicResult*, int*);
using MatmulFn = Status (*)(Handle, MatmulDesc, const void*, const void*, MatrixLayout, const void*,
                            MatrixLayout, const void*, const void*, MatrixLayout, void*, MatrixLayout,
                            const MatmulAlgo*, void*, size_t, cudaStream_t);

struct Api {
  CreateFn create = nullptr;
  DestroyFn destroy = nullptr;
  DescCreateFn desc_create = nullptr;
  DescSetFn desc_set = nullptr;
  DescDestroyFn desc_destroy = nullptr;
  LayoutCreateFn layout_create = nullptr;
  LayoutDestroyFn layout_destroy = nullptr;
  PrefCreateFn pref_create = nullptr;
  PrefSetFn pref_set = nullptr;
  PrefDestroyFn pref_destroy = nullptr;
  HeuristicFn heuristic = nullptr;
  MatmulFn matmul = nullptr;
  Handle handle = nullptr;
  std::string why;
  bool ok = false;
};

}  // namespace lt

#if defined(__has_include)
#if __has_include(<cublasLt.h>)
#include <cublasLt.h>

#include <type_traits>
static_assert(sizeof(lt::MatmulAlgo) == sizeof(cublasLtMatmulAlgo_t), "cublasLtMatmulAlgo_t size");
static_assert(sizeof(lt::HeuristicResult) == sizeof(cublasLtMatmulHeuristicResult_t), "heuristic result size");
static_assert(offsetof(lt::HeuristicResult, workspaceSize) == offsetof(cublasLtMatmulHeuristicResult_t, workspaceSize), "workspaceSize offset");
static_assert(offsetof(lt::HeuristicResult, state) == offsetof(cublasLtMatmulHeuristicResult_t, state), "state offset");
static_assert(lt::kComputeF32 == CUBLAS_COMPUTE_32F, "CUBLAS_COMPUTE_32F");
static_assert(lt::kR32F == CUDA_R_32F && lt::kR16BF == CUDA_R_16BF, "cudaDataType values");
static_assert(lt::kDescTransA == CUBLASLT_MATMUL_DESC_TRANSA && lt::kDescTransB == CUBLASLT_MATMUL_DESC_TRANSB, "desc attributes");
static_assert(lt::kOpN == CUBLAS_OP_N && lt::kOpT == CUBLAS_OP_T, "cublasOperation_t");
static_assert(lt::kPrefMaxWorkspace == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, "preference attribute");
static_assert(lt::kPrefAlignA == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES &&
                  lt::kPrefAlignB == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES &&
                  lt::kPrefAlignC == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES &&
                  lt::kPrefAlignD == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
              "alignment preference attributes");
static_assert(sizeof(cublasStatus_t) == sizeof(lt::Status), "cublasStatus_t size");
static_assert(std::is_same<decltype(&cublasLtCreate), cublasStatus_t (*)(cublasLtHandle_t*)>::value, "cublasLtCreate");
static_assert(std::is_same<decltype(&cublasLtMatrixLayoutCreate),
                           cublasStatus_t (*)(cublasLtMatrixLayout_t*, cudaDataType, uint64_t, uint64_t, int64_t)>::value,
              "cublasLtMatrixLayoutCreate");
static_assert(std::is_same<decltype(&cublasLtMatmulDescCreate),
                           cublasStatus_t (*)(cublasLtMatmulDesc_t*, cublasComputeType_t, cudaDataType_t)>::value,
              "cublasLtMatmulDescCreate");
#define LIMA_CHECKED_CUBLASLT_H 1
#endif
#endif
#if defined(LIMA_REQUIRE_CUBLASLT_H) && !defined(LIMA_CHECKED_CUBLASLT_H)
#error "LIMA_REQUIRE_CUBLASLT_H: cublasLt.h was not found, so the declarations above went unchecked"
#endif

namespace {

lt::Api& api() {
  static lt::Api a;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* names[] = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11", "libcublasLt.so"};
    void* h = nullptr;
    for (const char* n : names)
      if ((h = dlopen(n, RTLD_NOW | RTLD_LOCAL))) break;
    if (!h) {
      a.why = "libcublasLt.so (13, 12 or 11) not found by dlopen";
      return;
    }
    bool all = true;
    auto sym = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(h, name));
      if (!fn) {
        all = false;
        a.why = std::string("libcublasLt lacks ") + name;
      }
    };
    sym(a.create, "cublasLtCreate");
    sym(a.destroy, "cublasLtDestroy");
    sym(a.desc_create, "cublasLtMatmulDescCreate");
    sym(a.desc_set, "cublasLtMatmulDescSetAttribute");
    sym(a.desc_destroy, "cublasLtMatmulDescDestroy");
    sym(a.layout_create, "cublasLtMatrixLayoutCreate");
    sym(a.layout_destroy, "cublasLtMatrixLayoutDestroy");
    sym(a.pref_create, "cublasLtMatmulPreferenceCreate");
    sym(a.pref_set, "cublasLtMatmulPreferenceSetAttribute");
    sym(a.pref_destroy, "cublasLtMatmulPreferenceDestroy");
    sym(a.heuristic, "cublasLtMatmulAlgoGetHeuristic");
    sym(a.matmul, "cublasLtMatmul");
    if (!all) return;
    if (a.create(&a.handle) != 0) {
      a.why = "cublasLtCreate failed";
      return;
    }
    a.ok = true;
  });
  return a;
}

// The largest power of two <= 256 dividing the address: the model hands cuBLASLt sub-tensors at
// element offsets, and the heuristic assumes 256-byte alignment unless told otherwise.
uint32_t alignment(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t k = 256;
  while (k > 1 && (a % k) != 0) k >>= 1;
  return k;
}

void lt_check(lt::Status s, const char* call) {
  if (s != 0) throw CudaError(std::string(call) + " failed with cublasStatus " + std::to_string(s), s);
}

// Descriptors released on every path, including exceptions.
struct Guard {
  lt::Api& a;
  lt::MatmulDesc desc = nullptr;
  lt::MatrixLayout la = nullptr, lb = nullptr, lc = nullptr;
  lt::Preference pref = nullptr;
  ~Guard() {
    if (pref) a.pref_destroy(pref);
    if (lc) a.layout_destroy(lc);
    if (lb) a.layout_destroy(lb);
    if (la) a.layout_destroy(la);
    if (desc) a.desc_destroy(desc);
  }
};

}  // namespace

bool cublaslt_available(std::string* why) {
  lt::Api& a = api();
  if (why) *why = a.ok ? "" : a.why;
  return a.ok;
}

void gemm_cublaslt(const CudaContext& ctx, DType c, void* C, const void* A, const void* B,
                   const GemmArgs& g, Workspace& ws) {
  lt::Api& a = api();
  if (!a.ok) throw CudaError("cuBLASLt is not available: " + a.why, -1);
  expect(g.lda > 0 && g.ldb > 0 && g.ldc > 0, "resolved leading dimensions", "lda/ldb/ldc", "0");
  // Row-major C[M,N] = op(A) op(B) is column-major Cᵀ[N,M] = op(B)ᵀ op(A)ᵀ: swap the operands.
  // A row-major matrix stored [r, c] with ld is column-major [c, r] with the same ld.
  Guard gd{a};
  lt_check(a.desc_create(&gd.desc, lt::kComputeF32, lt::kR32F), "cublasLtMatmulDescCreate");
  const int opB = g.trans_b ? lt::kOpT : lt::kOpN, opA = g.trans_a ? lt::kOpT : lt::kOpN;
  lt_check(a.desc_set(gd.desc, lt::kDescTransA, &opB, sizeof opB), "cublasLtMatmulDescSetAttribute");
  lt_check(a.desc_set(gd.desc, lt::kDescTransB, &opA, sizeof opA), "cublasLtMatmulDescSetAttribute");
  // First operand (our B): stored rows x cols row-major -> column-major cols x rows.
  const uint64_t b_rows = g.trans_b ? g.N : g.K, b_cols = g.trans_b ? g.K : g.N;
  const uint64_t a_rows = g.trans_a ? g.K : g.M, a_cols = g.trans_a ? g.M : g.K;
  lt_check(a.layout_create(&gd.lb, lt::kR16BF, b_cols, b_rows, g.ldb), "cublasLtMatrixLayoutCreate");
  lt_check(a.layout_create(&gd.la, lt::kR16BF, a_cols, a_rows, g.lda), "cublasLtMatrixLayoutCreate");
  const int ctype = c == DType::F32 ? lt::kR32F : lt::kR16BF;
  lt_check(a.layout_create(&gd.lc, ctype, static_cast<uint64_t>(g.N), static_cast<uint64_t>(g.M), g.ldc),
           "cublasLtMatrixLayoutCreate");
  const size_t ws_bytes = 32u << 20;
  void* wsp = ws.get(static_cast<int64_t>(ws_bytes));
  lt_check(a.pref_create(&gd.pref), "cublasLtMatmulPreferenceCreate");
  lt_check(a.pref_set(gd.pref, lt::kPrefMaxWorkspace, &ws_bytes, sizeof ws_bytes), "cublasLtMatmulPreferenceSetAttribute");
  // Operands as cuBLASLt sees them: its A is our B and its B our A (the swap above).
  const uint32_t align[4] = {alignment(B), alignment(A), alignment(C), alignment(C)};
  const int attr[4] = {lt::kPrefAlignA, lt::kPrefAlignB, lt::kPrefAlignC, lt::kPrefAlignD};
  for (int i = 0; i < 4; ++i)
    lt_check(a.pref_set(gd.pref, attr[i], &align[i], sizeof align[i]), "cublasLtMatmulPreferenceSetAttribute");
  lt::HeuristicResult res{};
  int found = 0;
  lt_check(a.heuristic(a.handle, gd.desc, gd.lb, gd.la, gd.lc, gd.lc, gd.pref, 1, &res, &found),
           "cublasLtMatmulAlgoGetHeuristic");
  if (found == 0) throw CudaError("cuBLASLt found no algorithm for this GEMM", -1);
  const float alpha = g.alpha, beta = g.beta;
  lt_check(a.matmul(a.handle, gd.desc, &alpha, B, gd.lb, A, gd.la, &beta, C, gd.lc, C, gd.lc, &res.algo, wsp,
                    ws_bytes, ctx.stream),
           "cublasLtMatmul");
}

}  // namespace lima::cuda
