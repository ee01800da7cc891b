#include "core/cuda/cuda_compute_backend.h"

#include <cublas_v2.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/cuda/backend_kernels.h"
#include "core/cuda/kernels.h"
#include "core/log.h"
#include "core/rope.h"
#include "core/status_macros.h"
#include "core/synthetic_checkpoint.h"

namespace dmoe::cuda {
namespace {

constexpr char kLog[] = "cuda";
// The inner norms of MLA always use eps 1e-6 (MODEL_SPEC.md 3.2).
constexpr float kInnerNormEps = 1e-6f;
// Tokens up to which the router product runs in dmoe's kernel (above: cuBLAS).
constexpr int64_t kRouterKernelMaxTokens = 256;

absl::Status CudaCall(cudaError_t err, const char* call) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat("cuda: ", call, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}
absl::Status CublasCall(cublasStatus_t st, const char* call) {
  if (st == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cuda: ", call, ": ", cublasGetStatusString(st)));
}
#define DMOE_CUDA_CALL(expr) DMOE_RETURN_IF_ERROR(CudaCall((expr), #expr))
#define DMOE_CUBLAS_CALL(expr) DMOE_RETURN_IF_ERROR(CublasCall((expr), #expr))

Stream AsStream(cudaStream_t s) { return static_cast<Stream>(s); }

// Long-lived device allocations (weights), freed with the backend.
class DeviceArena {
 public:
  DeviceArena() = default;
  DeviceArena(const DeviceArena&) = delete;
  DeviceArena& operator=(const DeviceArena&) = delete;
  ~DeviceArena() {
    for (void* p : ptrs_) (void)cudaFree(p);
  }
  template <typename T>
  absl::StatusOr<T*> Alloc(int64_t count) {
    if (count <= 0) return static_cast<T*>(nullptr);
    void* p = nullptr;
    DMOE_CUDA_CALL(cudaMalloc(&p, static_cast<size_t>(count) * sizeof(T)));
    ptrs_.push_back(p);
    bytes_ += count * static_cast<int64_t>(sizeof(T));
    return static_cast<T*>(p);
  }
  int64_t bytes() const { return bytes_; }

 private:
  std::vector<void*> ptrs_;
  int64_t bytes_ = 0;
};

// Working buffers of one operation, stream-ordered: freed (queued after
// the operation's kernels) when it goes out of scope.
class Scratch {
 public:
  explicit Scratch(cudaStream_t stream) : stream_(stream) {}
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() {
    for (void* p : ptrs_) (void)cudaFreeAsync(p, stream_);
  }
  template <typename T>
  absl::StatusOr<T*> Get(int64_t count) {
    void* p = nullptr;
    DMOE_CUDA_CALL(cudaMallocAsync(&p, static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T), stream_));
    ptrs_.push_back(p);
    return static_cast<T*>(p);
  }
  absl::StatusOr<void*> Bytes(size_t bytes) {
    void* p = nullptr;
    DMOE_CUDA_CALL(cudaMallocAsync(&p, std::max<size_t>(bytes, 1), stream_));
    ptrs_.push_back(p);
    return p;
  }

 private:
  cudaStream_t stream_;
  std::vector<void*> ptrs_;
};

// Element `i` of an array of `type` at `base`.
void* ElementAt(void* base, OutType type, int64_t i) { return static_cast<char*>(base) + i * ElementBytes(type); }

struct DevMat {
  void* p = nullptr;  // [rows, cols] of `type` (the backend's precision)
  OutType type = OutType::kBF16;
  int64_t rows = 0, cols = 0;
  // Element `i` of the row-major storage.
  void* at(int64_t i) const { return ElementAt(p, type, i); }
};

struct DevLayer {
  float* input_norm = nullptr;  // [D]
  float* post_norm = nullptr;   // [D]
  // One GEMM for the projections of h: with q_lora, q_a_proj rows then
  // kv_a_proj_with_mqa rows [rq + r + dr, D]; without, kv_a_proj_with_mqa
  // rows then q_proj rows [r + dr + H*dq, D].
  DevMat a_proj;
  float* q_a_norm = nullptr;  // [rq]
  DevMat q_b;                 // [H*dq, rq]
  float* kv_a_norm = nullptr; // [r]
  DevMat kv_b;                // [H*(dn+dv), r]
  DevMat w_uk_t;              // [H*r, dn]
  DevMat o_proj;              // [D, H*dv]
  DevMat mlp_gate_up;         // dense: gate rows then up rows [2I, D]
  DevMat mlp_down;            // [D, I]
  float* router = nullptr;    // [E, D] float32
  float* correction_bias = nullptr;  // [E] (V3), for the device gate
  DevMat shared_gate_up, shared_down;
  void* experts_gate_up = nullptr;  // [local][2*Ie][D], the backend's precision
  void* experts_down = nullptr;     // [local][D][Ie]
  std::vector<int32_t> local_slot;      // [E]: slot in the stacks, -1 when not held
  int64_t num_local = 0;
};

// Whether the loaded matrices are float32 (the first one present: the
// embedding, else a routed expert's, on an expert-only node).
bool StoredInFloat32(const ModelWeights& w) {
  if (!w.embed_tokens.empty()) return w.embed_tokens.dtype == DType::kF32;
  for (const LayerWeights& l : w.layers) {
    for (const MlpWeights& e : l.moe.experts) {
      if (e.loaded()) return e.gate_proj.dtype == DType::kF32;
    }
  }
  return false;
}

// Where the weights come from: the loaded host tensors, or the dummy
// generator. `host` is null for the generator.
class WeightSource {
 public:
  virtual ~WeightSource() = default;
  // [rows, cols] into dst as `type`.
  virtual absl::Status Matrix(const std::string& name, const dmoe::Matrix* host, int64_t rows, int64_t cols,
                              void* dst, OutType type) = 0;
  virtual absl::Status Vector(const std::string& name, const std::vector<float>* host, int64_t n, float* dst) = 0;
};

class HostSource : public WeightSource {
 public:
  explicit HostSource(cudaStream_t stream) : stream_(stream) {}
  // Every copy is ordered on the backend's stream (the kernels that follow
  // run there) and waited for before returning: the host bytes are the
  // caller's, the temporaries this function's.
  absl::Status Matrix(const std::string& name, const dmoe::Matrix* host, int64_t rows, int64_t cols, void* dst,
                      OutType type) override {
    if (host == nullptr || host->empty() || host->rows != rows || host->cols != cols) {
      return absl::InternalError(absl::StrCat("cuda: ", name, ": host weight missing or not [", rows, ", ", cols, "]"));
    }
    const int64_t n = rows * cols;
    const size_t bytes = static_cast<size_t>(host->bytes());
    const bool same = (host->dtype == DType::kBF16 && type == OutType::kBF16) ||
                      (host->dtype == DType::kF32 && type == OutType::kF32);
    if (same) {
      DMOE_CUDA_CALL(cudaMemcpyAsync(dst, host->data, bytes, cudaMemcpyHostToDevice, stream_));
      DMOE_CUDA_CALL(cudaStreamSynchronize(stream_));
      return absl::OkStatus();
    }
    void* tmp = nullptr;
    DMOE_CUDA_CALL(cudaMallocAsync(&tmp, bytes, stream_));
    absl::Status st = CudaCall(cudaMemcpyAsync(tmp, host->data, bytes, cudaMemcpyHostToDevice, stream_),
                               "cudaMemcpyAsync(weight)");
    if (st.ok() && host->dtype == DType::kF32) {
      st = ConvertF32ToBf16(static_cast<const float*>(tmp), n, static_cast<uint16_t*>(dst), AsStream(stream_));
    } else if (st.ok()) {
      st = ConvertBf16ToF32(static_cast<const uint16_t*>(tmp), n, static_cast<float*>(dst), AsStream(stream_));
    }
    (void)cudaFreeAsync(tmp, stream_);
    if (st.ok()) st = CudaCall(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return st;
  }
  absl::Status Vector(const std::string& name, const std::vector<float>* host, int64_t n, float* dst) override {
    if (host == nullptr || static_cast<int64_t>(host->size()) != n) {
      return absl::InternalError(absl::StrCat("cuda: ", name, ": host vector missing or not [", n, "]"));
    }
    DMOE_CUDA_CALL(cudaMemcpyAsync(dst, host->data(), static_cast<size_t>(n) * sizeof(float), cudaMemcpyHostToDevice,
                                   stream_));
    DMOE_CUDA_CALL(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

 private:
  cudaStream_t stream_;
};

// RandomModelWeights' values, generated on the device: matrices rounded to
// bf16 (the router then widened to float32, as the CPU loader reads a bf16
// router), vectors float32.
class DummySource : public WeightSource {
 public:
  DummySource(const ModelConfig& config, uint64_t seed, cudaStream_t stream) : seed_(seed), stream_(stream) {
    for (RandomTensorSpec& s : RandomTensorSpecs(config)) specs_.emplace(s.name, std::move(s));
  }
  absl::Status Matrix(const std::string& name, const dmoe::Matrix*, int64_t rows, int64_t cols, void* dst,
                      OutType type) override {
    DMOE_ASSIGN_OR_RETURN(const RandomTensorSpec* spec, Find(name, rows * cols));
    const uint64_t key = RandomTensorKey(name, seed_);
    if (type == OutType::kBF16) {
      return FillRandom(dst, OutType::kBF16, rows * cols, 0, key, spec->center, spec->half_width, AsStream(stream_));
    }
    // A bf16 draw widened to float32, as the CPU loader reads a bf16 router.
    void* tmp = nullptr;
    DMOE_CUDA_CALL(cudaMallocAsync(&tmp, static_cast<size_t>(rows * cols) * 2, stream_));
    absl::Status st =
        FillRandom(tmp, OutType::kBF16, rows * cols, 0, key, spec->center, spec->half_width, AsStream(stream_));
    if (st.ok()) {
      st = ConvertBf16ToF32(static_cast<const uint16_t*>(tmp), rows * cols, static_cast<float*>(dst),
                            AsStream(stream_));
    }
    (void)cudaFreeAsync(tmp, stream_);
    if (st.ok()) st = CudaCall(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return st;
  }
  absl::Status Vector(const std::string& name, const std::vector<float>*, int64_t n, float* dst) override {
    DMOE_ASSIGN_OR_RETURN(const RandomTensorSpec* spec, Find(name, n));
    return FillRandom(dst, OutType::kF32, n, 0, RandomTensorKey(name, seed_), spec->center, spec->half_width,
                      AsStream(stream_));
  }
  // The host copy of a small vector (the score-correction bias).
  absl::StatusOr<std::vector<float>> HostVector(const std::string& name, int64_t n) {
    DMOE_ASSIGN_OR_RETURN(const RandomTensorSpec* spec, Find(name, n));
    return RandomTensorValues(*spec, seed_);
  }
  bool Has(const std::string& name) const { return specs_.contains(name); }

 private:
  absl::StatusOr<const RandomTensorSpec*> Find(const std::string& name, int64_t numel) const {
    auto it = specs_.find(name);
    if (it == specs_.end()) return absl::InternalError(absl::StrCat("cuda: dummy weights have no tensor ", name));
    int64_t n = 1;
    for (int64_t d : it->second.shape) n *= d;
    if (n != numel) {
      return absl::InternalError(absl::StrCat("cuda: dummy tensor ", name, " has ", n, " values, not ", numel));
    }
    return &it->second;
  }
  std::map<std::string, RandomTensorSpec> specs_;
  uint64_t seed_;
  cudaStream_t stream_;
};

// The latent cache's device pool: [layer][page][row][r + dr] of
// shape.elem_type, each layer's part in kernels.h's layout.
struct DevicePool {
  void* base = nullptr;
  LatentCacheShape shape;
  ~DevicePool() {
    if (base != nullptr) (void)cudaFree(base);
  }
  void* layer(int64_t l) const { return static_cast<char*>(base) + l * shape.layer_elements() * shape.elem_bytes(); }
};

// Per micro-batch and step: positions, cache slots and block tables on the
// device, one upload for all layers.
class CudaAttentionPlan : public AttentionPlan {
 public:
  CudaAttentionPlan(std::vector<MlaSequence> sequences, cudaStream_t stream)
      : AttentionPlan(std::move(sequences)), stream_(stream) {}
  ~CudaAttentionPlan() override {
    if (device_ != nullptr) (void)cudaFreeAsync(device_, stream_);
  }
  int32_t* device_ = nullptr;
  const int32_t* pos = nullptr;       // [n]
  const int32_t* slot = nullptr;      // [n]
  const int32_t* query_seq = nullptr; // [n]
  const int32_t* block_tables = nullptr;  // [num_seqs, max_pages]
  const int32_t* head_offsets = nullptr;  // [H + 1]: h * n, the per-head row groups of the absorbed projections
  // Prefill (a sequence with several tokens) with H <= 32: MLA blocks of
  // several queries of one sequence (MlaQueryBlocks); else none.
  const int32_t* query_blocks = nullptr;  // [num_query_blocks + 1]
  int64_t num_query_blocks = 0;
  int64_t max_pages = 0;
  int64_t max_context = 0;

 private:
  cudaStream_t stream_;
};

class CudaBackend : public ComputeBackend {
 public:
  ~CudaBackend() override {
    blas_.reset();
    side_blas_.reset();
    if (side_fork_ != nullptr) (void)cudaEventDestroy(side_fork_);
    if (side_join_ != nullptr) (void)cudaEventDestroy(side_join_);
    if (side_stream_ != nullptr) (void)cudaStreamDestroy(side_stream_);
    if (router_staging_ != nullptr) (void)cudaFreeHost(router_staging_);
    if (router_done_ != nullptr) (void)cudaEventDestroy(router_done_);
    if (upload_staging_ != nullptr) (void)cudaFreeHost(upload_staging_);
    if (upload_done_ != nullptr) (void)cudaEventDestroy(upload_done_);
    if (pinned_ != nullptr) (void)cudaFreeHost(pinned_);
    if (sgemm_ != nullptr) (void)cublasDestroy(sgemm_);
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }

  static absl::StatusOr<std::shared_ptr<ComputeBackend>> Build(const ModelConfig& config,
                                                              const WeightSelection& selection,
                                                              std::shared_ptr<const ModelWeights> host,
                                                              std::optional<uint64_t> dummy_seed,
                                                              const CudaBackendOptions& options) {
    auto b = std::shared_ptr<CudaBackend>(new CudaBackend(config, options));
    // kAuto: float32 for a float32 checkpoint (routing margins of small
    // models are far below bf16's error, MODEL_SPEC.md 6), else bf16.
    const bool f32_checkpoint = host != nullptr && StoredInFloat32(*host);
    b->precision_ = options.precision == CudaPrecision::kF32 ||
                            (options.precision == CudaPrecision::kAuto && f32_checkpoint)
                        ? OutType::kF32
                        : OutType::kBF16;
    DMOE_RETURN_IF_ERROR(b->Init());
    DMOE_RETURN_IF_ERROR(b->LoadWeights(selection, host.get(), dummy_seed));
    return std::shared_ptr<ComputeBackend>(std::move(b));
  }

  const char* name() const override { return "cuda"; }
  MemorySpace memory() const override { return MemorySpace::kDevice; }
  const ModelWeights& weights() const override { return *host_; }
  bool has_non_expert_weights() const override { return embed_.p != nullptr; }

  absl::StatusOr<Buffer> Allocate(int64_t floats) override {
    if (floats < 0) return absl::InvalidArgumentError(absl::StrCat("cuda: Allocate(", floats, ")"));
    if (floats == 0) return Buffer();
    if (graph_ != nullptr) {  // the step graph's own memory, the same buffer on every replay
      DMOE_ASSIGN_OR_RETURN(void* p, GraphDevice(static_cast<size_t>(floats) * sizeof(float)));
      return Buffer(static_cast<float*>(p), floats, [](float*) {});
    }
    DMOE_RETURN_IF_ERROR(SetDevice());
    void* p = nullptr;
    DMOE_CUDA_CALL(cudaMallocAsync(&p, static_cast<size_t>(floats) * sizeof(float), stream_));
    cudaStream_t stream = stream_;
    return Buffer(static_cast<float*>(p), floats, [stream](float* q) { (void)cudaFreeAsync(q, stream); });
  }
  absl::Status Upload(const float* host_src, int64_t count, float* dst) override {
    if (count <= 0) return absl::OkStatus();
    DMOE_RETURN_IF_ERROR(NotInStepGraph("host transfers"));
    DMOE_RETURN_IF_ERROR(SetDevice());
    // Pageable source: returns once the bytes are staged, so the caller may reuse them.
    DMOE_CUDA_CALL(cudaMemcpyAsync(dst, host_src, static_cast<size_t>(count) * sizeof(float),
                                   cudaMemcpyHostToDevice, stream_));
    return absl::OkStatus();
  }
  absl::Status Download(const float* src, int64_t count, float* host_dst) override {
    if (count <= 0) return absl::OkStatus();
    DMOE_RETURN_IF_ERROR(NotInStepGraph("host transfers"));
    DMOE_RETURN_IF_ERROR(SetDevice());
    DMOE_CUDA_CALL(cudaMemcpyAsync(host_dst, src, static_cast<size_t>(count) * sizeof(float),
                                   cudaMemcpyDeviceToHost, stream_));
    DMOE_CUDA_CALL(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }
  absl::Status Copy(const float* src, int64_t count, float* dst) override {
    if (count <= 0) return absl::OkStatus();
    DMOE_RETURN_IF_ERROR(NotInStepGraph("host transfers"));
    DMOE_RETURN_IF_ERROR(SetDevice());
    DMOE_CUDA_CALL(cudaMemcpyAsync(dst, src, static_cast<size_t>(count) * sizeof(float), cudaMemcpyDeviceToDevice,
                                   stream_));
    return absl::OkStatus();
  }

  absl::StatusOr<std::unique_ptr<LatentCache>> CreateCache(const LatentCacheOptions& options) override {
    LatentCacheOptions o = options;
    o.host_pool = false;
    if (o.page_size % 32 != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda: page size ", o.page_size, " must be a multiple of 32 (the MLA kernels' tile)"));
    }
    DMOE_ASSIGN_OR_RETURN(std::unique_ptr<LatentCache> cache, LatentCache::Create(o));
    DMOE_RETURN_IF_ERROR(SetDevice());
    auto pool = std::make_shared<DevicePool>();
    pool->shape.kv_lora_rank = o.kv_lora_rank;
    pool->shape.rope_dim = o.qk_rope_head_dim;
    pool->shape.page_size = o.page_size;
    pool->shape.num_pages = o.num_pages;
    pool->shape.elem_type = precision_;
    const size_t bytes = static_cast<size_t>(o.num_layers * pool->shape.layer_elements() * pool->shape.elem_bytes());
    if (const cudaError_t err = cudaMalloc(&pool->base, bytes); err != cudaSuccess) {
      pool->base = nullptr;
      return absl::ResourceExhaustedError(absl::StrCat("cuda: latent cache of ", o.num_pages, " pages (",
                                                       bytes >> 20, " MiB): cudaMalloc: ", cudaGetErrorString(err)));
    }
    // Zeros, not the host pool's NaN poison: the tiled kernels load whole
    // 32-token tiles and mask the positions past a query, and a masked NaN
    // would still reach the output through 0 * NaN.
    DMOE_CUDA_CALL(cudaMemsetAsync(pool->base, 0, bytes, stream_));
    DMOE_CUDA_CALL(cudaStreamSynchronize(stream_));
    DMOE_LOG(kInfo, kLog) << "latent cache: " << o.num_pages << " pages x " << o.page_size << " tokens x "
                          << o.num_layers << " layers, " << (bytes >> 20) << " MiB of GPU memory";
    cache->AttachStorage(std::move(pool), this);
    return cache;
  }

  absl::StatusOr<int64_t> CachePagesForMemoryFraction(double fraction, int64_t page_size) override {
    if (!(fraction > 0 && fraction <= 1) || page_size <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda: memory fraction ", fraction, " outside (0, 1] or page size ", page_size));
    }
    DMOE_RETURN_IF_ERROR(SetDevice());
    size_t free_bytes = 0, total_bytes = 0;
    DMOE_CUDA_CALL(cudaMemGetInfo(&free_bytes, &total_bytes));
    const double used = static_cast<double>(total_bytes - free_bytes);
    const double budget = fraction * static_cast<double>(total_bytes) - used -
                          static_cast<double>(options_.working_memory_bytes);
    const ModelConfig& c = config();
    const double page_bytes =
        static_cast<double>(c.num_hidden_layers * page_size * c.latent_entry_width()) * ElementBytes(precision_);
    const int64_t pages = budget > 0 ? static_cast<int64_t>(budget / page_bytes) : 0;
    if (pages < 1) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "cuda: no room for a latent cache page in ", fraction, " of ", total_bytes >> 20, " MiB (", used / (1 << 20),
          " MiB in use, ", options_.working_memory_bytes >> 20, " MiB kept for working buffers)"));
    }
    return pages;
  }

  absl::Status Embed(absl::Span<const int32_t> tokens, float* x) override {
    if (tokens.empty()) return absl::OkStatus();
    DMOE_RETURN_IF_ERROR(SetDevice());
    Scratch scratch(stream_);
    DMOE_ASSIGN_OR_RETURN(int32_t* ids, UploadInts(scratch, tokens));
    if (Replaying()) return absl::OkStatus();
    return EmbedRows(embed_.p, embed_.type, ids, static_cast<int64_t>(tokens.size()), config().hidden_size, x, S());
  }

  absl::Status RmsNorm(int64_t layer, NormKind which, const float* x, int64_t n, float* out) override {
    if (n == 0 || Replaying()) return absl::OkStatus();
    DMOE_RETURN_IF_ERROR(SetDevice());
    const DevLayer& dl = layers_[layer];
    RmsNormParams p;
    p.x = x;
    p.n = n;
    p.d = config().hidden_size;
    p.w = which == NormKind::kInputLayernorm ? dl.input_norm : dl.post_norm;
    p.eps = static_cast<float>(config().rms_norm_eps);
    p.out = out;
    p.out_type = OutType::kF32;
    return cuda::RmsNorm(p, S());
  }

  absl::Status AddTo(float* x, const float* a, const float* b, int64_t count) override {
    if (Replaying()) return absl::OkStatus();
    DMOE_RETURN_IF_ERROR(SetDevice());
    return AddInPlace(x, a, b, count, S());
  }

  absl::StatusOr<std::unique_ptr<AttentionPlan>> PlanAttention(std::vector<MlaSequence> sequences, int64_t n,
                                                               LatentCache& cache) override {
    if (cache.storage_owner() != this || cache.storage() == nullptr) {
      return absl::FailedPreconditionError("cuda: the latent cache was not created by this CUDA backend");
    }
    DMOE_RETURN_IF_ERROR(SetDevice());
    const int64_t page = cache.options().page_size;
    int64_t max_pages = 1, max_context = 0;
    for (const MlaSequence& s : sequences) {
      max_pages = std::max<int64_t>(max_pages, static_cast<int64_t>(cache.BlockTable(s.seq).size()));
      max_context = std::max(max_context, s.start_pos + s.num_tokens);
    }
    // Block tables PaddedPagesPerSequence wide, and the MLA split count
    // chosen for that many pages: a step graph's shape (contexts vary per
    // replay), and eager steps alike, so both run the same kernels.
    const int64_t padded = PaddedPagesPerSequence(max_pages);
    if (graph_ != nullptr && padded != graph_key_.max_pages) {
      return absl::InternalError(absl::StrCat("cuda: step graph of ", graph_key_.max_pages, " pages per sequence, ",
                                              padded, " here"));
    }
    if (graph_ != nullptr) {
      // The graph's kernels write the cache memory of its capture: a
      // replay must target that very memory (a cache freed and another made
      // in its place would not).
      const void* base = static_cast<const DevicePool*>(cache.storage())->base;
      if (capturing_) {
        graph_->cache_base = base;
      } else if (graph_->cache_base != base) {
        return absl::InternalError("cuda: step graph was captured over another latent cache");
      }
    }
    max_pages = padded;
    max_context = std::max(max_context, max_pages * page);
    const int64_t num_seqs = static_cast<int64_t>(sequences.size());
    const int64_t H = config().num_attention_heads;
    // One array: pos [n], slot [n], query_seq [n], block tables
    // [num_seqs * max_pages], head offsets [H + 1], then any query blocks.
    const int64_t tables_at = 3 * n, offsets_at = tables_at + num_seqs * max_pages;
    std::vector<int32_t> host(offsets_at + H + 1, -1);
    for (int64_t h = 0; h <= H; ++h) host[offsets_at + h] = static_cast<int32_t>(h * n);
    bool multi_token = false;
    for (int64_t si = 0; si < num_seqs; ++si) {
      const MlaSequence& s = sequences[si];
      multi_token |= s.num_tokens > 1;
      const std::vector<int64_t>& table = cache.BlockTable(s.seq);
      for (size_t p = 0; p < table.size(); ++p) host[tables_at + si * max_pages + p] = static_cast<int32_t>(table[p]);
      for (int64_t i = 0; i < s.num_tokens; ++i) {
        const int64_t row = s.row_begin + i, pos = s.start_pos + i;
        host[row] = static_cast<int32_t>(pos);
        host[n + row] = static_cast<int32_t>(table[pos / page] * page + pos % page);
        host[2 * n + row] = static_cast<int32_t>(si);
      }
    }
    std::vector<int32_t> query_blocks;
    if (multi_token) {
      query_blocks = MlaQueryBlocks(absl::MakeConstSpan(host.data() + 2 * n, n), H);
    }
    const int64_t blocks_at = static_cast<int64_t>(host.size());
    host.insert(host.end(), query_blocks.begin(), query_blocks.end());
    auto plan = std::make_unique<CudaAttentionPlan>(std::move(sequences), stream_);
    int32_t* dev = nullptr;
    if (graph_ != nullptr) {
      Scratch unused(stream_);
      DMOE_ASSIGN_OR_RETURN(dev, UploadInts(unused, host));  // the graph's memory, not the plan's
    } else {
      void* p = nullptr;
      DMOE_CUDA_CALL(cudaMallocAsync(&p, host.size() * sizeof(int32_t), stream_));
      plan->device_ = dev = static_cast<int32_t*>(p);
      DMOE_CUDA_CALL(
          cudaMemcpyAsync(dev, host.data(), host.size() * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
    }
    plan->pos = dev;
    plan->slot = dev + n;
    plan->query_seq = dev + 2 * n;
    plan->block_tables = dev + tables_at;
    plan->head_offsets = dev + offsets_at;
    if (!query_blocks.empty()) {
      plan->query_blocks = dev + blocks_at;
      plan->num_query_blocks = static_cast<int64_t>(query_blocks.size()) - 1;
    }
    plan->max_pages = max_pages;
    plan->max_context = max_context;
    return std::unique_ptr<AttentionPlan>(std::move(plan));
  }

  absl::Status Attention(int64_t layer, const AttentionPlan& base_plan, MlaForm, const float* h, int64_t n,
                         LatentCache& cache, float* out) override {
    if (n == 0 || Replaying()) return absl::OkStatus();
    std::lock_guard<std::mutex> lock(mu_);
    DMOE_RETURN_IF_ERROR(SetDevice());
    const auto& plan = static_cast<const CudaAttentionPlan&>(base_plan);
    const DevicePool& pool = *static_cast<const DevicePool*>(cache.storage());
    const ModelConfig& c = config();
    const DevLayer& dl = layers_[layer];
    const int64_t D = c.hidden_size, H = c.num_attention_heads, dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim;
    const int64_t dq = dn + dr, dv = c.v_head_dim, r = c.kv_lora_rank, rq = c.q_lora_rank;
    Scratch scratch(stream_);
    // Activations enter the GEMMs in the backend's precision (bf16, or
    // float32 as they are).
    DMOE_ASSIGN_OR_RETURN(const void* hb, GemmInput(scratch, h, n * D));

    // q [n, H*dq] (rows q_ld apart) and kva [n, r + dr] (rows a_width apart).
    const int64_t a_width = dl.a_proj.rows;
    DMOE_ASSIGN_OR_RETURN(float* a, scratch.Get<float>(n * a_width));
    DMOE_RETURN_IF_ERROR(Linear(hb, n, dl.a_proj, a, OutType::kF32));
    float* kva = a;
    float* q = a + r + dr;  // without q_lora: a's last H*dq columns
    int64_t q_ld = a_width;
    if (rq > 0) {
      DMOE_ASSIGN_OR_RETURN(q, scratch.Get<float>(n * H * dq));
      q_ld = H * dq;
      DMOE_ASSIGN_OR_RETURN(void* qa, Act(scratch, n * rq));
      RmsNormParams np;
      np.x = a;
      np.n = n;
      np.d = rq;
      np.ldx = a_width;
      np.w = dl.q_a_norm;
      np.eps = kInnerNormEps;
      np.out = qa;
      np.out_type = precision_;
      DMOE_RETURN_IF_ERROR(cuda::RmsNorm(np, S()));
      DMOE_RETURN_IF_ERROR(Linear(qa, n, dl.q_b, q, OutType::kF32));
      kva = a + rq;
    }
    // Latent: RMSNorm in place; k_pe: the raw slice, roped.
    RmsNormParams kp;
    kp.x = kva;
    kp.n = n;
    kp.d = r;
    kp.ldx = a_width;
    kp.w = dl.kv_a_norm;
    kp.eps = kInnerNormEps;
    kp.out = kva;
    kp.out_type = OutType::kF32;
    kp.ldo = a_width;
    DMOE_RETURN_IF_ERROR(cuda::RmsNorm(kp, S()));
    RopeParams rk;
    rk.x = kva + r;
    rk.n = n;
    rk.ld = a_width;
    rk.num_heads = 1;
    rk.rope_dim = dr;
    rk.pos = plan.pos;
    rk.inv_freq = inv_freq_;
    rk.attention_factor = rope_.attention_factor();
    rk.interleaved = c.rope_interleave;
    DMOE_RETURN_IF_ERROR(ApplyRope(rk, S()));
    RopeParams rqp = rk;
    rqp.x = q;
    rqp.ld = q_ld;
    rqp.num_heads = H;
    rqp.head_stride = dq;
    rqp.offset = dn;
    DMOE_RETURN_IF_ERROR(ApplyRope(rqp, S()));

    LatentCacheWriteParams wp;
    wp.shape = pool.shape;
    wp.cache = pool.layer(layer);
    wp.c = kva;
    wp.c_ld = a_width;
    wp.k_pe = kva + r;
    wp.k_pe_ld = a_width;
    wp.slot = plan.slot;
    wp.n = n;
    DMOE_RETURN_IF_ERROR(LatentCacheWrite(wp, S()));

    // Absorbed queries: q_lat[t][h] = W_UK[h]^T q_nope[t][h], one grouped
    // GEMM over head-major rows (group h: rows h*n .. h*n + n - 1), and q_pe.
    DMOE_ASSIGN_OR_RETURN(void* q_nope, Act(scratch, H * n * dn));
    DMOE_RETURN_IF_ERROR(StridedCopy(Permute(q, dq, q_ld, q_nope, precision_, n * dn, dn, H, n, dn), S()));
    DMOE_ASSIGN_OR_RETURN(float* q_lat_hm, scratch.Get<float>(H * n * r));
    DMOE_RETURN_IF_ERROR(PerHead(q_nope, dl.w_uk_t.p, r * dn, q_lat_hm, r, dn, n, plan));
    DMOE_ASSIGN_OR_RETURN(void* q_lat, Act(scratch, n * H * r));
    DMOE_RETURN_IF_ERROR(StridedCopy(Permute(q_lat_hm, r, n * r, q_lat, precision_, H * r, r, n, H, r), S()));
    DMOE_ASSIGN_OR_RETURN(void* q_pe, Act(scratch, n * H * dr));
    DMOE_RETURN_IF_ERROR(StridedCopy(Permute(q + dn, q_ld, dq, q_pe, precision_, H * dr, dr, n, H, dr), S()));

    DMOE_ASSIGN_OR_RETURN(float* u, scratch.Get<float>(n * H * r));
    MlaAttentionParams mp;
    mp.shape = pool.shape;
    mp.cache = pool.layer(layer);
    mp.q_lat = q_lat;
    mp.q_pe = q_pe;
    mp.num_queries = n;
    mp.num_heads = H;
    mp.query_seq = plan.query_seq;
    mp.query_pos = plan.pos;
    mp.block_tables = plan.block_tables;
    mp.max_pages_per_seq = plan.max_pages;
    mp.max_context_len = plan.max_context;
    mp.scale = rope_.softmax_scale();
    mp.out = u;
    if (r == 512 && dr == 64 && precision_ == OutType::kBF16) {
      // Prefill: blocks of one sequence's queries. Decode with H <= 16
      // (V2-Lite): the Hopper kernel's 64-row blocks where it runs (measured
      // faster than 16-row mma.sync blocks at every batch and context despite
      // 48 rows of padding: bench/results/gpu_kernels.md), else 16-row blocks.
      mp.query_blocks = plan.query_blocks;
      mp.num_query_blocks = plan.num_query_blocks;
      mp.head_block = 0;
      if (plan.query_blocks == nullptr && H <= 16 && !MlaAttentionUsesWgmma(mp)) mp.head_block = 16;
      const int splits = MlaAttentionSplits(mp);  // the count the chosen kernel uses
      mp.num_splits = splits;
      mp.workspace_bytes = MlaAttentionWorkspaceBytes(n, H, r, splits);
      DMOE_ASSIGN_OR_RETURN(mp.workspace, scratch.Bytes(mp.workspace_bytes));
      DMOE_RETURN_IF_ERROR(MlaAttention(mp, S()));
    } else {
      // kernels.h's kernels take V2/V3's dims in bf16 only; other shapes
      // (tiny test models) and float32 take the generic kernel, the same
      // function.
      DMOE_RETURN_IF_ERROR(MlaAttentionAnyDims(mp, S()));
    }

    // o[t][h] = W_UV[h] u[t][h] (grouped by head, W_UV[h] = rows dn.. of
    // head h's kv_b block), then o_proj over o [n, H*dv].
    DMOE_ASSIGN_OR_RETURN(void* u_hm, Act(scratch, H * n * r));
    DMOE_RETURN_IF_ERROR(StridedCopy(Permute(u, r, H * r, u_hm, precision_, n * r, r, H, n, r), S()));
    DMOE_ASSIGN_OR_RETURN(float* o_hm, scratch.Get<float>(H * n * dv));
    DMOE_RETURN_IF_ERROR(PerHead(u_hm, dl.kv_b.at(dn * r), (dn + dv) * r, o_hm, dv, r, n, plan));
    DMOE_ASSIGN_OR_RETURN(void* ob, Act(scratch, n * H * dv));
    DMOE_RETURN_IF_ERROR(StridedCopy(Permute(o_hm, dv, n * dv, ob, precision_, H * dv, dv, n, H, dv), S()));
    return Linear(ob, n, dl.o_proj, out, OutType::kF32);
  }

  absl::Status DenseMlp(int64_t layer, const float* h, int64_t n, float* out) override {
    if (Replaying()) return absl::OkStatus();
    std::lock_guard<std::mutex> lock(mu_);
    DMOE_RETURN_IF_ERROR(SetDevice());
    const DevLayer& dl = layers_[layer];
    return Mlp(dl.mlp_gate_up, dl.mlp_down, h, n, out);
  }

  absl::Status SharedExperts(int64_t layer, const float* h, int64_t n, float* out) override {
    if (Replaying()) return absl::OkStatus();
    std::lock_guard<std::mutex> lock(mu_);
    DMOE_RETURN_IF_ERROR(SetDevice());
    return SharedMlp(layers_[layer], h, n, out, stream_, blas_.get());
  }

  // out[n, D] = the layer's shared experts(h), zeros when it has none, on
  // `stream` with `blas`.
  absl::Status SharedMlp(const DevLayer& dl, const float* h, int64_t n, float* out, cudaStream_t stream,
                         BlasHandle* blas) {
    if (dl.shared_gate_up.p == nullptr) {
      DMOE_CUDA_CALL(cudaMemsetAsync(out, 0, static_cast<size_t>(n * config().hidden_size) * sizeof(float), stream));
      return absl::OkStatus();
    }
    return Mlp(dl.shared_gate_up, dl.shared_down, h, n, out, stream, blas);
  }

  absl::Status RouterLogits(int64_t layer, const float* h, int64_t n, float* host_logits,
                            const std::function<absl::Status()>& meanwhile) override {
    if (n == 0) return meanwhile ? meanwhile() : absl::OkStatus();
    const int64_t E = config().n_routed_experts;
    {
      std::lock_guard<std::mutex> lock(mu_);
      DMOE_RETURN_IF_ERROR(SetDevice());
      const DevLayer& dl = layers_[layer];
      if (dl.router == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("cuda: layer ", layer, " has no router"));
      }
      // Pinned staging, so that the copy back is asynchronous and work
      // queued after it (meanwhile) overlaps the host's wait.
      const size_t bytes = static_cast<size_t>(n * E) * sizeof(float);
      if (router_staging_bytes_ < bytes) {
        if (router_staging_ != nullptr) DMOE_CUDA_CALL(cudaFreeHost(router_staging_));
        router_staging_ = nullptr;
        router_staging_bytes_ = 0;
        DMOE_CUDA_CALL(cudaMallocHost(&router_staging_, bytes));
        router_staging_bytes_ = bytes;
      }
      Scratch scratch(stream_);
      DMOE_ASSIGN_OR_RETURN(float* logits, scratch.Get<float>(n * E));
      DMOE_RETURN_IF_ERROR(RouterProduct(dl, h, n, logits));
      DMOE_CUDA_CALL(cudaMemcpyAsync(router_staging_, logits, bytes, cudaMemcpyDeviceToHost, stream_));
      DMOE_CUDA_CALL(cudaEventRecord(router_done_, stream_));
    }
    absl::Status st = meanwhile ? meanwhile() : absl::OkStatus();  // takes the lock itself
    DMOE_CUDA_CALL(cudaEventSynchronize(router_done_));
    std::memcpy(host_logits, router_staging_, static_cast<size_t>(n * E) * sizeof(float));
    return st;
  }

  bool HasRoutedExpert(int64_t layer, int64_t expert) const override {
    if (layer < 0 || layer >= static_cast<int64_t>(layers_.size())) return false;
    const std::vector<int32_t>& slots = layers_[layer].local_slot;
    return expert >= 0 && expert < static_cast<int64_t>(slots.size()) && slots[expert] >= 0;
  }

  absl::Status RoutedExperts(int64_t layer, const float* x, int64_t n, int64_t k, const int32_t* host_topk_idx,
                             const float* host_topk_weights, float* out) override {
    const ModelConfig& c = config();
    if (layer < 0 || layer >= c.num_hidden_layers || !c.is_moe_layer(layer)) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " is not an MoE layer"));
    }
    const DevLayer& dl = layers_[layer];
    const int64_t E = c.n_routed_experts, D = c.hidden_size;
    std::vector<int32_t> local(n * k);
    for (int64_t i = 0; i < n * k; ++i) {
      const int32_t e = host_topk_idx[i];
      if (e < 0) {
        local[i] = -1;
        continue;
      }
      if (e >= E) return absl::InvalidArgumentError(absl::StrCat("expert index ", e, " >= n_routed_experts ", E));
      if (dl.local_slot[e] < 0) {
        return absl::FailedPreconditionError(absl::StrCat("layer ", layer, " expert ", e, " is not loaded here"));
      }
      local[i] = dl.local_slot[e];
    }
    std::lock_guard<std::mutex> lock(mu_);
    DMOE_RETURN_IF_ERROR(SetDevice());
    if (n == 0) return absl::OkStatus();
    if (dl.num_local == 0) {  // every slot skipped
      DMOE_CUDA_CALL(cudaMemsetAsync(out, 0, static_cast<size_t>(n * D) * sizeof(float), stream_));
      return absl::OkStatus();
    }
    Scratch scratch(stream_);
    // The slots' experts and weights in one upload through pinned memory: a
    // pageable copy may wait for the stream (the shared experts queued
    // before it), an asynchronous one does not.
    const size_t half = static_cast<size_t>(n * k) * 4;
    DMOE_ASSIGN_OR_RETURN(void* packed, scratch.Bytes(2 * half));
    DMOE_ASSIGN_OR_RETURN(char* staging, PinnedStaging(2 * half));
    std::memcpy(staging, local.data(), half);
    std::memcpy(staging + half, host_topk_weights, half);
    DMOE_CUDA_CALL(cudaMemcpyAsync(packed, staging, 2 * half, cudaMemcpyHostToDevice, stream_));
    DMOE_CUDA_CALL(cudaEventRecord(upload_done_, stream_));
    const int32_t* idx = static_cast<const int32_t*>(packed);
    const float* w = reinterpret_cast<const float*>(static_cast<const char*>(packed) + half);
    return LayerExperts(dl, x, n, k, idx, w, out, scratch);
  }

  bool RoutesOnDevice(int64_t layer) const override {
    const ModelConfig& c = config();
    if (layer < 0 || layer >= static_cast<int64_t>(layers_.size()) || !c.is_moe_layer(layer)) return false;
    const DevLayer& dl = layers_[layer];
    // Every routed expert here (the gate's choices are not seen on the host)
    // and the gate kernel's limits.
    return dl.router != nullptr && dl.num_local == c.n_routed_experts && c.n_routed_experts <= 512 &&
           c.num_experts_per_tok <= 16 &&
           (c.model_type != ModelType::kDeepseekV3 || dl.correction_bias != nullptr);
  }

  absl::Status DeviceRoutedExperts(int64_t layer, const float* h, int64_t n, absl::Span<const float> serving_bias,
                                   float* out, int32_t* host_topk_idx, int32_t* host_unbiased_topk_idx,
                                   float* shared_out) override {
    if (!RoutesOnDevice(layer)) {
      return absl::FailedPreconditionError(absl::StrCat("cuda: layer ", layer, " cannot be routed on the device"));
    }
    const ModelConfig& c = config();
    const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok;
    if (!serving_bias.empty() && static_cast<int64_t>(serving_bias.size()) != E) {
      return absl::InvalidArgumentError(absl::StrCat("serving bias of ", serving_bias.size(), " experts, not ", E));
    }
    std::lock_guard<std::mutex> lock(mu_);
    DMOE_RETURN_IF_ERROR(SetDevice());
    if (n == 0) return absl::OkStatus();
    if (graph_ != nullptr && serving_bias.empty() == graph_key_.serving_bias) {
      return absl::FailedPreconditionError(absl::StrCat("cuda: a step graph captured ",
                                                        graph_key_.serving_bias ? "with" : "without",
                                                        " a serving bias, called ", serving_bias.empty() ? "without" : "with"));
    }
    if (Replaying()) {
      // The graph computes; due are this step's serving bias, staged, and
      // the record's host copies, in the capture's order (RoutedOnDevice).
      Scratch unused(stream_);
      if (!serving_bias.empty()) {
        DMOE_RETURN_IF_ERROR(UploadBytes(unused, serving_bias.data(), serving_bias.size() * sizeof(float)).status());
        if (host_unbiased_topk_idx != nullptr) {
          DMOE_RETURN_IF_ERROR(CopyToHostLater(nullptr, n * k * 4, host_unbiased_topk_idx));
        }
      }
      return host_topk_idx == nullptr ? absl::OkStatus() : CopyToHostLater(nullptr, n * k * 4, host_topk_idx);
    }
    const DevLayer& dl = layers_[layer];
    // The shared experts on the side stream, beside the router, gate and
    // routed experts (small GEMMs that leave most of the GPU idle); joined
    // before this returns, so the caller's stream order holds.
    if (shared_out != nullptr) {
      DMOE_CUDA_CALL(cudaEventRecord(side_fork_, stream_));
      DMOE_CUDA_CALL(cudaStreamWaitEvent(side_stream_, side_fork_, 0));
      absl::Status st = SharedMlp(dl, h, n, shared_out, side_stream_, side_blas_.get());
      DMOE_CUDA_CALL(cudaEventRecord(side_join_, side_stream_));
      if (!st.ok()) {
        DMOE_CUDA_CALL(cudaStreamWaitEvent(stream_, side_join_, 0));
        return st;
      }
    }
    absl::Status st = RoutedOnDevice(dl, h, n, serving_bias, out, host_topk_idx, host_unbiased_topk_idx);
    if (shared_out != nullptr) DMOE_CUDA_CALL(cudaStreamWaitEvent(stream_, side_join_, 0));
    return st;
  }

  // DeviceRoutedExperts' routed part on stream_.
  absl::Status RoutedOnDevice(const DevLayer& dl, const float* h, int64_t n, absl::Span<const float> serving_bias,
                              float* out, int32_t* host_topk_idx, int32_t* host_unbiased_topk_idx) {
    const ModelConfig& c = config();
    const int64_t E = c.n_routed_experts, k = c.num_experts_per_tok;
    Scratch scratch(stream_);
    DMOE_ASSIGN_OR_RETURN(float* logits, scratch.Get<float>(n * E));
    DMOE_RETURN_IF_ERROR(RouterProduct(dl, h, n, logits));
    DMOE_ASSIGN_OR_RETURN(int32_t* idx, scratch.Get<int32_t>(n * k));
    DMOE_ASSIGN_OR_RETURN(float* w, scratch.Get<float>(n * k));
    MoeGateParams g = GateParamsFor(c);
    g.logits = logits;
    g.n = n;
    g.correction_bias = c.model_type == ModelType::kDeepseekV3 ? dl.correction_bias : nullptr;
    if (!serving_bias.empty()) {
      DMOE_ASSIGN_OR_RETURN(void* dev_bias, UploadBytes(scratch, serving_bias.data(), static_cast<size_t>(E) * 4));
      g.serving_bias = static_cast<const float*>(dev_bias);
    }
    g.topk_idx = idx;
    g.topk_weights = w;
    DMOE_RETURN_IF_ERROR(MoeGateRoute(g, S()));
    if (host_unbiased_topk_idx != nullptr && g.serving_bias != nullptr) {
      DMOE_ASSIGN_OR_RETURN(int32_t* unbiased, scratch.Get<int32_t>(n * k));
      DMOE_ASSIGN_OR_RETURN(float* unused, scratch.Get<float>(n * k));
      MoeGateParams u = g;
      u.serving_bias = nullptr;
      u.topk_idx = unbiased;
      u.topk_weights = unused;
      DMOE_RETURN_IF_ERROR(MoeGateRoute(u, S()));
      DMOE_RETURN_IF_ERROR(CopyToHostLater(unbiased, n * k * 4, host_unbiased_topk_idx));
    }
    if (host_topk_idx != nullptr) DMOE_RETURN_IF_ERROR(CopyToHostLater(idx, n * k * 4, host_topk_idx));

    return LayerExperts(dl, h, n, k, idx, w, out, scratch);  // every expert is held: local slot = expert id
  }

  absl::Status Logits(const float* x, absl::Span<const int64_t> rows, float* host_logits) override {
    if (rows.empty()) return absl::OkStatus();
    std::lock_guard<std::mutex> lock(mu_);
    DMOE_RETURN_IF_ERROR(SetDevice());
    DMOE_RETURN_IF_ERROR(NotInStepGraph("logits"));
    const int64_t V = config().vocab_size, nr = static_cast<int64_t>(rows.size());
    Scratch scratch(stream_);
    DMOE_ASSIGN_OR_RETURN(const int32_t* dev_rows, UploadRows(scratch, rows));
    DMOE_ASSIGN_OR_RETURN(float* logits, DeviceLogits(scratch, x, dev_rows, nr));
    DMOE_CUDA_CALL(cudaMemcpyAsync(host_logits, logits, static_cast<size_t>(nr * V) * sizeof(float),
                                   cudaMemcpyDeviceToHost, stream_));
    return SyncAndFlush();
  }

  absl::Status GreedyTokens(const float* x, absl::Span<const int64_t> rows, int32_t* host_tokens,
                            float* host_logprobs) override {
    if (rows.empty()) return absl::OkStatus();
    std::lock_guard<std::mutex> lock(mu_);
    DMOE_RETURN_IF_ERROR(SetDevice());
    const int64_t V = config().vocab_size, nr = static_cast<int64_t>(rows.size());
    Scratch scratch(stream_);
    if (graph_ != nullptr) {  // the tokens come back when EndStepGraph waits
      DMOE_ASSIGN_OR_RETURN(const int32_t* dev_rows, UploadRows(scratch, rows));
      int32_t* tokens = nullptr;
      float* logprobs = nullptr;
      if (!Replaying()) {
        DMOE_ASSIGN_OR_RETURN(float* logits, DeviceLogits(scratch, x, dev_rows, nr));
        DMOE_ASSIGN_OR_RETURN(tokens, scratch.Get<int32_t>(nr));
        DMOE_ASSIGN_OR_RETURN(logprobs, scratch.Get<float>(nr));
        DMOE_RETURN_IF_ERROR(ArgmaxRows(logits, nr, V, tokens, S()));
        DMOE_RETURN_IF_ERROR(TokenLogprobs(logits, nr, V, tokens, logprobs, S()));
      }
      DMOE_RETURN_IF_ERROR(CopyToHostLater(tokens, nr * 4, host_tokens));
      return CopyToHostLater(logprobs, nr * 4, host_logprobs);
    }
    DMOE_ASSIGN_OR_RETURN(const int32_t* dev_rows, UploadRows(scratch, rows));
    DMOE_ASSIGN_OR_RETURN(float* logits, DeviceLogits(scratch, x, dev_rows, nr));
    // [tokens (int32) | logprobs (float32)], one copy back.
    DMOE_ASSIGN_OR_RETURN(void* picked, scratch.Bytes(static_cast<size_t>(nr) * 8));
    int32_t* tokens = static_cast<int32_t*>(picked);
    float* logprobs = reinterpret_cast<float*>(tokens + nr);
    DMOE_RETURN_IF_ERROR(ArgmaxRows(logits, nr, V, tokens, S()));
    DMOE_RETURN_IF_ERROR(TokenLogprobs(logits, nr, V, tokens, logprobs, S()));
    std::vector<int32_t> host(2 * nr);
    DMOE_CUDA_CALL(cudaMemcpyAsync(host.data(), picked, static_cast<size_t>(nr) * 8, cudaMemcpyDeviceToHost, stream_));
    DMOE_RETURN_IF_ERROR(SyncAndFlush());
    std::memcpy(host_tokens, host.data(), static_cast<size_t>(nr) * 4);
    std::memcpy(host_logprobs, host.data() + nr, static_cast<size_t>(nr) * 4);
    return absl::OkStatus();
  }

  absl::Status Synchronize() override {
    std::lock_guard<std::mutex> lock(mu_);
    DMOE_RETURN_IF_ERROR(SetDevice());
    return SyncAndFlush();
  }

 private:
  // Waits for the stream, then completes the host copies promised since the
  // last wait (DeviceRoutedExperts' routing records) and recycles the pinned
  // ring. REQUIRES: mu_ held (or the only thread).
  absl::Status SyncAndFlush() {
    const absl::Status st = CudaCall(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    if (st.ok()) {
      for (const HostCopy& c : host_copies_) std::memcpy(c.dst, c.src, c.bytes);
    }
    host_copies_.clear();
    pinned_used_ = 0;
    return st;
  }
  // `bytes` of the pinned ring, free until the next SyncAndFlush.
  absl::StatusOr<char*> TakePinned(size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (pinned_used_ + bytes > pinned_bytes_) {
      DMOE_RETURN_IF_ERROR(SyncAndFlush());
      if (bytes > pinned_bytes_) {
        if (pinned_ != nullptr) DMOE_CUDA_CALL(cudaFreeHost(pinned_));
        pinned_ = nullptr;
        pinned_bytes_ = 0;
        const size_t want = std::max<size_t>(bytes, size_t{1} << 20);
        void* p = nullptr;
        DMOE_CUDA_CALL(cudaMallocHost(&p, want));
        pinned_ = static_cast<char*>(p);
        pinned_bytes_ = want;
      }
    }
    char* p = pinned_ + pinned_used_;
    pinned_used_ += bytes;
    return p;
  }
  // host[bytes] = dev[bytes] by the next SyncAndFlush (through the ring,
  // or the step graph's pinned memory; a replay only registers the copy).
  absl::Status CopyToHostLater(const void* dev, int64_t bytes, void* host) {
    char* staged = nullptr;
    if (graph_ != nullptr) {
      DMOE_ASSIGN_OR_RETURN(staged, GraphPinned(static_cast<size_t>(bytes)));
    } else {
      DMOE_ASSIGN_OR_RETURN(staged, TakePinned(static_cast<size_t>(bytes)));
    }
    if (!Replaying()) {
      DMOE_CUDA_CALL(cudaMemcpyAsync(staged, dev, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost, stream_));
    }
    host_copies_.push_back({staged, host, static_cast<size_t>(bytes)});
    return absl::OkStatus();
  }

  // --- step graphs (ComputeBackend's BeginStepGraph / EndStepGraph).
  // A captured decode step: its executable graph and the memory it reads
  // and writes besides its own allocation nodes: a device arena (the
  // engine's buffers, ids, positions, block tables, rows) and a pinned one
  // (those inputs staged, the greedy tokens and routing record back), both
  // carved by bump allocation in call order, so a replay's identical calls
  // land on the same addresses.
  struct StepGraph {
    cudaGraphExec_t exec = nullptr;
    void* device = nullptr;
    char* pinned = nullptr;
    size_t device_bytes = 0, pinned_bytes = 0;
    size_t device_used = 0, pinned_used = 0;  // at the end of the capture
    const void* cache_base = nullptr;         // the latent cache memory its kernels write
    ~StepGraph() {
      if (exec != nullptr) (void)cudaGraphExecDestroy(exec);
      if (device != nullptr) (void)cudaFree(device);
      if (pinned != nullptr) (void)cudaFreeHost(pinned);
    }
  };
  bool Replaying() const { return graph_ != nullptr && !capturing_; }
  absl::Status NotInStepGraph(const char* what) const {
    if (graph_ == nullptr) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat("cuda: ", what, " inside a step graph"));
  }
  static size_t Align256(size_t v) { return (v + 255) / 256 * 256; }
  absl::StatusOr<void*> GraphDevice(size_t bytes) {
    const size_t at = graph_device_at_;
    graph_device_at_ = Align256(at + std::max<size_t>(bytes, 1));
    if (graph_device_at_ > graph_->device_bytes) {
      return absl::ResourceExhaustedError("cuda: step graph device arena exhausted");
    }
    return static_cast<void*>(static_cast<char*>(graph_->device) + at);
  }
  absl::StatusOr<char*> GraphPinned(size_t bytes) {
    const size_t at = graph_pinned_at_;
    graph_pinned_at_ = Align256(at + std::max<size_t>(bytes, 1));
    if (graph_pinned_at_ > graph_->pinned_bytes) {
      return absl::ResourceExhaustedError("cuda: step graph pinned arena exhausted");
    }
    return graph_->pinned + at;
  }

 public:
  bool SupportsStepGraphs() const override {
    const ModelConfig& c = config();
    // The tuned MLA kernel (its grid depends only on the key) in bf16.
    return embed_.p != nullptr && precision_ == OutType::kBF16 && c.kv_lora_rank == 512 && c.qk_rope_head_dim == 64;
  }

  absl::Status BeginStepGraph(const StepGraphKey& key) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!SupportsStepGraphs()) return absl::UnimplementedError("cuda: no step graphs for this model");
    if (graph_ != nullptr) return absl::FailedPreconditionError("cuda: a step graph is already open");
    DMOE_RETURN_IF_ERROR(SetDevice());
    DMOE_RETURN_IF_ERROR(SyncAndFlush());  // nothing of an eager step pending
    graph_key_ = key;
    graph_device_at_ = graph_pinned_at_ = 0;
    auto it = graphs_.find(key);
    if (it != graphs_.end()) {
      graph_ = it->second.get();
      capturing_ = false;
      return absl::OkStatus();
    }
    if (graphs_.size() >= kMaxStepGraphs) graphs_.clear();  // keep the memory they hold bounded
    const ModelConfig& c = config();
    const size_t n = static_cast<size_t>(key.tokens), D = static_cast<size_t>(c.hidden_size);
    const size_t ints = 6 * n + n * static_cast<size_t>(key.max_pages) + static_cast<size_t>(c.num_attention_heads) + 1;
    auto g = std::make_unique<StepGraph>();
    // With a serving bias: each layer's bias staged, and the unbiased record.
    const size_t layers = static_cast<size_t>(c.num_hidden_layers);
    const size_t biases = key.serving_bias ? layers * Align256(static_cast<size_t>(c.n_routed_experts) * 4) : 0;
    const size_t record = layers * static_cast<size_t>(c.num_experts_per_tok) * n * 4;
    g->device_bytes = Align256(8 * n * D * sizeof(float) + ints * 4 + biases + (64 << 10));
    g->pinned_bytes = Align256(ints * 4 + (key.serving_bias ? 2 : 1) * record + biases + 16 * n + (64 << 10));
    DMOE_CUDA_CALL(cudaMalloc(&g->device, g->device_bytes));
    void* pinned = nullptr;
    DMOE_CUDA_CALL(cudaMallocHost(&pinned, g->pinned_bytes));
    g->pinned = static_cast<char*>(pinned);
    // Relaxed: the step's first cuBLASLt use of a shape may query heuristics.
    DMOE_CUDA_CALL(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed));
    graph_ = graphs_.emplace(key, std::move(g)).first->second.get();
    capturing_ = true;
    return absl::OkStatus();
  }

  absl::Status EndStepGraph() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (graph_ == nullptr) return absl::FailedPreconditionError("cuda: no step graph is open");
    StepGraph& g = *graph_;
    if (capturing_) {
      capturing_ = false;
      cudaGraph_t captured = nullptr;
      const cudaError_t end = cudaStreamEndCapture(stream_, &captured);
      absl::Status st = CudaCall(end, "cudaStreamEndCapture");
      if (st.ok()) st = CudaCall(cudaGraphInstantiate(&g.exec, captured, 0), "cudaGraphInstantiate");
      if (captured != nullptr) (void)cudaGraphDestroy(captured);
      g.device_used = graph_device_at_;
      g.pinned_used = graph_pinned_at_;
      if (!st.ok()) {
        DropStepGraph();
        return st;
      }
      DMOE_LOG(kInfo, kLog) << "captured the decode step graph for " << graph_key_.tokens << " tokens, "
                            << graph_key_.max_pages << " pages per sequence (" << graphs_.size() << " graphs)";
    } else if (graph_device_at_ != g.device_used || graph_pinned_at_ != g.pinned_used) {
      DropStepGraph();
      return absl::InternalError("cuda: a step graph replay's calls differ from its capture");
    }
    graph_ = nullptr;
    DMOE_CUDA_CALL(cudaGraphLaunch(g.exec, stream_));
    return SyncAndFlush();
  }

  void AbortStepGraph() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (graph_ == nullptr) return;
    if (capturing_) {
      cudaGraph_t captured = nullptr;
      (void)cudaStreamEndCapture(stream_, &captured);
      if (captured != nullptr) (void)cudaGraphDestroy(captured);
      (void)cudaGetLastError();  // a capture error is not the next eager call's
    }
    DropStepGraph();
  }

 private:
  // Forgets the open step graph (and its host copies: nothing of it ran).
  void DropStepGraph() {
    host_copies_.clear();
    capturing_ = false;
    graph_ = nullptr;
    graphs_.erase(graph_key_);
  }

  CudaBackend(const ModelConfig& config, const CudaBackendOptions& options)
      : options_(options), rope_(config) {
    auto host = std::make_shared<ModelWeights>();
    host->config = config;
    host->layers.resize(config.num_hidden_layers);
    host_ = std::move(host);
  }

  Stream S() const { return AsStream(stream_); }
  absl::Status SetDevice() const { return CudaCall(cudaSetDevice(options_.device), "cudaSetDevice"); }

  absl::Status Init() {
    DMOE_RETURN_IF_ERROR(SetDevice());
    DMOE_CUDA_CALL(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    DMOE_CUDA_CALL(cudaEventCreateWithFlags(&router_done_, cudaEventDisableTiming));
    DMOE_CUDA_CALL(cudaEventCreateWithFlags(&upload_done_, cudaEventDisableTiming));
    // Keep freed working memory in the stream-ordered pool (steps allocate
    // the same sizes over and over).
    cudaMemPool_t pool;
    DMOE_CUDA_CALL(cudaDeviceGetDefaultMemPool(&pool, options_.device));
    uint64_t threshold = std::numeric_limits<uint64_t>::max();
    DMOE_CUDA_CALL(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
    DMOE_ASSIGN_OR_RETURN(blas_, BlasHandle::Create());
    DMOE_CUDA_CALL(cudaStreamCreateWithFlags(&side_stream_, cudaStreamNonBlocking));
    DMOE_CUDA_CALL(cudaEventCreateWithFlags(&side_fork_, cudaEventDisableTiming));
    DMOE_CUDA_CALL(cudaEventCreateWithFlags(&side_join_, cudaEventDisableTiming));
    DMOE_ASSIGN_OR_RETURN(side_blas_, BlasHandle::Create());
    DMOE_CUBLAS_CALL(cublasCreate(&sgemm_));
    DMOE_CUBLAS_CALL(cublasSetStream(sgemm_, stream_));
    // Its own workspace: a captured step graph must not allocate one.
    DMOE_ASSIGN_OR_RETURN(char* sgemm_workspace, arena_.Alloc<char>(int64_t{4} << 20));
    DMOE_CUBLAS_CALL(cublasSetWorkspace(sgemm_, sgemm_workspace, size_t{4} << 20));
    // The router stays true float32 (no TF32): top-k selection is discontinuous.
    DMOE_CUBLAS_CALL(cublasSetMathMode(sgemm_, CUBLAS_PEDANTIC_MATH));
    const std::vector<float>& inv = rope_.inv_freq();
    DMOE_ASSIGN_OR_RETURN(inv_freq_, arena_.Alloc<float>(static_cast<int64_t>(inv.size())));
    DMOE_CUDA_CALL(
        cudaMemcpyAsync(inv_freq_, inv.data(), inv.size() * sizeof(float), cudaMemcpyHostToDevice, stream_));
    DMOE_CUDA_CALL(cudaStreamSynchronize(stream_));
    return absl::OkStatus();
  }

  // The pinned upload buffer, at least `bytes`, once the previous upload
  // from it has been copied out (long done by then: it was queued before
  // the router product whose result the caller has waited for).
  absl::StatusOr<char*> PinnedStaging(size_t bytes) {
    DMOE_CUDA_CALL(cudaEventSynchronize(upload_done_));
    if (upload_staging_bytes_ < bytes) {
      if (upload_staging_ != nullptr) DMOE_CUDA_CALL(cudaFreeHost(upload_staging_));
      upload_staging_ = nullptr;
      upload_staging_bytes_ = 0;
      DMOE_CUDA_CALL(cudaMallocHost(&upload_staging_, bytes));
      upload_staging_bytes_ = bytes;
    }
    return static_cast<char*>(upload_staging_);
  }

  // `bytes` of host memory in device memory for the operation: in a step
  // graph, staged in its pinned memory (the copy a node of the graph, so a
  // replay copies what was staged for it); else staged in the pinned ring
  // and copied into `scratch`.
  absl::StatusOr<void*> UploadBytes(Scratch& scratch, const void* host, size_t bytes) {
    if (graph_ != nullptr) {
      DMOE_ASSIGN_OR_RETURN(char* staged, GraphPinned(bytes));
      if (bytes > 0) std::memcpy(staged, host, bytes);
      DMOE_ASSIGN_OR_RETURN(void* dev, GraphDevice(bytes));
      if (capturing_ && bytes > 0) {
        DMOE_CUDA_CALL(cudaMemcpyAsync(dev, staged, bytes, cudaMemcpyHostToDevice, stream_));
      }
      return dev;
    }
    // Through the pinned ring: an asynchronous copy, which a pageable one
    // is not (it may wait for the work queued before it).
    DMOE_ASSIGN_OR_RETURN(void* dev, scratch.Bytes(bytes));
    if (bytes > 0) {
      DMOE_ASSIGN_OR_RETURN(char* staged, TakePinned(bytes));
      std::memcpy(staged, host, bytes);
      DMOE_CUDA_CALL(cudaMemcpyAsync(dev, staged, bytes, cudaMemcpyHostToDevice, stream_));
    }
    return dev;
  }
  absl::StatusOr<int32_t*> UploadInts(Scratch& scratch, absl::Span<const int32_t> values) {
    DMOE_ASSIGN_OR_RETURN(void* dev, UploadBytes(scratch, values.data(), values.size() * sizeof(int32_t)));
    return static_cast<int32_t*>(dev);
  }

  // dst[a][b][c] = src[a][b][c] with the given strides (a < na, b < nb, c < nc).
  static StridedCopyParams Permute(const float* src, int64_t src_a, int64_t src_b, void* dst, OutType type,
                                   int64_t dst_a, int64_t dst_b, int64_t na, int64_t nb, int64_t nc) {
    StridedCopyParams p;
    p.src = src;
    p.src_a = src_a;
    p.src_b = src_b;
    p.dst = dst;
    p.dst_type = type;
    p.dst_a = dst_a;
    p.dst_b = dst_b;
    p.na = na;
    p.nb = nb;
    p.nc = nc;
    return p;
  }

  // The absorbed per-head products as one grouped GEMM: for head h, rows
  // h*n .. h*n + n - 1 of out [H*n, n_out] (float32) = those rows of a
  // [H*n, k] (bf16) · (b + h * b_stride)^T, a [n_out, k] block per head.
  absl::Status PerHead(const void* a, const void* b, int64_t b_stride, float* out, int64_t n_out, int64_t k, int64_t n,
                       const CudaAttentionPlan& plan) {
    GroupedGemmParams g;
    g.a = a;
    g.b = b;
    g.ab_type = precision_;
    g.b_group_stride = b_stride;
    g.c = out;
    g.c_type = OutType::kF32;
    g.num_groups = config().num_attention_heads;
    g.n = n_out;
    g.k = k;
    g.offsets = plan.head_offsets;
    g.max_rows = config().num_attention_heads * n;
    g.impl = GroupedGemmImpl::kOwn;
    std::vector<int32_t> host_offsets;
    if (precision_ == OutType::kF32) {  // cuBLAS, with the offsets the plan holds on the device
      host_offsets.resize(g.num_groups + 1);
      for (int64_t h = 0; h <= g.num_groups; ++h) host_offsets[h] = static_cast<int32_t>(h * n);
      g.host_offsets = host_offsets.data();
      g.impl = GroupedGemmImpl::kCublas;
      g.blas = blas_.get();
    }
    return GroupedGemm(g, S());
  }

  // out[n, D] = the layer's routed experts over device slots idx / weights w
  // [n, k] (local slots; < 0 skipped), grouped GEMMs in the backend's
  // precision (bf16: dmoe's kernel; float32: cuBLAS).
  absl::Status LayerExperts(const DevLayer& dl, const float* x, int64_t n, int64_t k, const int32_t* idx,
                            const float* w, float* out, Scratch& scratch) {
    const ModelConfig& c = config();
    MoeExpertsParams p;
    p.x = x;
    p.n = n;
    p.top_k = k;
    p.topk_idx = idx;
    p.topk_weights = w;
    p.num_experts = dl.num_local;
    p.hidden = c.hidden_size;
    p.intermediate = c.moe_intermediate_size;
    p.w_gate_up = dl.experts_gate_up;
    p.w_down = dl.experts_down;
    p.weight_type = precision_;
    p.out = out;
    p.workspace_bytes = MoeExpertsWorkspaceBytes(n, p.top_k, dl.num_local, p.hidden, p.intermediate, precision_);
    DMOE_ASSIGN_OR_RETURN(p.workspace, scratch.Bytes(p.workspace_bytes));
    p.impl = precision_ == OutType::kBF16 ? GroupedGemmImpl::kOwn : GroupedGemmImpl::kCublas;
    p.blas = blas_.get();
    return MoeExperts(p, S());
  }

  // Row-major logits [n, E] = h [n, D] · router [E, D]^T in float32 (no
  // TF32): at decode sizes dmoe's router kernel (cuBLAS SGEMM of E = 64 and
  // n <= 256 ran 5-20 us in one latency-bound kernel); cuBLAS SGEMM (the
  // pedantic handle) for prefill sizes and where D % 4 != 0.
  absl::Status RouterProduct(const DevLayer& dl, const float* h, int64_t n, float* logits) {
    const int E = static_cast<int>(config().n_routed_experts), D = static_cast<int>(config().hidden_size);
    if (D % 4 == 0 && n <= kRouterKernelMaxTokens) return RouterLogitsF32(h, n, D, dl.router, E, logits, S());
    const float one = 1.0f, zero = 0.0f;
    DMOE_CUBLAS_CALL(cublasSgemm(sgemm_, CUBLAS_OP_T, CUBLAS_OP_N, E, static_cast<int>(n), D, &one, dl.router, D, h, D,
                                 &zero, logits, E));
    return absl::OkStatus();
  }

  // A float32 activation [count] as a GEMM input of the backend's precision:
  // itself, or a bf16 copy in `scratch`.
  absl::StatusOr<const void*> GemmInput(Scratch& scratch, const float* x, int64_t count,
                                        cudaStream_t stream = nullptr) {
    if (precision_ == OutType::kF32) return static_cast<const void*>(x);
    DMOE_ASSIGN_OR_RETURN(uint16_t* b, scratch.Get<uint16_t>(count));
    DMOE_RETURN_IF_ERROR(ConvertF32ToBf16(x, count, b, AsStream(stream != nullptr ? stream : stream_)));
    return static_cast<const void*>(b);
  }
  // Room for `count` activations of the backend's precision.
  absl::StatusOr<void*> Act(Scratch& scratch, int64_t count) {
    return scratch.Bytes(static_cast<size_t>(std::max<int64_t>(count, 1)) * ElementBytes(precision_));
  }

  absl::StatusOr<const int32_t*> UploadRows(Scratch& scratch, absl::Span<const int64_t> rows) {
    std::vector<int32_t> rows32(rows.begin(), rows.end());
    return UploadInts(scratch, rows32);
  }

  // logits [nr, V] (device, in `scratch`) = lm_head RmsNorm(x[dev_rows[i]]).
  absl::StatusOr<float*> DeviceLogits(Scratch& scratch, const float* x, const int32_t* dev_rows, int64_t nr) {
    const ModelConfig& c = config();
    const int64_t D = c.hidden_size, V = c.vocab_size;
    DMOE_ASSIGN_OR_RETURN(float* picked, scratch.Get<float>(nr * D));
    DMOE_RETURN_IF_ERROR(GatherRows(x, dev_rows, nr, D, picked, S()));
    DMOE_ASSIGN_OR_RETURN(void* normed, Act(scratch, nr * D));
    RmsNormParams np;
    np.x = picked;
    np.n = nr;
    np.d = D;
    np.w = final_norm_;
    np.eps = static_cast<float>(c.rms_norm_eps);
    np.out = normed;
    np.out_type = precision_;
    DMOE_RETURN_IF_ERROR(cuda::RmsNorm(np, S()));
    DMOE_ASSIGN_OR_RETURN(float* logits, scratch.Get<float>(nr * V));
    DMOE_RETURN_IF_ERROR(Linear(normed, nr, lm_head_, logits, OutType::kF32));
    return logits;
  }

  // out[n, w.rows] = a[n, w.cols] · w^T (a of w's type), on stream_ with
  // blas_ unless given.
  absl::Status Linear(const void* a, int64_t n, const DevMat& w, void* out, OutType out_type,
                      cudaStream_t stream = nullptr, BlasHandle* blas = nullptr) {
    GemmParams g;
    g.a = a;
    g.b = w.p;
    g.ab_type = w.type;
    g.c = out;
    g.c_type = out_type;
    g.m = n;
    g.n = w.rows;
    g.k = w.cols;
    return Gemm(blas != nullptr ? *blas : *blas_, g, AsStream(stream != nullptr ? stream : stream_));
  }

  // SwiGLU MLP with the fused gate_up weight [2I, D] and down [D, I], on
  // `stream` with `blas` (stream_ and blas_ unless given).
  absl::Status Mlp(const DevMat& gate_up, const DevMat& down, const float* h, int64_t n, float* out,
                   cudaStream_t stream = nullptr, BlasHandle* blas = nullptr) {
    if (n == 0) return absl::OkStatus();
    if (stream == nullptr) stream = stream_;
    if (blas == nullptr) blas = blas_.get();
    const int64_t D = config().hidden_size, I = down.cols;
    Scratch scratch(stream);
    DMOE_ASSIGN_OR_RETURN(const void* hb, GemmInput(scratch, h, n * D, stream));
    DMOE_ASSIGN_OR_RETURN(float* gu, scratch.Get<float>(n * 2 * I));
    DMOE_RETURN_IF_ERROR(Linear(hb, n, gate_up, gu, OutType::kF32, stream, blas));
    DMOE_ASSIGN_OR_RETURN(void* act, Act(scratch, n * I));
    DMOE_RETURN_IF_ERROR(SiluMul(gu, n, I, act, precision_, AsStream(stream)));
    return Linear(act, n, down, out, OutType::kF32, stream, blas);
  }

  absl::StatusOr<DevMat> NewMat(int64_t rows, int64_t cols) {
    DevMat m;
    m.rows = rows;
    m.cols = cols;
    m.type = precision_;
    DMOE_ASSIGN_OR_RETURN(m.p, AllocElements(rows * cols));
    return m;
  }
  absl::StatusOr<float*> NewVec(WeightSource& src, const std::string& name, const std::vector<float>* host, int64_t n) {
    DMOE_ASSIGN_OR_RETURN(float* v, arena_.Alloc<float>(n));
    DMOE_RETURN_IF_ERROR(src.Vector(name, host, n, v));
    return v;
  }
  absl::StatusOr<DevMat> LoadMat(WeightSource& src, const std::string& name, const dmoe::Matrix* host, int64_t rows,
                                 int64_t cols) {
    DMOE_ASSIGN_OR_RETURN(DevMat m, NewMat(rows, cols));
    DMOE_RETURN_IF_ERROR(src.Matrix(name, host, rows, cols, m.p, m.type));
    return m;
  }
  // gate rows then up rows of an MLP into [2*width, D]; down [D, width]
  // (the backend's precision).
  absl::Status LoadMlp(WeightSource& src, const std::string& prefix, const MlpWeights* host, int64_t width,
                       void* gate_up, void* down) {
    const int64_t D = config().hidden_size;
    DMOE_RETURN_IF_ERROR(src.Matrix(prefix + "gate_proj.weight", host ? &host->gate_proj : nullptr, width, D, gate_up,
                                    precision_));
    DMOE_RETURN_IF_ERROR(src.Matrix(prefix + "up_proj.weight", host ? &host->up_proj : nullptr, width, D,
                                    ElementAt(gate_up, precision_, width * D), precision_));
    return src.Matrix(prefix + "down_proj.weight", host ? &host->down_proj : nullptr, D, width, down, precision_);
  }
  absl::StatusOr<void*> AllocElements(int64_t count) {
    if (precision_ == OutType::kF32) {
      DMOE_ASSIGN_OR_RETURN(float* p, arena_.Alloc<float>(count));
      return static_cast<void*>(p);
    }
    DMOE_ASSIGN_OR_RETURN(uint16_t* p, arena_.Alloc<uint16_t>(count));
    return static_cast<void*>(p);
  }

  absl::Status LoadWeights(const WeightSelection& selection, const ModelWeights* host,
                           std::optional<uint64_t> dummy_seed) {
    const ModelConfig& c = config();
    const int64_t D = c.hidden_size, V = c.vocab_size, H = c.num_attention_heads;
    const int64_t dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dq = dn + dr, dv = c.v_head_dim;
    const int64_t r = c.kv_lora_rank, rq = c.q_lora_rank, E = c.n_routed_experts, Ie = c.moe_intermediate_size;
    HostSource host_source(stream_);
    std::unique_ptr<DummySource> dummy;
    if (dummy_seed.has_value()) dummy = std::make_unique<DummySource>(c, *dummy_seed, stream_);
    WeightSource& src = dummy ? static_cast<WeightSource&>(*dummy) : host_source;
    ModelWeights& hw = const_cast<ModelWeights&>(*host_);
    const bool non_expert = host != nullptr ? !host->embed_tokens.empty() : selection.non_expert;

    if (non_expert) {
      DMOE_ASSIGN_OR_RETURN(embed_, LoadMat(src, "model.embed_tokens.weight", host ? &host->embed_tokens : nullptr, V, D));
      DMOE_ASSIGN_OR_RETURN(final_norm_, NewVec(src, "model.norm.weight", host ? &host->norm : nullptr, D));
      const bool tied = host != nullptr ? host->lm_head.data == host->embed_tokens.data
                                        : !dummy->Has("lm_head.weight");
      if (tied) {
        lm_head_ = embed_;
      } else {
        DMOE_ASSIGN_OR_RETURN(lm_head_, LoadMat(src, "lm_head.weight", host ? &host->lm_head : nullptr, V, D));
      }
    }
    layers_.resize(c.num_hidden_layers);
    for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
      DevLayer& dl = layers_[l];
      const LayerWeights* hl = host != nullptr ? &host->layers[l] : nullptr;
      const std::string p = absl::StrCat("model.layers.", l, ".");
      const std::string a = p + "self_attn.";
      if (non_expert) {
        DMOE_ASSIGN_OR_RETURN(dl.input_norm, NewVec(src, p + "input_layernorm.weight",
                                                    hl ? &hl->input_layernorm : nullptr, D));
        DMOE_ASSIGN_OR_RETURN(dl.post_norm, NewVec(src, p + "post_attention_layernorm.weight",
                                                   hl ? &hl->post_attention_layernorm : nullptr, D));
        DMOE_ASSIGN_OR_RETURN(dl.a_proj, NewMat(rq > 0 ? rq + r + dr : r + dr + H * dq, D));
        if (rq > 0) {
          DMOE_RETURN_IF_ERROR(src.Matrix(a + "q_a_proj.weight", hl ? &hl->attn.q_a_proj : nullptr, rq, D, dl.a_proj.p,
                                          precision_));
          DMOE_ASSIGN_OR_RETURN(dl.q_a_norm, NewVec(src, a + "q_a_layernorm.weight",
                                                    hl ? &hl->attn.q_a_layernorm : nullptr, rq));
          DMOE_ASSIGN_OR_RETURN(dl.q_b, LoadMat(src, a + "q_b_proj.weight", hl ? &hl->attn.q_b_proj : nullptr, H * dq, rq));
        } else {
          DMOE_RETURN_IF_ERROR(src.Matrix(a + "q_proj.weight", hl ? &hl->attn.q_proj : nullptr, H * dq, D,
                                          dl.a_proj.at((r + dr) * D), precision_));
        }
        DMOE_RETURN_IF_ERROR(src.Matrix(a + "kv_a_proj_with_mqa.weight", hl ? &hl->attn.kv_a_proj_with_mqa : nullptr,
                                        r + dr, D, dl.a_proj.at((rq > 0 ? rq : 0) * D), precision_));
        DMOE_ASSIGN_OR_RETURN(dl.kv_a_norm, NewVec(src, a + "kv_a_layernorm.weight",
                                                   hl ? &hl->attn.kv_a_layernorm : nullptr, r));
        DMOE_ASSIGN_OR_RETURN(dl.kv_b, LoadMat(src, a + "kv_b_proj.weight", hl ? &hl->attn.kv_b_proj : nullptr,
                                               H * (dn + dv), r));
        DMOE_ASSIGN_OR_RETURN(dl.w_uk_t, NewMat(H * r, dn));
        DMOE_RETURN_IF_ERROR(TransposeUk(dl.kv_b.p, precision_, H, dn, dv, r, dl.w_uk_t.p, S()));
        DMOE_ASSIGN_OR_RETURN(dl.o_proj, LoadMat(src, a + "o_proj.weight", hl ? &hl->attn.o_proj : nullptr, D, H * dv));
        if (!c.is_moe_layer(l)) {
          const int64_t I = c.intermediate_size;
          DMOE_ASSIGN_OR_RETURN(dl.mlp_gate_up, NewMat(2 * I, D));
          DMOE_ASSIGN_OR_RETURN(dl.mlp_down, NewMat(D, I));
          DMOE_RETURN_IF_ERROR(LoadMlp(src, p + "mlp.", hl ? &hl->mlp : nullptr, I, dl.mlp_gate_up.p, dl.mlp_down.p));
        } else {
          DMOE_ASSIGN_OR_RETURN(dl.router, arena_.Alloc<float>(E * D));
          DMOE_RETURN_IF_ERROR(src.Matrix(p + "mlp.gate.weight", hl ? &hl->moe.router : nullptr, E, D, dl.router,
                                          OutType::kF32));
          if (c.n_shared_experts > 0) {
            const int64_t S = c.n_shared_experts * Ie;
            DMOE_ASSIGN_OR_RETURN(dl.shared_gate_up, NewMat(2 * S, D));
            DMOE_ASSIGN_OR_RETURN(dl.shared_down, NewMat(D, S));
            DMOE_RETURN_IF_ERROR(LoadMlp(src, p + "mlp.shared_experts.", hl ? &hl->moe.shared_experts : nullptr, S,
                                         dl.shared_gate_up.p, dl.shared_down.p));
          }
          // The gate's score-correction bias stays on the host (the gate runs there).
          if (c.model_type == ModelType::kDeepseekV3) {
            if (hl != nullptr) {
              hw.layers[l].moe.e_score_correction_bias = hl->moe.e_score_correction_bias;
            } else {
              DMOE_ASSIGN_OR_RETURN(hw.layers[l].moe.e_score_correction_bias,
                                    dummy->HostVector(p + "mlp.gate.e_score_correction_bias", E));
            }
            // ... and on the device for the device gate.
            const std::vector<float>& bias = hw.layers[l].moe.e_score_correction_bias;
            if (!bias.empty()) {
              DMOE_ASSIGN_OR_RETURN(dl.correction_bias, NewVec(host_source, "e_score_correction_bias", &bias,
                                                               static_cast<int64_t>(bias.size())));
            }
          }
        }
      }
      if (!c.is_moe_layer(l)) continue;
      dl.local_slot.assign(E, -1);
      for (int64_t e = 0; e < E; ++e) {
        const bool held = hl != nullptr ? (static_cast<int64_t>(hl->moe.experts.size()) > e &&
                                           hl->moe.experts[e].loaded())
                                        : (!selection.routed_expert || selection.routed_expert(l, e));
        if (held) dl.local_slot[e] = static_cast<int32_t>(dl.num_local++);
      }
      if (dl.num_local == 0) continue;
      DMOE_ASSIGN_OR_RETURN(dl.experts_gate_up, AllocElements(dl.num_local * 2 * Ie * D));
      DMOE_ASSIGN_OR_RETURN(dl.experts_down, AllocElements(dl.num_local * D * Ie));
      for (int64_t e = 0; e < E; ++e) {
        const int64_t s = dl.local_slot[e];
        if (s < 0) continue;
        DMOE_RETURN_IF_ERROR(LoadMlp(src, absl::StrCat(p, "mlp.experts.", e, "."), hl ? &hl->moe.experts[e] : nullptr,
                                     Ie, ElementAt(dl.experts_gate_up, precision_, s * 2 * Ie * D),
                                     ElementAt(dl.experts_down, precision_, s * D * Ie)));
      }
      hw.routed_experts_loaded += dl.num_local;
      hw.routed_expert_bytes += dl.num_local * 3 * Ie * D * ElementBytes(precision_);
    }
    DMOE_CUDA_CALL(cudaStreamSynchronize(stream_));
    hw.total_bytes = arena_.bytes();
    DMOE_LOG(kInfo, kLog) << (dummy ? "generated " : "uploaded ") << (arena_.bytes() >> 20) << " MiB of weights ("
                          << hw.routed_experts_loaded << " routed experts) on GPU " << options_.device << ", "
                          << (precision_ == OutType::kF32 ? "float32" : "bf16") << " compute";
    return absl::OkStatus();
  }

  const CudaBackendOptions options_;
  OutType precision_ = OutType::kBF16;  // weights, GEMM inputs and the latent cache
  Rope rope_;
  std::shared_ptr<const ModelWeights> host_;  // config, score-correction biases; no matrices
  std::mutex mu_;  // the cuBLAS handles are used by one thread at a time
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<BlasHandle> blas_;
  // The shared experts' stream (beside the routed experts on stream_, in
  // DeviceRoutedExperts), its own cuBLASLt handle and workspace, and the
  // fork / join events.
  cudaStream_t side_stream_ = nullptr;
  std::unique_ptr<BlasHandle> side_blas_;
  cudaEvent_t side_fork_ = nullptr, side_join_ = nullptr;
  cublasHandle_t sgemm_ = nullptr;
  cudaEvent_t router_done_ = nullptr;  // the router logits' copy back
  void* router_staging_ = nullptr;     // pinned host memory for them
  size_t router_staging_bytes_ = 0;
  cudaEvent_t upload_done_ = nullptr;  // the last upload from upload_staging_
  void* upload_staging_ = nullptr;     // pinned host memory for the experts' slots
  size_t upload_staging_bytes_ = 0;
  // Pinned ring for a step's small transfers (serving biases up, routing
  // choices down), and the host copies out of it due at the next wait.
  struct HostCopy {
    const char* src;
    void* dst;
    size_t bytes;
  };
  char* pinned_ = nullptr;
  size_t pinned_bytes_ = 0, pinned_used_ = 0;
  std::vector<HostCopy> host_copies_;
  // Step graphs by key; the one open between BeginStepGraph and EndStepGraph.
  static constexpr size_t kMaxStepGraphs = 24;
  std::map<StepGraphKey, std::unique_ptr<StepGraph>> graphs_;
  StepGraph* graph_ = nullptr;
  bool capturing_ = false;
  StepGraphKey graph_key_;
  size_t graph_device_at_ = 0, graph_pinned_at_ = 0;
  DeviceArena arena_;
  float* inv_freq_ = nullptr;
  DevMat embed_, lm_head_;
  float* final_norm_ = nullptr;
  std::vector<DevLayer> layers_;
};

}  // namespace

absl::Status SetProfilerCapture(bool on) {
  return CudaCall(on ? cudaProfilerStart() : cudaProfilerStop(), on ? "cudaProfilerStart" : "cudaProfilerStop");
}

absl::Status CheckCudaDevice(int device) {
  int count = 0;
  if (const cudaError_t err = cudaGetDeviceCount(&count); err != cudaSuccess) {
    return absl::UnavailableError(absl::StrCat("--device cuda: no usable GPU: cudaGetDeviceCount: ",
                                               cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
  }
  if (device < 0 || device >= count) {
    return absl::UnavailableError(
        absl::StrCat("--device cuda: GPU ", device, " does not exist (", count, " CUDA devices)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<ComputeBackend>> CreateCudaBackend(std::shared_ptr<const ModelWeights> weights,
                                                                  const CudaBackendOptions& options) {
  if (weights == nullptr) return absl::InvalidArgumentError("cuda: no weights");
  DMOE_RETURN_IF_ERROR(CheckCudaDevice(options.device));
  return CudaBackend::Build(weights->config, WeightSelection::All(), weights, std::nullopt, options);
}

absl::StatusOr<std::shared_ptr<ComputeBackend>> CreateDummyCudaBackend(const ModelConfig& config,
                                                                       const WeightSelection& selection,
                                                                       uint64_t seed,
                                                                       const CudaBackendOptions& options) {
  DMOE_RETURN_IF_ERROR(CheckCudaDevice(options.device));
  return CudaBackend::Build(config, selection, nullptr, seed, options);
}

}  // namespace dmoe::cuda
