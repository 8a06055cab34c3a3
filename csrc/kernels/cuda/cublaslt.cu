// cuBLASLt opened at run time with dlopen, so the module builds and loads where the library is
// absent (CI has no cuBLAS) and uses it where it exists. The dozen entry points and enum values
// we need are declared here; when the real cublasLt.h is on the include path, static_asserts
// check every declaration against it.
#include <dlfcn.h>
#include <glob.h>

#include <cstddef>
#include <cstdlib>
#include <string>
#include <vector>
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

constexpr Status kStatusNotSupported = 15;  // CUBLAS_STATUS_NOT_SUPPORTED
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
  std::string path;  // the file that was loaded
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
static_assert(lt::kStatusNotSupported == CUBLAS_STATUS_NOT_SUPPORTED, "CUBLAS_STATUS_NOT_SUPPORTED");
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

// Where libcublasLt is looked for, in order: LIMA_CUBLASLT_LIB (a file), the dynamic loader's own
// search (LD_LIBRARY_PATH, ldconfig's cache), the CUDA toolkit's folders, and the pip wheels
// nvidia-cublas-* (PyTorch brings them) under the usual Python prefixes. A Node process started
// by a user has no LD_LIBRARY_PATH pointing at a wheel, so the loader alone would miss it.
std::vector<std::string> cublaslt_candidates() {
  std::vector<std::string> out;
  if (const char* f = std::getenv("LIMA_CUBLASLT_LIB"); f && *f) out.emplace_back(f);
  for (const char* n : {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11"}) out.emplace_back(n);
  std::vector<std::string> patterns;
  for (const char* var : {"CUDA_HOME", "CUDA_PATH"})
    if (const char* v = std::getenv(var); v && *v) {
      patterns.push_back(std::string(v) + "/lib64/libcublasLt.so.1[1-9]");
      patterns.push_back(std::string(v) + "/targets/*-linux/lib/libcublasLt.so.1[1-9]");
    }
  for (const char* p : {"/usr/local/cuda/lib64", "/usr/local/cuda/targets/*-linux/lib", "/usr/local/cuda-*/lib64",
                        "/usr/local/cuda-*/targets/*-linux/lib", "/opt/cuda/lib64"})
    patterns.push_back(std::string(p) + "/libcublasLt.so.1[1-9]");
  std::vector<std::string> prefixes = {"/usr/local/lib/python3*", "/usr/lib/python3*", "/opt/conda/lib/python3*"};
  for (const char* var : {"VIRTUAL_ENV", "CONDA_PREFIX"})
    if (const char* v = std::getenv(var); v && *v) {
      prefixes.insert(prefixes.begin(), std::string(v) + "/lib/python3*");
      patterns.push_back(std::string(v) + "/lib/libcublasLt.so.1[1-9]");
    }
  if (const char* h = std::getenv("HOME"); h && *h) prefixes.push_back(std::string(h) + "/.local/lib/python3*");
  for (const std::string& p : prefixes)
    for (const char* sp : {"site-packages", "dist-packages"})
      patterns.push_back(p + "/" + sp + "/nvidia/*/lib/libcublasLt.so.1[1-9]");
  for (const std::string& pat : patterns) {
    glob_t g{};
    if (glob(pat.c_str(), 0, nullptr, &g) == 0) {
      // Newest major first (.so.13 before .so.12): glob sorts names ascending.
      for (size_t i = g.gl_pathc; i-- > 0;) out.emplace_back(g.gl_pathv[i]);
    }
    globfree(&g);
  }
  return out;
}

lt::Api& api() {
  static lt::Api a;
  static std::once_flag once;
  std::call_once(once, [] {
    void* h = nullptr;
    std::string tried_error;
    for (const std::string& n : cublaslt_candidates()) {
      if ((h = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL))) break;
      // A file that exists but does not load (missing dependency, wrong architecture) is worth naming.
      if (n.find('/') != std::string::npos && tried_error.empty())
        if (const char* e = dlerror()) tried_error = e;
    }
    if (!h) {
      a.why = "libcublasLt.so.13/12/11 not found (LIMA_CUBLASLT_LIB, LD_LIBRARY_PATH, ldconfig, the CUDA toolkit, pip nvidia wheels)" +
              (tried_error.empty() ? std::string() : "; " + tried_error);
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
    Dl_info info{};
    a.path = dladdr(reinterpret_cast<void*>(a.create), &info) && info.dli_fname ? info.dli_fname : "libcublasLt";
    if (a.create(&a.handle) != 0) {
      a.why = "cublasLtCreate failed (" + a.path + ")";
      return;
    }
    a.ok = true;
  });
  return a;
}

// Every operand is declared 16-byte aligned, whatever its real address: the heuristic then picks
// an algorithm from the shape alone, so the same product gives the same bits wherever its
// operands sit (the model hands cuBLASLt sub-tensors at element offsets, and recompute modes place
// them differently). Operands that are not 16-byte aligned take our own GEMM.
constexpr uint32_t kAlignment = 16;
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % kAlignment == 0; }

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
  if (why) *why = a.ok ? a.path : a.why;
  return a.ok;
}

bool gemm_cublaslt(const CudaContext& ctx, DType c, void* C, const void* A, const void* B,
                   const GemmArgs& g, Workspace& ws) {
  lt::Api& a = api();
  if (!a.ok) throw CudaError("cuBLASLt is not available: " + a.why, -1);
  expect(g.lda > 0 && g.ldb > 0 && g.ldc > 0, "resolved leading dimensions", "lda/ldb/ldc", "0");
  if (!aligned16(A) || !aligned16(B) || !aligned16(C)) return false;
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
  for (const int attr : {lt::kPrefAlignA, lt::kPrefAlignB, lt::kPrefAlignC, lt::kPrefAlignD})
    lt_check(a.pref_set(gd.pref, attr, &kAlignment, sizeof kAlignment), "cublasLtMatmulPreferenceSetAttribute");
  lt::HeuristicResult res{};
  int found = 0;
  const lt::Status hs = a.heuristic(a.handle, gd.desc, gd.lb, gd.la, gd.lc, gd.lc, gd.pref, 1, &res, &found);
  // A shape cuBLASLt has no algorithm for is not an error: the caller runs ours.
  if (hs == lt::kStatusNotSupported || (hs == 0 && found == 0)) return false;
  lt_check(hs, "cublasLtMatmulAlgoGetHeuristic");
  const float alpha = g.alpha, beta = g.beta;
  lt_check(a.matmul(a.handle, gd.desc, &alpha, B, gd.lb, A, gd.la, &beta, C, gd.lc, C, gd.lc, &res.algo, wsp,
                    ws_bytes, ctx.stream),
           "cublasLtMatmul");
  return true;
}

}  // namespace lima::cuda
