#include "core/cuda/matmul_bf16.cuh"

namespace dmoe::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // one warp per output row

__device__ __forceinline__ float Bf16ToFloat(uint16_t v) { return __uint_as_float(static_cast<uint32_t>(v) << 16); }

// One warp computes y[t][row] for one row and one token: lanes stride the
// reduction dimension, then a shuffle reduction (fixed order per row, so a
// token's result does not depend on the batch).
__global__ void MatMulBf16Kernel(MatMulBf16Params p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int64_t t = blockIdx.y;
  if (row >= p.rows) return;
  const uint16_t* wr = p.w + row * p.cols;
  const float* xt = p.x + t * p.cols;
  float acc = 0.f;
  for (int64_t j = lane; j < p.cols; j += kWarp) acc += Bf16ToFloat(wr[j]) * xt[j];
  for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) p.y[t * p.rows + row] = acc;
}

}  // namespace

cudaError_t LaunchMatMulBf16(const MatMulBf16Params& p, cudaStream_t stream) {
  if (p.m <= 0 || p.rows <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((p.rows + kRowsPerBlock - 1) / kRowsPerBlock), static_cast<unsigned>(p.m));
  MatMulBf16Kernel<<<grid, kRowsPerBlock * kWarp, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dmoe::cuda
