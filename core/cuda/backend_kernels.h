// Small CUDA kernels of the GPU compute backend that core/cuda/kernels.h
// does not have: embedding gather, residual adds, row gathers, strided
// copies with bf16 conversion, the absorbed-MLA weight transpose, and the
// random weights of --load-format dummy. Plain C++ interface; conventions
// as kernels.h (device pointers, bf16 as uint16_t bits, asynchronous on
// `stream`, INTERNAL naming the kernel when a launch fails).
#ifndef DMOE_CORE_CUDA_BACKEND_KERNELS_H_
#define DMOE_CORE_CUDA_BACKEND_KERNELS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "core/cuda/kernels.h"

namespace dmoe::cuda {

// out[t][i] = float(table[ids[t]][i]) for a table [V, d] of table_type.
absl::Status EmbedRows(const void* table, OutType table_type, const int32_t* ids, int64_t n, int64_t d, float* out,
                       Stream stream);

// x[i] += a[i], or x[i] += (a[i] + b[i]) when b is not null (that order of
// additions, as the CPU backend).
absl::Status AddInPlace(float* x, const float* a, const float* b, int64_t count, Stream stream);

// out[r] = in[rows[r]] for float32 rows of width d.
absl::Status GatherRows(const float* in, const int32_t* rows, int64_t n, int64_t d, float* out, Stream stream);

// dst[a*dst_a + b*dst_b + c] = src[a*src_a + b*src_b + c] for a < na,
// b < nb, c < nc, from float32 to float32 or bf16.
struct StridedCopyParams {
  const float* src = nullptr;
  int64_t src_a = 0, src_b = 0;
  void* dst = nullptr;
  OutType dst_type = OutType::kBF16;
  int64_t dst_a = 0, dst_b = 0;
  int64_t na = 0, nb = 0, nc = 0;
};
absl::Status StridedCopy(const StridedCopyParams& p, Stream stream);

// W_UK[h]^T for every head from kv_b_proj [H*(dn+dv), r] (bf16 or float32):
// out[(h*r + c)*dn + d] = kv_b[(h*(dn+dv) + d)*r + c], out [H*r, dn].
absl::Status TransposeUk(const void* kv_b, OutType type, int64_t heads, int64_t dn, int64_t dv, int64_t r, void* out,
                         Stream stream);

// MLA absorbed attention (kernels.h's MlaAttention, the same function and
// parameters) for any kv_lora_rank and rope_dim: kernels.h's tuned and
// reference kernels take V2/V3's 512 / 64 only, and tiny test models
// (tiny-v3: 32 / 8) need this one. One block per (query, head), scores of
// the whole context in shared memory (max_context_len <= 8192), float32.
// Takes a float32 cache and queries too (shape.elem_type kF32).
// Ignores num_splits / workspace / lse.
absl::Status MlaAttentionAnyDims(const MlaAttentionParams& p, Stream stream);

// out[t] = log_softmax(logits[t])[tokens[t]] for n rows of `vocab` float32
// logits, as core/sampling.h defines it: NaN counts as -inf; when some logit
// is +inf the +inf tokens share the mass (-log(count)) and the others get
// -inf; all -inf gives -inf. (The normalizer is summed in float32 here, in
// double on the CPU.)
absl::Status TokenLogprobs(const float* logits, int64_t n, int64_t vocab, const int32_t* tokens, float* out,
                           Stream stream);

// n random values, exactly RandomTensorValues' (core/synthetic_checkpoint.h)
// for the tensor whose RandomTensorKey is `key`, starting at element
// `first` of that tensor: center + half_width * (2u - 1), stored as float32
// or rounded to bf16.
absl::Status FillRandom(void* dst, OutType type, int64_t n, int64_t first, uint64_t key, float center,
                        float half_width, Stream stream);

}  // namespace dmoe::cuda

#endif  // DMOE_CORE_CUDA_BACKEND_KERNELS_H_
