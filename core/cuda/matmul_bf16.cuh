// Launcher for the BF16-weight matmul kernel (device pointers).
#ifndef DMOE_CORE_CUDA_MATMUL_BF16_CUH_
#define DMOE_CORE_CUDA_MATMUL_BF16_CUH_

#include <cuda_runtime.h>

#include <cstdint>

namespace dmoe::cuda {

struct MatMulBf16Params {
  const float* x;      // [m, cols]
  const uint16_t* w;   // [rows, cols] bf16 bits
  float* y;            // [m, rows]
  int64_t m, rows, cols;
};

cudaError_t LaunchMatMulBf16(const MatMulBf16Params& params, cudaStream_t stream);

}  // namespace dmoe::cuda

#endif  // DMOE_CORE_CUDA_MATMUL_BF16_CUH_
