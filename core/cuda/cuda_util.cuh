// Shared device helpers of the dmoe CUDA kernels (CUDA-only header).
#ifndef DMOE_CORE_CUDA_CUDA_UTIL_CUH_
#define DMOE_CORE_CUDA_CUDA_UTIL_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace dmoe::cuda {

inline absl::Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

// The launch's own error (bad configuration, no device); does not wait for it.
inline absl::Status LaunchStatus(const char* kernel) { return CudaStatus(cudaGetLastError(), kernel); }

inline cudaStream_t AsStream(void* s) { return static_cast<cudaStream_t>(s); }

#define DMOE_CUDA_CHECK_ARG(cond, msg)                   \
  do {                                                   \
    if (!(cond)) return absl::InvalidArgumentError(msg); \
  } while (0)

__device__ __forceinline__ float Bf16BitsToFloat(uint16_t v) { return __uint_as_float(static_cast<uint32_t>(v) << 16); }
__device__ __forceinline__ uint16_t FloatToBf16Bits(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
// A float through an element that is bf16 bits or a float (kernels templated on it).
__device__ __forceinline__ float LoadAsFloat(uint16_t v) { return Bf16BitsToFloat(v); }
__device__ __forceinline__ float LoadAsFloat(float v) { return v; }
__device__ __forceinline__ void StoreAs(uint16_t* dst, float v) { *dst = FloatToBf16Bits(v); }
__device__ __forceinline__ void StoreAs(float* dst, float v) { *dst = v; }
// Four floats stored as bf16 bits or floats at dst (4-element aligned).
__device__ __forceinline__ void Store4(float* dst, float4 v) { *reinterpret_cast<float4*>(dst) = v; }
__device__ __forceinline__ void Store4(uint16_t* dst, float4 v) {
  const uint32_t lo = FloatToBf16Bits(v.x) | (uint32_t{FloatToBf16Bits(v.y)} << 16);
  const uint32_t hi = FloatToBf16Bits(v.z) | (uint32_t{FloatToBf16Bits(v.w)} << 16);
  *reinterpret_cast<uint2*>(dst) = make_uint2(lo, hi);
}

__host__ __device__ inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The current device's SM count (132 when it cannot be read), read once.
inline int NumSms() {
  static const int sms = [] {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      return 132;
    }
    return n;
  }();
  return sms;
}

// f(row[i], i) for every i < n, the block's threads striding over the row
// with kUnroll independent loads in flight each (one block reading a whole
// vocabulary row is latency-bound with one load at a time).
template <int kUnroll = 8, typename F>
__device__ __forceinline__ void ForEachInRow(const float* row, int64_t n, F f) {
  const int64_t step = int64_t{blockDim.x} * kUnroll;
  for (int64_t base = threadIdx.x; base < n; base += step) {
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t{u} * blockDim.x;
      v[u] = i < n ? row[i] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t{u} * blockDim.x;
      if (i < n) f(v[u], i);
    }
  }
}

}  // namespace dmoe::cuda

#endif  // DMOE_CORE_CUDA_CUDA_UTIL_CUH_
