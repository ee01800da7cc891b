// The CUDA backend's plain C++ interface (no CUDA types): device discovery
// and the BF16-weight matrix product, checked against the CPU backend.
// Built only with -DDMOE_CUDA=ON (target dmoe_cuda).
#ifndef DMOE_CORE_CUDA_CUDA_BACKEND_H_
#define DMOE_CORE_CUDA_CUDA_BACKEND_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/tensor.h"

namespace dmoe::cuda {

struct CudaDeviceInfo {
  int index = 0;
  std::string name;
  int64_t total_memory_bytes = 0;
  int compute_capability_major = 0;
  int compute_capability_minor = 0;
};

// UNAVAILABLE, naming the CUDA error, when there is no driver or no GPU.
absl::StatusOr<std::vector<CudaDeviceInfo>> ListDevices();

// y[m, w.rows] = x[m, w.cols] · w^T on device 0 for a BF16 weight, float32
// activations and accumulation; x and y are host arrays (copies included).
absl::Status MatMulBf16(const float* x, int64_t m, const Matrix& w, float* y);

}  // namespace dmoe::cuda

#endif  // DMOE_CORE_CUDA_CUDA_BACKEND_H_
