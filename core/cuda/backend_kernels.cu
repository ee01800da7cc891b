#include "core/cuda/backend_kernels.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/cuda/cuda_util.cuh"

namespace dmoe::cuda {
namespace {

constexpr int kThreads = 256;

cudaStream_t S(Stream s) { return static_cast<cudaStream_t>(s); }

absl::Status Launched(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(kernel, " launch: ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

unsigned Blocks(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 * 32 ? b : 65535 * 32);
}


template <typename T>
__global__ void EmbedKernel(const T* table, const int32_t* ids, int64_t n, int64_t d, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n * d; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = i / d, c = i % d;
    out[i] = LoadAsFloat(table[static_cast<int64_t>(ids[t]) * d + c]);
  }
}

__global__ void AddKernel(float* x, const float* a, const float* b, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count; i += int64_t{gridDim.x} * blockDim.x) {
    x[i] += b == nullptr ? a[i] : a[i] + b[i];
  }
}

__global__ void GatherKernel(const float* in, const int32_t* rows, int64_t n, int64_t d, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n * d; i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = in[static_cast<int64_t>(rows[i / d]) * d + i % d];
  }
}

__global__ void StridedCopyKernel(StridedCopyParams p) {
  const int64_t total = p.na * p.nb * p.nc;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t c = i % p.nc, b = (i / p.nc) % p.nb, a = i / (p.nc * p.nb);
    const float v = p.src[a * p.src_a + b * p.src_b + c];
    const int64_t o = a * p.dst_a + b * p.dst_b + c;
    if (p.dst_type == OutType::kBF16) {
      static_cast<uint16_t*>(p.dst)[o] = FloatToBf16Bits(v);
    } else {
      static_cast<float*>(p.dst)[o] = v;
    }
  }
}

// Four consecutive c at a time (nc, the strides and both bases multiples of
// 4 elements): one 16-byte load, one 8- or 16-byte store.
__global__ void StridedCopy4Kernel(StridedCopyParams p) {
  const int64_t nc4 = p.nc / 4, total = p.na * p.nb * nc4;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t c = (i % nc4) * 4, ab = i / nc4, b = ab % p.nb, a = ab / p.nb;
    const float4 v = *reinterpret_cast<const float4*>(p.src + a * p.src_a + b * p.src_b + c);
    const int64_t o = a * p.dst_a + b * p.dst_b + c;
    if (p.dst_type == OutType::kBF16) {
      Store4(static_cast<uint16_t*>(p.dst) + o, v);
    } else {
      Store4(static_cast<float*>(p.dst) + o, v);
    }
  }
}

template <typename T>
__global__ void TransposeUkKernel(const T* kv_b, int64_t heads, int64_t dn, int64_t dv, int64_t r, T* out) {
  const int64_t total = heads * r * dn;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t d = i % dn, c = (i / dn) % r, h = i / (dn * r);
    out[i] = kv_b[(h * (dn + dv) + d) * r + c];
  }
}

// SplitMix64's output for state `z` after its increment (core/synthetic_checkpoint.cc).
__device__ __forceinline__ uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__global__ void FillRandomKernel(void* dst, OutType type, int64_t n, int64_t first, uint64_t key, float center,
                                 float half_width) {
  constexpr int64_t kChunk = 1 << 16;  // kRandomTensorChunk
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t e = first + i, c = e / kChunk, k = e % kChunk;
    const uint64_t state = key ^ (static_cast<uint64_t>(c) * 0xd1b54a32d192ed03ull);
    const uint64_t z = Mix(state + static_cast<uint64_t>(k + 1) * 0x9e3779b97f4a7c15ull);
    const double u = static_cast<double>(z >> 11) * 0x1.0p-53;
    // No fused multiply-add: the CPU generator rounds the product, then the sum.
    const float v = __fadd_rn(center, __fmul_rn(half_width, static_cast<float>(2.0 * u - 1.0)));
    if (type == OutType::kBF16) {
      static_cast<uint16_t*>(dst)[i] = FloatToBf16Bits(v);
    } else {
      static_cast<float*>(dst)[i] = v;
    }
  }
}

constexpr int kMlaThreads = 128;
constexpr int64_t kMlaMaxContext = 8192;

// Block-wide reduction of one float per thread (sum or max); every thread
// gets the result.
template <bool kMax>
__device__ float BlockReduce(float v, float* scratch /* [32] */) {
  for (int o = 16; o > 0; o /= 2) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? fmaxf(v, w) : v + w;
  }
  __syncthreads();  // scratch may still be read by a previous call
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) r = kMax ? fmaxf(r, scratch[w]) : r + scratch[w];
  return r;
}

// T: the element of the cache and the queries (bf16 bits or float).
template <typename T>
__global__ void MlaAnyDimsKernel(MlaAttentionParams p) {
  extern __shared__ float smem[];
  __shared__ float scratch[32];
  const T* q_lat = static_cast<const T*>(p.q_lat);
  const T* q_pe = static_cast<const T*>(p.q_pe);
  const T* cache = static_cast<const T*>(p.cache);
  const int64_t r = p.shape.kv_lora_rank, dr = p.shape.rope_dim, width = r + dr, ps = p.shape.page_size;
  float* q = smem;           // [width]
  float* s = smem + width;   // [context]
  const int64_t row = blockIdx.x;  // query * H + head
  const int64_t qi = row / p.num_heads;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) {
    q[i] = i < r ? LoadAsFloat(q_lat[row * r + i]) : LoadAsFloat(q_pe[row * dr + i - r]);
  }
  __syncthreads();
  const int32_t pos = p.query_pos[qi];
  const int64_t ctx = pos < 0 ? 0 : int64_t{pos} + 1;
  const int32_t* bt = p.block_tables + int64_t{p.query_seq[qi]} * p.max_pages_per_seq;
  float local_max = -INFINITY;
  for (int64_t j = threadIdx.x; j < ctx; j += blockDim.x) {
    const T* e = cache + (int64_t{bt[j / ps]} * ps + j % ps) * width;
    float d = 0.f;
    for (int64_t i = 0; i < width; ++i) d += q[i] * LoadAsFloat(e[i]);
    s[j] = d * p.scale;
    local_max = fmaxf(local_max, s[j]);
  }
  const float m = BlockReduce<true>(local_max, scratch);
  float local_sum = 0.f;
  for (int64_t j = threadIdx.x; j < ctx; j += blockDim.x) {
    s[j] = expf(s[j] - m);
    local_sum += s[j];
  }
  const float l = BlockReduce<false>(local_sum, scratch);  // its barriers also publish s
  const float inv = l > 0.f ? 1.0f / l : 0.f;
  for (int64_t i = threadIdx.x; i < r; i += blockDim.x) {
    float acc = 0.f;
    for (int64_t j = 0; j < ctx; ++j) acc += s[j] * LoadAsFloat(cache[(int64_t{bt[j / ps]} * ps + j % ps) * width + i]);
    p.out[row * r + i] = acc * inv;
  }
}

__device__ __forceinline__ float Clean(float v) { return isnan(v) ? -INFINITY : v; }

// One block per row (ForEachInRow: several loads in flight per thread).
__global__ void TokenLogprobsKernel(const float* logits, int64_t vocab, const int32_t* tokens, float* out) {
  __shared__ float scratch[32];
  const float* row = logits + blockIdx.x * vocab;
  float mx = -INFINITY;
  ForEachInRow(row, vocab, [&](float v, int64_t) { mx = fmaxf(mx, Clean(v)); });
  mx = BlockReduce<true>(mx, scratch);
  const float mine = Clean(row[tokens[blockIdx.x]]);
  float acc = 0.f;
  if (isinf(mx) && mx > 0) {  // the +inf tokens share the mass
    ForEachInRow(row, vocab, [&](float v, int64_t) { acc += Clean(v) == mx ? 1.f : 0.f; });
  } else if (isfinite(mx)) {
    ForEachInRow(row, vocab, [&](float v, int64_t) { acc += expf(Clean(v) - mx); });
  }
  acc = BlockReduce<false>(acc, scratch);
  if (threadIdx.x == 0) {
    if (isinf(mx) && mx > 0) {
      out[blockIdx.x] = mine == mx ? -logf(acc) : -INFINITY;
    } else if (isfinite(mx)) {
      out[blockIdx.x] = mine - mx - logf(acc);
    } else {
      out[blockIdx.x] = -INFINITY;
    }
  }
}

}  // namespace

absl::Status TokenLogprobs(const float* logits, int64_t n, int64_t vocab, const int32_t* tokens, float* out,
                           Stream stream) {
  if (vocab <= 0) return absl::InvalidArgumentError("TokenLogprobs: vocab > 0");
  if (n <= 0) return absl::OkStatus();
  TokenLogprobsKernel<<<static_cast<unsigned>(n), 1024, 0, S(stream)>>>(logits, vocab, tokens, out);
  return Launched("TokenLogprobsKernel");
}

absl::Status MlaAttentionAnyDims(const MlaAttentionParams& p, Stream stream) {
  if (p.shape.kv_lora_rank <= 0 || p.shape.rope_dim < 0 || p.shape.page_size <= 0 || p.num_heads <= 0 ||
      p.max_pages_per_seq <= 0) {
    return absl::InvalidArgumentError("MlaAttentionAnyDims: shape");
  }
  if (p.max_context_len > kMlaMaxContext) {
    return absl::InvalidArgumentError(absl::StrCat("MlaAttentionAnyDims: context ", p.max_context_len, " > ",
                                                   kMlaMaxContext, " (kv_lora_rank 512 / rope 64 take the tuned kernel)"));
  }
  if (p.num_queries <= 0) return absl::OkStatus();
  const size_t smem = static_cast<size_t>(p.shape.entry_width() + std::max<int64_t>(p.max_context_len, 1)) * sizeof(float);
  const bool f32 = p.shape.elem_type == OutType::kF32;
  if (smem > 48 * 1024) {
    static const cudaError_t attr[2] = {
        cudaFuncSetAttribute(MlaAnyDimsKernel<uint16_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024),
        cudaFuncSetAttribute(MlaAnyDimsKernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024)};
    if (attr[f32] != cudaSuccess) {
      return absl::InternalError(
          absl::StrCat("cudaFuncSetAttribute(MlaAnyDimsKernel): ", cudaGetErrorString(attr[f32])));
    }
  }
  const unsigned blocks = static_cast<unsigned>(p.num_queries * p.num_heads);
  if (f32) {
    MlaAnyDimsKernel<float><<<blocks, kMlaThreads, smem, S(stream)>>>(p);
  } else {
    MlaAnyDimsKernel<uint16_t><<<blocks, kMlaThreads, smem, S(stream)>>>(p);
  }
  return Launched("MlaAnyDimsKernel");
}

absl::Status EmbedRows(const void* table, OutType table_type, const int32_t* ids, int64_t n, int64_t d, float* out,
                       Stream stream) {
  if (n * d == 0) return absl::OkStatus();
  if (table_type == OutType::kF32) {
    EmbedKernel<<<Blocks(n * d), kThreads, 0, S(stream)>>>(static_cast<const float*>(table), ids, n, d, out);
  } else {
    EmbedKernel<<<Blocks(n * d), kThreads, 0, S(stream)>>>(static_cast<const uint16_t*>(table), ids, n, d, out);
  }
  return Launched("EmbedKernel");
}

absl::Status AddInPlace(float* x, const float* a, const float* b, int64_t count, Stream stream) {
  if (count == 0) return absl::OkStatus();
  AddKernel<<<Blocks(count), kThreads, 0, S(stream)>>>(x, a, b, count);
  return Launched("AddKernel");
}

absl::Status GatherRows(const float* in, const int32_t* rows, int64_t n, int64_t d, float* out, Stream stream) {
  if (n * d == 0) return absl::OkStatus();
  GatherKernel<<<Blocks(n * d), kThreads, 0, S(stream)>>>(in, rows, n, d, out);
  return Launched("GatherKernel");
}

absl::Status StridedCopy(const StridedCopyParams& p, Stream stream) {
  const int64_t total = p.na * p.nb * p.nc;
  if (total == 0) return absl::OkStatus();
  const bool by4 = p.nc % 4 == 0 && p.src_a % 4 == 0 && p.src_b % 4 == 0 && p.dst_a % 4 == 0 && p.dst_b % 4 == 0 &&
                   reinterpret_cast<uintptr_t>(p.src) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.dst) % (p.dst_type == OutType::kBF16 ? 8 : 16) == 0;
  if (by4) {
    StridedCopy4Kernel<<<Blocks(total / 4), kThreads, 0, S(stream)>>>(p);
    return Launched("StridedCopy4Kernel");
  }
  StridedCopyKernel<<<Blocks(total), kThreads, 0, S(stream)>>>(p);
  return Launched("StridedCopyKernel");
}

absl::Status TransposeUk(const void* kv_b, OutType type, int64_t heads, int64_t dn, int64_t dv, int64_t r, void* out,
                         Stream stream) {
  const int64_t total = heads * r * dn;
  if (total == 0) return absl::OkStatus();
  if (type == OutType::kF32) {
    TransposeUkKernel<<<Blocks(total), kThreads, 0, S(stream)>>>(static_cast<const float*>(kv_b), heads, dn, dv, r,
                                                                 static_cast<float*>(out));
  } else {
    TransposeUkKernel<<<Blocks(total), kThreads, 0, S(stream)>>>(static_cast<const uint16_t*>(kv_b), heads, dn, dv,
                                                                 r, static_cast<uint16_t*>(out));
  }
  return Launched("TransposeUkKernel");
}

absl::Status FillRandom(void* dst, OutType type, int64_t n, int64_t first, uint64_t key, float center,
                        float half_width, Stream stream) {
  if (n == 0) return absl::OkStatus();
  FillRandomKernel<<<Blocks(n), kThreads, 0, S(stream)>>>(dst, type, n, first, key, center, half_width);
  return Launched("FillRandomKernel");
}

}  // namespace dmoe::cuda
