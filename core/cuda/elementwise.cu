// Row-wise and elementwise kernels: conversions, RMSNorm, RoPE, SwiGLU,
// argmax, the latent-cache write.
#include <cfloat>

#include "core/cuda/cuda_util.cuh"
#include "core/cuda/kernels.h"

namespace dmoe::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void F32ToBf16Kernel(const float* in, int64_t n, uint16_t* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = FloatToBf16Bits(in[i]);
  }
}

__global__ void Bf16ToF32Kernel(const uint16_t* in, int64_t n, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = Bf16BitsToFloat(in[i]);
  }
}

unsigned GridFor(int64_t n) {
  const int64_t blocks = CeilDiv(n, kThreads);
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

// Block-wide float sum; every thread gets the result.
__device__ float BlockSum(float v) {
  __shared__ float partial[32];
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  const int warps = blockDim.x / 32;
  float s = lane < warps ? partial[lane] : 0.f;
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

// Element i of the block's row of out: w[i] * x * inv in out_type.
__device__ __forceinline__ void StoreNormed(const RmsNormParams& p, int64_t i, float x, float inv) {
  const float v = p.w[i] * (x * inv);
  if (p.out_type == OutType::kF32) {
    static_cast<float*>(p.out)[blockIdx.x * p.ldo + i] = v;
  } else {
    static_cast<uint16_t*>(p.out)[blockIdx.x * p.ldo + i] = FloatToBf16Bits(v);
  }
}

// One block per row. Each thread holds its kPer elements in registers
// (loaded all at once, not one dependent load per loop turn: a row is
// latency-bound at decode sizes), so the row is read once.
template <int kPer>
__global__ void __launch_bounds__(kThreads) RmsNormKernel(RmsNormParams p) {
  const float* x = p.x + blockIdx.x * p.ldx;
  const int d = static_cast<int>(p.d);
  float v[kPer];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * kThreads;
    v[j] = i < d ? x[i] : 0.f;
  }
#pragma unroll
  for (int j = 0; j < kPer; ++j) ss += v[j] * v[j];
  ss = BlockSum(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(p.d) + p.eps);
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int i = threadIdx.x + j * kThreads;
    if (i >= d) break;
    StoreNormed(p, i, v[j], inv);
  }
}

// Rows wider than the register kernels take (kThreads * 32): two passes.
__global__ void RmsNormWideKernel(RmsNormParams p) {
  const float* x = p.x + blockIdx.x * p.ldx;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < p.d; i += blockDim.x) ss += x[i] * x[i];
  ss = BlockSum(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(p.d) + p.eps);
  for (int64_t i = threadIdx.x; i < p.d; i += blockDim.x) StoreNormed(p, i, x[i], inv);
}

// One thread per (row, head, pair).
__global__ void RopeKernel(RopeParams p) {
  const int64_t half = p.rope_dim / 2;
  const int64_t total = p.n * p.num_heads * half;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = idx % half;
    const int64_t h = (idx / half) % p.num_heads;
    const int64_t t = idx / (half * p.num_heads);
    float* y = p.x + t * p.ld + h * p.head_stride + p.offset;
    const float angle = static_cast<float>(p.pos[t]) * p.inv_freq[i];  // float32 product, as core/rope.cc
    const float cs = cosf(angle) * p.attention_factor;
    const float sn = sinf(angle) * p.attention_factor;
    float* a = p.interleaved ? &y[2 * i] : &y[i];
    float* b = p.interleaved ? &y[2 * i + 1] : &y[i + half];
    const float av = *a, bv = *b;
    *a = av * cs - bv * sn;
    *b = bv * cs + av * sn;
  }
}

__global__ void SiluMulKernel(const float* gu, int64_t n, int64_t inter, void* out, OutType out_type) {
  const int64_t total = n * inter;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = idx / inter, i = idx % inter;
    const float g = gu[t * 2 * inter + i], u = gu[t * 2 * inter + inter + i];
    const float v = g / (1.0f + expf(-g)) * u;
    if (out_type == OutType::kF32) {
      static_cast<float*>(out)[idx] = v;
    } else {
      static_cast<uint16_t*>(out)[idx] = FloatToBf16Bits(v);
    }
  }
}

// Larger value wins; on equal values the lower index; NaN never wins.
__device__ __forceinline__ void ArgmaxMerge(float& best, int32_t& arg, float v, int32_t i) {
  if (v > best || (v == best && i < arg)) {
    best = v;
    arg = i;
  }
}

// One block per row (ForEachInRow: several loads in flight per thread).
__global__ void ArgmaxKernel(const float* logits, int64_t vocab, int32_t* out) {
  const float* row = logits + blockIdx.x * vocab;
  float best = -INFINITY;
  int32_t arg = INT32_MAX;
  ForEachInRow(row, vocab, [&](float v, int64_t i) { ArgmaxMerge(best, arg, v, static_cast<int32_t>(i)); });
  for (int o = 16; o > 0; o /= 2) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int32_t oa = __shfl_xor_sync(0xffffffffu, arg, o);
    ArgmaxMerge(best, arg, ob, oa);
  }
  __shared__ float sb[32];
  __shared__ int32_t sa[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sb[warp] = best;
    sa[warp] = arg;
  }
  __syncthreads();
  if (warp == 0) {
    best = lane < blockDim.x / 32 ? sb[lane] : -INFINITY;
    arg = lane < blockDim.x / 32 ? sa[lane] : INT32_MAX;
    for (int o = 16; o > 0; o /= 2) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int32_t oa = __shfl_xor_sync(0xffffffffu, arg, o);
      ArgmaxMerge(best, arg, ob, oa);
    }
    // Every logit -inf or NaN: token 0 (core/sampling.h's rule).
    if (lane == 0) out[blockIdx.x] = arg == INT32_MAX ? 0 : arg;
  }
}


// Block (expert pair, token pair): its 8 warps split d into 8 ranges, lanes
// stride 4 floats, then warps and ranges are summed in a fixed order
// (decode sizes: a short dependent chain per thread, not d / 128 turns).
constexpr int kRouterWarps = 8;
__global__ void __launch_bounds__(kRouterWarps * 32)
    RouterLogitsKernel(const float* x, int64_t n, int64_t d, const float* w, int64_t E, float* logits) {
  __shared__ float partial[kRouterWarps][4];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t e0 = int64_t{blockIdx.x} * 2, t0 = int64_t{blockIdx.y} * 2;
  const int64_t d4 = d / 4, per_warp = CeilDiv(d4, kRouterWarps);
  const int64_t i0 = warp * per_warp, i1 = i0 + per_warp < d4 ? i0 + per_warp : d4;
  // Rows past the end read row 0 and are not written.
  const float4* we0 = reinterpret_cast<const float4*>(w + e0 * d);
  const float4* we1 = reinterpret_cast<const float4*>(w + (e0 + 1 < E ? e0 + 1 : e0) * d);
  const float4* xt0 = reinterpret_cast<const float4*>(x + t0 * d);
  const float4* xt1 = reinterpret_cast<const float4*>(x + (t0 + 1 < n ? t0 + 1 : t0) * d);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};  // (e0,t0) (e0,t1) (e1,t0) (e1,t1)
#pragma unroll 2
  for (int64_t i = i0 + lane; i < i1; i += 32) {
    const float4 a0 = we0[i], a1 = we1[i], b0 = xt0[i], b1 = xt1[i];
    acc[0] += a0.x * b0.x + a0.y * b0.y + a0.z * b0.z + a0.w * b0.w;
    acc[1] += a0.x * b1.x + a0.y * b1.y + a0.z * b1.z + a0.w * b1.w;
    acc[2] += a1.x * b0.x + a1.y * b0.y + a1.z * b0.z + a1.w * b0.w;
    acc[3] += a1.x * b1.x + a1.y * b1.y + a1.z * b1.z + a1.w * b1.w;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    for (int o = 16; o > 0; o /= 2) acc[j] += __shfl_xor_sync(0xffffffffu, acc[j], o);
  }
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < 4; ++j) partial[warp][j] = acc[j];
  }
  __syncthreads();
  if (threadIdx.x >= 4) return;
  const int j = threadIdx.x;
  float sum = 0.f;
#pragma unroll
  for (int w8 = 0; w8 < kRouterWarps; ++w8) sum += partial[w8][j];
  const int64_t e = e0 + j / 2, t = t0 + j % 2;
  if (e < E && t < n) logits[t * E + e] = sum;
}

// One block per token; T: the cache's element (bf16 bits or float).
template <typename T>
__global__ void LatentCacheWriteKernel(LatentCacheWriteParams p) {
  const int32_t slot = p.slot[blockIdx.x];
  if (slot < 0) return;
  const int64_t r = p.shape.kv_lora_rank, width = r + p.shape.rope_dim;
  T* dst = static_cast<T*>(p.cache) + static_cast<int64_t>(slot) * width;
  const float* c = p.c + blockIdx.x * p.c_ld;
  const float* k = p.k_pe + blockIdx.x * p.k_pe_ld;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) StoreAs(&dst[i], i < r ? c[i] : k[i - r]);
}

}  // namespace

absl::Status ConvertF32ToBf16(const float* in, int64_t n, uint16_t* out, Stream stream) {
  if (n <= 0) return absl::OkStatus();
  F32ToBf16Kernel<<<GridFor(n), kThreads, 0, AsStream(stream)>>>(in, n, out);
  return LaunchStatus("F32ToBf16Kernel");
}

absl::Status ConvertBf16ToF32(const uint16_t* in, int64_t n, float* out, Stream stream) {
  if (n <= 0) return absl::OkStatus();
  Bf16ToF32Kernel<<<GridFor(n), kThreads, 0, AsStream(stream)>>>(in, n, out);
  return LaunchStatus("Bf16ToF32Kernel");
}

absl::Status RmsNorm(const RmsNormParams& p0, Stream stream) {
  RmsNormParams p = p0;
  if (p.ldx == 0) p.ldx = p.d;
  if (p.ldo == 0) p.ldo = p.d;
  DMOE_CUDA_CHECK_ARG(p.d > 0 && p.ldx >= p.d && p.ldo >= p.d, "RmsNorm: d > 0, ldx >= d, ldo >= d");
  DMOE_CUDA_CHECK_ARG(p.n < (int64_t{1} << 31), "RmsNorm: n too large");
  if (p.n <= 0) return absl::OkStatus();
  const unsigned rows = static_cast<unsigned>(p.n);
  const int64_t per = CeilDiv(p.d, kThreads);
  cudaStream_t s = AsStream(stream);
  if (per <= 2) {
    RmsNormKernel<2><<<rows, kThreads, 0, s>>>(p);
  } else if (per <= 4) {
    RmsNormKernel<4><<<rows, kThreads, 0, s>>>(p);
  } else if (per <= 8) {
    RmsNormKernel<8><<<rows, kThreads, 0, s>>>(p);
  } else if (per <= 16) {
    RmsNormKernel<16><<<rows, kThreads, 0, s>>>(p);
  } else if (per <= 32) {
    RmsNormKernel<32><<<rows, kThreads, 0, s>>>(p);
  } else {
    RmsNormWideKernel<<<rows, kThreads, 0, s>>>(p);
  }
  return LaunchStatus("RmsNormKernel");
}

absl::Status ApplyRope(const RopeParams& p, Stream stream) {
  DMOE_CUDA_CHECK_ARG(p.rope_dim > 0 && p.rope_dim % 2 == 0 && p.rope_dim <= 256, "ApplyRope: rope_dim even, <= 256");
  DMOE_CUDA_CHECK_ARG(p.num_heads >= 1, "ApplyRope: num_heads >= 1");
  if (p.n <= 0) return absl::OkStatus();
  RopeKernel<<<GridFor(p.n * p.num_heads * p.rope_dim / 2), kThreads, 0, AsStream(stream)>>>(p);
  return LaunchStatus("RopeKernel");
}

absl::Status SiluMul(const float* gu, int64_t n, int64_t inter, void* out, OutType out_type, Stream stream) {
  DMOE_CUDA_CHECK_ARG(inter > 0, "SiluMul: inter > 0");
  if (n <= 0) return absl::OkStatus();
  SiluMulKernel<<<GridFor(n * inter), kThreads, 0, AsStream(stream)>>>(gu, n, inter, out, out_type);
  return LaunchStatus("SiluMulKernel");
}

absl::Status ArgmaxRows(const float* logits, int64_t n, int64_t vocab, int32_t* out, Stream stream) {
  DMOE_CUDA_CHECK_ARG(vocab > 0 && vocab < INT32_MAX, "ArgmaxRows: 0 < vocab < 2^31");
  if (n <= 0) return absl::OkStatus();
  ArgmaxKernel<<<static_cast<unsigned>(n), 1024, 0, AsStream(stream)>>>(logits, vocab, out);
  return LaunchStatus("ArgmaxKernel");
}

absl::Status RouterLogitsF32(const float* x, int64_t n, int64_t d, const float* w, int64_t num_experts, float* logits,
                             Stream stream) {
  DMOE_CUDA_CHECK_ARG(d > 0 && d % 4 == 0 && num_experts > 0, "RouterLogitsF32: d % 4 == 0, num_experts > 0");
  DMOE_CUDA_CHECK_ARG(reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0,
                      "RouterLogitsF32: x and w 16-byte aligned");
  DMOE_CUDA_CHECK_ARG(n < (int64_t{1} << 17), "RouterLogitsF32: n < 2^17");
  if (n <= 0) return absl::OkStatus();
  DMOE_CUDA_CHECK_ARG(num_experts < (int64_t{1} << 31), "RouterLogitsF32: num_experts < 2^31");
  const dim3 grid(static_cast<unsigned>(CeilDiv(num_experts, 2)), static_cast<unsigned>(CeilDiv(n, 2)));
  RouterLogitsKernel<<<grid, kRouterWarps * 32, 0, AsStream(stream)>>>(x, n, d, w, num_experts, logits);
  return LaunchStatus("RouterLogitsKernel");
}

absl::Status LatentCacheWrite(const LatentCacheWriteParams& p, Stream stream) {
  DMOE_CUDA_CHECK_ARG(p.shape.kv_lora_rank > 0 && p.shape.rope_dim >= 0, "LatentCacheWrite: shape");
  if (p.n <= 0) return absl::OkStatus();
  if (p.shape.elem_type == OutType::kF32) {
    LatentCacheWriteKernel<float><<<static_cast<unsigned>(p.n), 128, 0, AsStream(stream)>>>(p);
  } else {
    LatentCacheWriteKernel<uint16_t><<<static_cast<unsigned>(p.n), 128, 0, AsStream(stream)>>>(p);
  }
  return LaunchStatus("LatentCacheWriteKernel");
}

}  // namespace dmoe::cuda
