// The CUDA kernels of the GPU compute backend, behind a plain C++ interface
// (no CUDA types; built only with -DDMOE_CUDA=ON, target dmoe_cuda).
//
// Conventions for every function here:
//  - Pointers named in a Params struct are DEVICE pointers unless the field
//    says "host". bf16 values are passed as their bits (uint16_t), the
//    layout of core/dtype.h's FloatToBf16.
//  - `Stream` is a cudaStream_t cast to void* (nullptr: the legacy default
//    stream). Every launch is asynchronous on that stream: the functions
//    return once the work is enqueued. None allocates device memory or
//    synchronizes, except where a comment says so (the cuBLAS grouped path,
//    which needs the per-expert row counts on the host), so the rest can be
//    captured in a CUDA graph.
//  - Errors: INVALID_ARGUMENT for shapes the kernel does not support (the
//    message names the field); INTERNAL naming the CUDA/cuBLAS error when a
//    launch fails.
//  - Activations between ops are float32; GEMM operands are bf16 (weights
//    resident as bf16, activations converted with ConvertF32ToBf16);
//    accumulation is float32 everywhere.
#ifndef DMOE_CORE_CUDA_KERNELS_H_
#define DMOE_CORE_CUDA_KERNELS_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace dmoe {
struct ModelConfig;
}

namespace dmoe::cuda {

using Stream = void*;  // cudaStream_t

enum class OutType { kF32, kBF16 };
// Bytes of one element of `t`.
inline int64_t ElementBytes(OutType t) { return t == OutType::kF32 ? 4 : 2; }

// ---------------------------------------------------------------------------
// Device memory and streams (device 0 of the calling thread's current device).

// Number of CUDA devices; UNAVAILABLE (naming the CUDA error) when there is no
// driver or no device.
absl::StatusOr<int> DeviceCount();

// An owned device allocation (cudaMalloc), freed on destruction. Movable.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  // RESOURCE_EXHAUSTED when the device is out of memory.
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();
  void* data() const { return ptr_; }
  size_t size() const { return bytes_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Copies and fills, ordered on `stream` (host memory is pageable: the host
// side may be reused once the call returns for host-to-device copies; a
// device-to-host copy is complete only after StreamSynchronize).
absl::Status CopyToDevice(void* dst, const void* src, size_t bytes, Stream stream);
absl::Status CopyToHost(void* dst, const void* src, size_t bytes, Stream stream);
absl::Status CopyOnDevice(void* dst, const void* src, size_t bytes, Stream stream);
absl::Status FillBytes(void* dst, int byte, size_t bytes, Stream stream);
absl::Status StreamSynchronize(Stream stream);
// Creates / destroys a non-blocking stream.
absl::StatusOr<Stream> CreateStream();
void DestroyStream(Stream stream);

// ---------------------------------------------------------------------------
// Conversions.

// out[i] = bf16(in[i]) (round to nearest even), n values.
absl::Status ConvertF32ToBf16(const float* in, int64_t n, uint16_t* out, Stream stream);
// out[i] = float(in[i]).
absl::Status ConvertBf16ToF32(const uint16_t* in, int64_t n, float* out, Stream stream);

// ---------------------------------------------------------------------------
// RMSNorm (MODEL_SPEC.md 3.2): out[t] = w ⊙ x[t] / sqrt(mean(x[t]^2) + eps)
// for n rows of width d; x rows are ldx floats apart, out rows ldo apart
// (0: d). The mean is accumulated in float32. w: [d] float32.
struct RmsNormParams {
  const float* x = nullptr;
  int64_t n = 0, d = 0, ldx = 0;
  const float* w = nullptr;
  float eps = 1e-6f;
  void* out = nullptr;  // float* or uint16_t* (bf16) by out_type; may alias x when ldo == ldx and kF32
  OutType out_type = OutType::kF32;
  int64_t ldo = 0;
};
absl::Status RmsNorm(const RmsNormParams& p, Stream stream);

// ---------------------------------------------------------------------------
// RoPE (MODEL_SPEC.md 3.3/3.4), in place on float32 vectors of width
// `rope_dim`: for row t and head h, the vector y = x + t*ld + h*head_stride
// + offset has y[0, rope_dim) rotated by position pos[t]. Pair i is (y[2i], y[2i+1])
// when interleaved, else (y[i], y[i + rope_dim/2]). Angle = float32 product
// pos * inv_freq[i] (transformers' recipe, the same as core/rope.cc);
// cos/sin are scaled by attention_factor.
struct RopeParams {
  float* x = nullptr;
  int64_t n = 0;                    // rows (tokens)
  int64_t ld = 0;                   // floats between rows
  int64_t num_heads = 1;            // vectors per row
  int64_t head_stride = 0;          // floats between a row's vectors
  int64_t offset = 0;               // floats from a vector's start to its rope part
  int64_t rope_dim = 0;             // even, <= 256
  const int32_t* pos = nullptr;     // [n]
  const float* inv_freq = nullptr;  // [rope_dim/2] float32 (Rope::inv_freq())
  float attention_factor = 1.0f;
  bool interleaved = true;
};
absl::Status ApplyRope(const RopeParams& p, Stream stream);

// ---------------------------------------------------------------------------
// SwiGLU: out[t][i] = silu(gu[t][i]) * gu[t][inter + i] for n rows of the
// fused gate_up output gu [n, 2*inter] (float32); out [n, inter].
absl::Status SiluMul(const float* gu, int64_t n, int64_t inter, void* out, OutType out_type, Stream stream);

// ---------------------------------------------------------------------------
// MoE gate (MODEL_SPEC.md 3.7), float32, one warp per token; the same
// function as core/moe_gate.cc's MoeGate::Route (scores by model type:
// sigmoid for v3 / noaux_tc, softmax for v2; selection = score +
// correction_bias + serving_bias; group limit; weights from unbiased scores,
// renormalized for v3 with norm_topk_prob; times routed_scaling_factor).
// Writes top_k experts per token in descending selection-score order (ties:
// lower index) and their weights.
enum class GateScoring { kSoftmax, kSigmoid };
enum class GateTopk { kGreedy, kGroupLimitedGreedy, kNoauxTc };
struct MoeGateParams {
  const float* logits = nullptr;  // [n, num_experts] router logits z = W_router x
  int64_t n = 0;
  int64_t num_experts = 0;  // <= 512
  int64_t top_k = 0;        // <= 16
  int64_t n_group = 1, topk_group = 1;
  GateScoring scoring = GateScoring::kSigmoid;
  GateTopk topk_method = GateTopk::kNoauxTc;
  bool renormalize = false;  // v3 with norm_topk_prob
  float routed_scaling_factor = 1.0f;
  const float* correction_bias = nullptr;  // [num_experts] or nullptr
  const float* serving_bias = nullptr;     // [num_experts] or nullptr
  int32_t* topk_idx = nullptr;             // [n, top_k]
  float* topk_weights = nullptr;           // [n, top_k]
};
absl::Status MoeGateRoute(const MoeGateParams& p, Stream stream);
// The gate of `config` (MODEL_SPEC.md 3.7, core/moe_gate.cc's choices: the
// scoring follows the model type): experts, top-k, groups, method,
// renormalization and scaling set; inputs, biases and outputs left to the
// caller.
MoeGateParams GateParamsFor(const ModelConfig& config);

// ---------------------------------------------------------------------------
// Greedy sampling: out[t] = argmax_v logits[t][v] (lowest index on ties; NaN
// never wins; all NaN/-inf gives 0), logits [n, vocab] float32.
absl::Status ArgmaxRows(const float* logits, int64_t n, int64_t vocab, int32_t* out, Stream stream);

// The MoE router's float32 product: logits[t][e] = sum_d x[t][d] * w[e][d]
// for x [n, d] and w [E, d] (row-major, 16-byte aligned, d % 4 == 0). A
// block sums a 2-expert x 2-token tile, its warps over 8 ranges of d, lanes
// in strides of 4, then across lanes and ranges in a fixed order:
// deterministic, no TF32. Meant for decode sizes (n up to a few hundred).
absl::Status RouterLogitsF32(const float* x, int64_t n, int64_t d, const float* w, int64_t num_experts, float* logits,
                             Stream stream);

// ---------------------------------------------------------------------------
// The GPU latent cache (MODEL_SPEC.md 3.5).
//
// Layout, per layer: one device buffer of bf16
//   [num_pages][page_size][kv_lora_rank + rope_dim]
// an entry being the normalized latent c (kv_lora_rank values) followed by
// the roped k_pe (rope_dim values): 576 bf16 = 1152 bytes per token per layer
// for V2/V3. Page p of a layer starts at layer_base + p * page_size * width.
// A token at position `pos` of a sequence with block table bt lives in page
// bt[pos / page_size] at row pos % page_size. A "slot" is
// page * page_size + row. page_size must be a multiple of 32 (64 is the
// default, FlashMLA's). Rows never written may hold anything (NaN too): the
// attention kernel never reads past a query's position.
// elem_type kF32: the same layout in float32 (the F32 precision of a float32
// checkpoint; only LatentCacheWrite and MlaAttentionAnyDims take it).
struct LatentCacheShape {
  int64_t kv_lora_rank = 512;
  int64_t rope_dim = 64;
  int64_t page_size = 64;
  int64_t num_pages = 0;
  OutType elem_type = OutType::kBF16;
  int64_t entry_width() const { return kv_lora_rank + rope_dim; }
  int64_t layer_elements() const { return num_pages * page_size * entry_width(); }
  int64_t elem_bytes() const { return ElementBytes(elem_type); }
};

// Writes n tokens' entries: cache[slot[t]] = bf16([c[t] ; k_pe[t]]).
// c rows are c_ld floats apart, k_pe rows k_pe_ld apart (both may point into
// one [n, r + dr] buffer). slot[t] < 0: token skipped (padding).
struct LatentCacheWriteParams {
  LatentCacheShape shape;
  void* cache = nullptr;  // one layer's buffer, shape.elem_type
  const float* c = nullptr;
  int64_t c_ld = 0;
  const float* k_pe = nullptr;
  int64_t k_pe_ld = 0;
  const int32_t* slot = nullptr;  // [n]
  int64_t n = 0;
};
absl::Status LatentCacheWrite(const LatentCacheWriteParams& p, Stream stream);

// ---------------------------------------------------------------------------
// MLA attention in the absorbed form (MODEL_SPEC.md 3.5) over the paged
// latent cache, for decode and for prefill alike: query i (a token of
// sequence query_seq[i] at position query_pos[i]) attends over that
// sequence's cache positions 0..query_pos[i] (causal; its own entry must be
// written first):
//   s[h][j] = scale * (q_lat[i][h] · c_j + q_pe[i][h] · k_pe_j)
//   out[i][h] = sum_j softmax_j(s[h])[j] c_j            (float32, [r])
//   lse[i][h] = log(sum_j exp(s[h][j]))                  (natural log)
// Decode: one query per sequence, query_pos = context_len - 1.
//
// Work split: a thread block takes one query, 64 heads and a range of the
// sequence's cache tiles (32 tokens), so each latent tile is read once per
// 64 heads (with H = 128 the two head blocks are adjacent in launch order and
// the second read mostly hits L2), QK^T and PV run on the tensor cores (bf16
// in, float32 accumulate, online softmax in float32). Long contexts are
// split across `num_splits` blocks (split-KV) whose partial results a
// combine kernel merges by their LSE.
// Supported: kv_lora_rank == 512, rope_dim == 64 (V2, V2-Lite, V3), any H.
struct MlaAttentionParams {
  LatentCacheShape shape;
  // cache, q_lat and q_pe: bf16, or float32 where shape.elem_type is kF32
  // (MlaAttentionAnyDims only; the tuned kernels refuse it).
  const void* cache = nullptr;  // one layer's buffer (layout above)
  const void* q_lat = nullptr;  // [num_queries, H, kv_lora_rank]
  const void* q_pe = nullptr;   // [num_queries, H, rope_dim] (roped)
  int64_t num_queries = 0;
  int64_t num_heads = 0;                  // H
  const int32_t* query_seq = nullptr;     // [num_queries]: row of block_tables
  const int32_t* query_pos = nullptr;     // [num_queries]: attends to 0..pos; < 0: output 0, lse -inf
  const int32_t* block_tables = nullptr;  // [num_seqs, max_pages_per_seq]
  int64_t max_pages_per_seq = 0;
  // Host: the largest query_pos + 1 (bounds the tiles a split must cover; used
  // with num_splits to size the grid). Positions beyond it are not read.
  int64_t max_context_len = 0;
  float scale = 0.f;     // softmax scale (Rope::softmax_scale())
  float* out = nullptr;  // [num_queries, H, kv_lora_rank] float32
  float* lse = nullptr;  // [num_queries, H] or nullptr
  // Heads per thread block: 0 or 64 (the default, measured in docs/gpu.md);
  // 16 pads H <= 16 (V2-Lite) to 16 instead of 64 rows, with 2 blocks per SM
  // (tested like 64; its speed is in the benchmark runs after commit c44a3d8).
  int head_block = 0;
  // Blocks of 64 heads of one query take the Hopper (wgmma) kernel where the
  // build and GPU have it (WgmmaAvailable()) and page_size % 64 == 0; false
  // keeps the mma.sync kernel (the tests compare both).
  bool allow_wgmma = true;
  // Prefill: blocks of several queries of one sequence (rows = queries x
  // heads, 64 in all, so each latent tile is read once for all of them
  // instead of once per query). query_blocks[b] .. query_blocks[b + 1] - 1
  // are block b's queries: consecutive, of one sequence, at most 64 / H of
  // them (H <= 32, head_block 0 or 64). nullptr: one query per block.
  const int32_t* query_blocks = nullptr;  // [num_query_blocks + 1] (device)
  int64_t num_query_blocks = 0;
  // Split-KV: 0 = choose from the grid size and max_context_len (about one
  // wave of blocks); else that many splits (clamped to the tiles present).
  int num_splits = 0;
  // Scratch for split results, at least MlaAttentionWorkspaceBytes(...).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};
// The split count MlaAttention will use for these sizes (num_splits as
// given, or the automatic choice).
int MlaAttentionNumSplits(int64_t num_queries, int64_t num_heads, int64_t max_context_len, int requested_splits,
                          int head_block = 0);
// Whether MlaAttention takes the Hopper (wgmma) kernel for these parameters.
bool MlaAttentionUsesWgmma(const MlaAttentionParams& p);
// The split count MlaAttention uses for p: MlaAttentionNumSplits' choice,
// clamped to the wgmma kernel's 64-token tiles where that kernel runs (its
// workspace need is never more than MlaAttentionNumSplits' count sized).
int MlaAttentionSplits(const MlaAttentionParams& p);
size_t MlaAttentionWorkspaceBytes(int64_t num_queries, int64_t num_heads, int64_t kv_lora_rank, int num_splits);
// query_blocks for queries of sequences query_seq (a sequence's queries
// adjacent): runs of one sequence, at most 64 / num_heads queries each.
// Empty when num_heads > 32 (a query fills a block's 64 rows by itself).
std::vector<int32_t> MlaQueryBlocks(absl::Span<const int32_t> query_seq, int64_t num_heads);
absl::Status MlaAttention(const MlaAttentionParams& p, Stream stream);

// A plain reference kernel of the same function (one block per query and head,
// float32 CUDA cores, no split): slow, kept as the tests' second opinion and
// the benchmarks' naive baseline. Ignores num_splits/workspace.
absl::Status MlaAttentionReference(const MlaAttentionParams& p, Stream stream);

// ---------------------------------------------------------------------------
// Dense and grouped GEMMs. Every product is C[m, n] = A[m, k] · B[n, k]^T:
// A bf16 row-major (activations), B bf16 row-major [out, in] (a weight in
// PyTorch nn.Linear layout), float32 accumulation, C float32 or bf16.

// cuBLAS / cuBLASLt handles (created once per device and thread; holds a
// 32 MiB cuBLASLt workspace). Create() is INTERNAL when cuBLAS fails.
class BlasHandle {
 public:
  static absl::StatusOr<std::unique_ptr<BlasHandle>> Create();
  ~BlasHandle();
  BlasHandle(const BlasHandle&) = delete;
  BlasHandle& operator=(const BlasHandle&) = delete;
  struct Impl;
  Impl* impl() const { return impl_.get(); }

 private:
  explicit BlasHandle(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Dense C = A · B^T through cuBLASLt (the attention node's projections).
// Rows of A, B and C are lda, ldb, ldc elements apart (0: packed). A and B
// are bf16, or both float32 (ab_type kF32: true float32 products, no TF32).
struct GemmParams {
  const void* a = nullptr;
  const void* b = nullptr;
  OutType ab_type = OutType::kBF16;
  void* c = nullptr;
  OutType c_type = OutType::kF32;
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldc = 0;
};
absl::Status Gemm(BlasHandle& blas, const GemmParams& p, Stream stream);

// Grouped GEMM over rows grouped by expert: for each group g,
//   C[offsets[g] .. offsets[g+1]) = A[offsets[g] .. offsets[g+1]) · B_g^T
// with B_g = b + g * b_group_stride, [n, k]. Empty groups are fine.
enum class GroupedGemmImpl {
  kOwn,     // dmoe's tensor-core kernel; reads offsets on the device (graph-capturable)
  kCublas,  // cublasGemmGroupedBatchedEx over the non-empty groups (else a cublasGemmEx loop); needs host_offsets
};
// ab_type kF32 (float32 A and B, true float32 products) takes kCublas only.
struct GroupedGemmParams {
  const void* a = nullptr;  // [offsets[G], k]
  const void* b = nullptr;  // [G][n][k]
  OutType ab_type = OutType::kBF16;
  int64_t b_group_stride = 0;   // elements; 0: n * k
  void* c = nullptr;            // [offsets[G], n]
  OutType c_type = OutType::kF32;
  int64_t num_groups = 0, n = 0, k = 0;   // k % 8 == 0, n % 8 == 0 (16-byte rows)
  const int32_t* offsets = nullptr;       // device [G + 1], offsets[0] = 0
  const int32_t* host_offsets = nullptr;  // host [G + 1] (kCublas only)
  int64_t max_rows = 0;                   // host: an upper bound of offsets[G] (sizes the grid)
  GroupedGemmImpl impl = GroupedGemmImpl::kOwn;
  BlasHandle* blas = nullptr;  // kCublas only
  // kOwn's rows per tile: 0 picks GroupedGemmTileRows(max_rows, num_groups, n);
  // 16 or 64 (mma.sync tiles), 128 (wgmma tiles: sm_90 device, 90a build).
  int tile_rows = 0;
};
// The wgmma kernels can run: a build for CUDA architecture 90a on an sm_90
// device (H100 / H200).
bool WgmmaAvailable();
// kOwn's default rows per tile for an upper bound of max_rows rows over
// num_groups groups of n columns: 16 at <= 8 rows a group; above, 128 on
// Hopper (sm_90a build) when n >= 256, else 64.
int GroupedGemmTileRows(int64_t max_rows, int64_t num_groups, int64_t n);
absl::Status GroupedGemm(const GroupedGemmParams& p, Stream stream);
// Which cuBLAS call kCublas used: "cublasGemmGroupedBatchedEx", or, once
// that refused an output type, "cublasGemmEx loop for ... (... returned
// STATUS)" (that type is looped over cublasGemmEx from then on).
const char* CublasGroupedPath(const BlasHandle& blas);

// Routed experts of one MoE layer (MODEL_SPEC.md 3.6/3.8) for n tokens:
//   out[t] = sum_j topk_weights[t][j] * MLP_{topk_idx[t][j]}(x[t])
// (out is overwritten; add the shared expert separately). Steps: count
// tokens per expert and permute (gather x rows by expert into bf16), grouped
// gate_up GEMM, SwiGLU, grouped down GEMM, then a weighted sum of each
// token's k rows in slot order (deterministic, no atomics).
// Slots whose index is < 0 or >= num_experts are skipped (experts not held
// by this node).
struct MoeExpertsParams {
  const float* x = nullptr;  // [n, hidden]
  int64_t n = 0, top_k = 0;
  const int32_t* topk_idx = nullptr;                      // [n, top_k]
  const float* topk_weights = nullptr;                    // [n, top_k]
  int64_t num_experts = 0, hidden = 0, intermediate = 0;  // hidden, intermediate % 8 == 0
  // Expert e's fused gate_up weight: w_gate_up + e * 2*I*D, [2*I, D] (gate
  // rows then up rows); its down weight: w_down + e * D*I, [D, I].
  // Weights and the permuted activations are bf16, or float32 with
  // weight_type kF32 (which takes kCublas).
  const void* w_gate_up = nullptr;
  const void* w_down = nullptr;
  OutType weight_type = OutType::kBF16;
  float* out = nullptr;       // [n, hidden]
  void* workspace = nullptr;  // >= MoeExpertsWorkspaceBytes(...)
  size_t workspace_bytes = 0;
  GroupedGemmImpl impl = GroupedGemmImpl::kOwn;  // kCublas synchronizes the stream once (row counts to host)
  BlasHandle* blas = nullptr;                    // kCublas only
};
size_t MoeExpertsWorkspaceBytes(int64_t n, int64_t top_k, int64_t num_experts, int64_t hidden, int64_t intermediate,
                                OutType weight_type = OutType::kBF16);
absl::Status MoeExperts(const MoeExpertsParams& p, Stream stream);

}  // namespace dmoe::cuda

#endif  // DMOE_CORE_CUDA_KERNELS_H_
