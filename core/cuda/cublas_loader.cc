// cuBLAS and cuBLASLt, loaded on first use instead of linked.
//
// Why: libcublasLt carries ~94 KiB of static thread-local storage, and every
// thread of a process that links it needs a stack larger than that. civetweb
// (prometheus-cpp's /metrics server) starts its threads with a fixed 100 KiB
// stack, so in a process linking cuBLAS they fail to start ("Cannot create
// threads") and no CPU server of a CUDA build could export metrics. Loading
// the libraries only when the CUDA backend first calls them keeps the TLS out
// of every process that never uses a GPU.
//
// Each function below has the exact signature of its declaration in
// cublas_api.h / cublasLt.h (the compiler checks them against each other) and
// forwards to the library's symbol. Without the library every call returns
// CUBLAS_STATUS_NOT_INITIALIZED, which callers already turn into a Status.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <dlfcn.h>

#include <string>

namespace {

// By soname (the loader's path), else from the toolkit this was built with.
// dlopen keeps a reference count, so a second call returns the same handle.
void* Library(const char* soname) {
  if (void* lib = dlopen(soname, RTLD_NOW | RTLD_LOCAL)) return lib;
  return dlopen((std::string(DMOE_CUDA_LIBRARY_DIR) + "/" + soname).c_str(), RTLD_NOW | RTLD_LOCAL);
}

template <typename Fn>
Fn* Resolve(const char* soname, const char* name) {
  void* lib = Library(soname);
  return lib == nullptr ? nullptr : reinterpret_cast<Fn*>(dlsym(lib, name));
}

constexpr const char* kCublas = "libcublas.so.13";
constexpr const char* kCublasLt = "libcublasLt.so.13";

}  // namespace

// One forwarder: `ret name params` calls the loaded `name` with `args`.
#define DMOE_CUBLAS_FORWARD(lib, name, params, args)                        \
  extern "C" cublasStatus_t CUBLASWINAPI name params {                      \
    static auto* const fn = Resolve<cublasStatus_t params>(lib, #name);     \
    return fn == nullptr ? CUBLAS_STATUS_NOT_INITIALIZED : fn args;         \
  }

extern "C" const char* CUBLASWINAPI cublasGetStatusString(cublasStatus_t status) {
  static auto* const fn = Resolve<const char*(cublasStatus_t)>(kCublas, "cublasGetStatusString");
  return fn == nullptr ? "cuBLAS could not be loaded (libcublas.so.13)" : fn(status);
}

DMOE_CUBLAS_FORWARD(kCublas, cublasCreate_v2, (cublasHandle_t * handle), (handle))
DMOE_CUBLAS_FORWARD(kCublas, cublasDestroy_v2, (cublasHandle_t handle), (handle))
DMOE_CUBLAS_FORWARD(kCublas, cublasSetStream_v2, (cublasHandle_t handle, cudaStream_t stream), (handle, stream))
DMOE_CUBLAS_FORWARD(kCublas, cublasSetMathMode, (cublasHandle_t handle, cublasMath_t mode), (handle, mode))
DMOE_CUBLAS_FORWARD(kCublas, cublasSgemm_v2,
                    (cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
                     const float* alpha, const float* A, int lda, const float* B, int ldb, const float* beta,
                     float* C, int ldc),
                    (handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc))
DMOE_CUBLAS_FORWARD(kCublas, cublasGemmEx,
                    (cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
                     const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B, cudaDataType Btype,
                     int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                     cublasComputeType_t computeType, cublasGemmAlgo_t algo),
                    (handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype, ldc,
                     computeType, algo))
DMOE_CUBLAS_FORWARD(kCublas, cublasGemmGroupedBatchedEx,
                    (cublasHandle_t handle, const cublasOperation_t transa_array[],
                     const cublasOperation_t transb_array[], const int m_array[], const int n_array[],
                     const int k_array[], const void* alpha_array, const void* const Aarray[], cudaDataType_t Atype,
                     const int lda_array[], const void* const Barray[], cudaDataType_t Btype, const int ldb_array[],
                     const void* beta_array, void* const Carray[], cudaDataType_t Ctype, const int ldc_array[],
                     int group_count, const int group_size[], cublasComputeType_t computeType),
                    (handle, transa_array, transb_array, m_array, n_array, k_array, alpha_array, Aarray, Atype,
                     lda_array, Barray, Btype, ldb_array, beta_array, Carray, Ctype, ldc_array, group_count,
                     group_size, computeType))

DMOE_CUBLAS_FORWARD(kCublasLt, cublasLtCreate, (cublasLtHandle_t * handle), (handle))
DMOE_CUBLAS_FORWARD(kCublasLt, cublasLtDestroy, (cublasLtHandle_t handle), (handle))
DMOE_CUBLAS_FORWARD(kCublasLt, cublasLtMatrixLayoutCreate,
                    (cublasLtMatrixLayout_t * layout, cudaDataType type, uint64_t rows, uint64_t cols, int64_t ld),
                    (layout, type, rows, cols, ld))
DMOE_CUBLAS_FORWARD(kCublasLt, cublasLtMatrixLayoutDestroy, (cublasLtMatrixLayout_t layout), (layout))
DMOE_CUBLAS_FORWARD(kCublasLt, cublasLtMatmulDescCreate,
                    (cublasLtMatmulDesc_t * desc, cublasComputeType_t computeType, cudaDataType_t scaleType),
                    (desc, computeType, scaleType))
DMOE_CUBLAS_FORWARD(kCublasLt, cublasLtMatmulDescDestroy, (cublasLtMatmulDesc_t desc), (desc))
DMOE_CUBLAS_FORWARD(kCublasLt, cublasLtMatmulDescSetAttribute,
                    (cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const void* buf, size_t size),
                    (desc, attr, buf, size))
DMOE_CUBLAS_FORWARD(kCublasLt, cublasLtMatmulPreferenceCreate, (cublasLtMatmulPreference_t * pref), (pref))
DMOE_CUBLAS_FORWARD(kCublasLt, cublasLtMatmulPreferenceDestroy, (cublasLtMatmulPreference_t pref), (pref))
DMOE_CUBLAS_FORWARD(kCublasLt, cublasLtMatmulPreferenceSetAttribute,
                    (cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr, const void* buf,
                     size_t size),
                    (pref, attr, buf, size))
DMOE_CUBLAS_FORWARD(kCublasLt, cublasLtMatmulAlgoGetHeuristic,
                    (cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t Adesc,
                     cublasLtMatrixLayout_t Bdesc, cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
                     cublasLtMatmulPreference_t preference, int requestedAlgoCount,
                     cublasLtMatmulHeuristicResult_t heuristicResultsArray[], int* returnAlgoCount),
                    (handle, desc, Adesc, Bdesc, Cdesc, Ddesc, preference, requestedAlgoCount, heuristicResultsArray,
                     returnAlgoCount))
DMOE_CUBLAS_FORWARD(kCublasLt, cublasLtMatmul,
                    (cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha, const void* A,
                     cublasLtMatrixLayout_t Adesc, const void* B, cublasLtMatrixLayout_t Bdesc, const void* beta,
                     const void* C, cublasLtMatrixLayout_t Cdesc, void* D, cublasLtMatrixLayout_t Ddesc,
                     const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspaceSizeInBytes,
                     cudaStream_t stream),
                    (handle, desc, alpha, A, Adesc, B, Bdesc, beta, C, Cdesc, D, Ddesc, algo, workspace,
                     workspaceSizeInBytes, stream))
