#include "core/cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "core/cuda/matmul_bf16.cuh"

namespace dmoe::cuda {
namespace {

absl::Status CudaError(cudaError_t err, const char* what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

#define DMOE_CUDA_RETURN_IF_ERROR(expr)                  \
  do {                                                   \
    cudaError_t dmoe_err_ = (expr);                      \
    if (dmoe_err_ != cudaSuccess) return CudaError(dmoe_err_, #expr); \
  } while (0)

// Device buffer freed on scope exit.
struct DeviceBuffer {
  void* ptr = nullptr;
  ~DeviceBuffer() {
    if (ptr != nullptr) cudaFree(ptr);
  }
};

}  // namespace

absl::StatusOr<std::vector<CudaDeviceInfo>> ListDevices() {
  int count = 0;
  DMOE_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  std::vector<CudaDeviceInfo> devices;
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop;
    DMOE_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, i));
    devices.push_back({i, prop.name, static_cast<int64_t>(prop.totalGlobalMem), prop.major, prop.minor});
  }
  return devices;
}

absl::Status MatMulBf16(const float* x, int64_t m, const Matrix& w, float* y) {
  if (w.dtype != DType::kBF16) return absl::InvalidArgumentError("MatMulBf16 needs a BF16 weight");
  DeviceBuffer dx, dw, dy;
  const size_t xb = m * w.cols * sizeof(float), wb = w.rows * w.cols * 2, yb = m * w.rows * sizeof(float);
  DMOE_CUDA_RETURN_IF_ERROR(cudaMalloc(&dx.ptr, xb));
  DMOE_CUDA_RETURN_IF_ERROR(cudaMalloc(&dw.ptr, wb));
  DMOE_CUDA_RETURN_IF_ERROR(cudaMalloc(&dy.ptr, yb));
  DMOE_CUDA_RETURN_IF_ERROR(cudaMemcpy(dx.ptr, x, xb, cudaMemcpyHostToDevice));
  DMOE_CUDA_RETURN_IF_ERROR(cudaMemcpy(dw.ptr, w.data, wb, cudaMemcpyHostToDevice));
  MatMulBf16Params p{static_cast<const float*>(dx.ptr), static_cast<const uint16_t*>(dw.ptr),
                     static_cast<float*>(dy.ptr), m, w.rows, w.cols};
  DMOE_CUDA_RETURN_IF_ERROR(LaunchMatMulBf16(p, nullptr));
  DMOE_CUDA_RETURN_IF_ERROR(cudaMemcpy(y, dy.ptr, yb, cudaMemcpyDeviceToHost));
  return absl::OkStatus();
}

}  // namespace dmoe::cuda
