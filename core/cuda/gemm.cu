// Dense GEMM through cuBLASLt, grouped GEMM (dmoe's tensor-core kernel or
// cuBLAS), and the routed-expert pipeline built on them.
#include <cublasLt.h>
#include <cublas_v2.h>

#include <algorithm>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "core/cuda/cuda_util.cuh"
#include "core/cuda/kernels.h"
#include "core/cuda/tensor_core.cuh"

namespace dmoe::cuda {

struct BlasHandle::Impl {
  cublasHandle_t blas = nullptr;
  cublasLtHandle_t lt = nullptr;
  void* lt_workspace = nullptr;
  size_t lt_workspace_bytes = size_t{32} << 20;
  // Descriptors and the heuristic's algorithm per shape (m, n, k, lda, ldb,
  // ldc, types), made once: creating them per call cost more host time than
  // a decode GEMM takes on the device.
  struct LtPlan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int>, LtPlan> plans;
  // cublasGemmGroupedBatchedEx's device pointer arrays.
  void* ptr_arrays = nullptr;
  size_t ptr_capacity = 0;  // pointers per array
  // cublasGemmGroupedBatchedEx refused this output type (index: OutType)
  // once: loop cublasGemmEx for it since; the refusal's status for reports.
  // (index: 2 * input type + output type)
  bool grouped_refused[4] = {false, false, false, false};
  std::string grouped_path = "cublasGemmGroupedBatchedEx";
  static void DestroyPlan(LtPlan& p) {
    if (p.lc != nullptr) cublasLtMatrixLayoutDestroy(p.lc);
    if (p.lb != nullptr) cublasLtMatrixLayoutDestroy(p.lb);
    if (p.la != nullptr) cublasLtMatrixLayoutDestroy(p.la);
    if (p.desc != nullptr) cublasLtMatmulDescDestroy(p.desc);
    p = LtPlan{};
  }
  ~Impl() {
    for (auto& [key, plan] : plans) DestroyPlan(plan);
    if (ptr_arrays != nullptr) cudaFree(ptr_arrays);
    if (lt_workspace != nullptr) cudaFree(lt_workspace);
    if (lt != nullptr) cublasLtDestroy(lt);
    if (blas != nullptr) cublasDestroy(blas);
  }
};

namespace {

absl::Status BlasStatus(cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, ": cuBLAS status ", static_cast<int>(st), " (", cublasGetStatusString(st), ")"));
}

#define DMOE_RETURN_IF_ERROR_CU(expr)    \
  do {                                   \
    absl::Status dmoe_st_ = (expr);      \
    if (!dmoe_st_.ok()) return dmoe_st_; \
  } while (0)

// ---- dmoe's grouped GEMM kernel: C_g = A_g · B_g^T, mma.m16n8k16 bf16. ----
// BK = 64: each weight row contributes 128 contiguous bytes per stage (32
// gave 64-byte pieces of 128 scattered rows and ~2.3 TB/s on weight-bound
// decode shapes).
constexpr int kGThreads = 128;
// A tile shape of the mma.sync kernel: BM x BN output rows x columns, BK deep
// k-stages, STAGES of them in the cp.async ring. Smem rows are BK + 8 bf16
// (an odd count of 16 bytes: conflict-free ldmatrix).
template <int BM_, int BN_, int BK_, int STAGES_>
struct MmaTile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, kStages = STAGES_, kStride = BK_ + 8;
  static constexpr size_t kSmemBytes = size_t{STAGES_} * (BM_ + BN_) * kStride * 2;
};
// 64-row tiles: 2 blocks of 110 KB per SM fit 4 stages as well as 3.
using MmaTile64 = MmaTile<64, 128, 64, 4>;
// 16-row tiles (decode): 3 blocks of 62 KB (65 KB) per SM.
using MmaTile16 = MmaTile<16, 128, 64, 3>;
using MmaTile16N64K128 = MmaTile<16, 64, 128, 3>;
constexpr int kMaxGroups = 1024;

// The row tile `tile` of BM-row tiles laid over the groups in order: its
// group (-1 past the last tile) and first row. A block-wide scan of the
// groups' tile counts (offsets read on the device); every thread calls it.
struct RowTile {
  int group;
  int64_t row0;
};
template <int BM, int THREADS>
__device__ RowTile FindRowTile(const GroupedGemmParams& p, int tile) {
  __shared__ int32_t warp_tot[THREADS / 32];
  __shared__ int32_t found[2];  // group, first tile of the group
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int G = static_cast<int>(p.num_groups);
  // Tiles of the groups this thread scans: contiguous groups [g0, g1).
  const int per = (G + THREADS - 1) / THREADS;
  const int g0 = tid * per, g1 = min(G, g0 + per);
  int mine = 0;
  for (int g = g0; g < g1; ++g) mine += (p.offsets[g + 1] - p.offsets[g] + BM - 1) / BM;
  int incl = mine;  // inclusive scan within the warp
  for (int o = 1; o < 32; o *= 2) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) warp_tot[warp] = incl;
  if (tid == 0) found[0] = -1;
  __syncthreads();
  int base = 0;
  for (int w = 0; w < warp; ++w) base += warp_tot[w];
  int start = base + incl - mine;  // exclusive prefix: first tile of group g0
  for (int g = g0; g < g1; ++g) {
    const int t = (p.offsets[g + 1] - p.offsets[g] + BM - 1) / BM;
    if (tile >= start && tile < start + t) {
      found[0] = g;
      found[1] = start;
    }
    start += t;
  }
  __syncthreads();
  const int group = found[0];
  if (group < 0) return {-1, 0};
  return {group, p.offsets[group] + int64_t{tile - found[1]} * BM};
}

// C[row][col], C[row][col + 1] = v0, v1 (float32 or bf16 C; N % 8 == 0
// keeps both columns in range when col is).
__device__ __forceinline__ void StorePair(const GroupedGemmParams& p, int64_t row, int64_t col, float v0, float v1) {
  if (p.c_type == OutType::kF32) {
    *reinterpret_cast<float2*>(static_cast<float*>(p.c) + row * p.n + col) = make_float2(v0, v1);
  } else {
    const uint32_t packed = FloatToBf16Bits(v0) | (uint32_t{FloatToBf16Bits(v1)} << 16);
    *reinterpret_cast<uint32_t*>(static_cast<uint16_t*>(p.c) + row * p.n + col) = packed;
  }
}

// grid.x: n tiles; grid.y: an upper bound of the m tiles summed over groups.
// Each block finds its (group, m tile) by a block-wide scan of the groups'
// tile counts (offsets read on the device). BM = 64 rows per tile for
// well-filled groups; BM = 16 when groups hold few rows each (decode: a few
// tokens per expert), so the padding does not turn a weight-bandwidth-bound
// product into a compute-bound one. Warps: BM 64 -> 2 x 2 warps of 32 x 64;
// BM 16 -> 1 x 4 warps of 16 x 32.
template <class Tile>
__global__ void __launch_bounds__(kGThreads) GroupedGemmKernel(GroupedGemmParams p) {
  constexpr int BM = Tile::BM, kBN = Tile::BN, kBK = Tile::BK, kGStride = Tile::kStride;
  constexpr int kGStages = Tile::kStages;
  constexpr int MT = BM == 64 ? 2 : 1;     // m16 tiles per warp
  constexpr int WARPS_M = BM / (16 * MT);  // 2 or 1
  constexpr int WARPS_N = 4 / WARPS_M;     // 2 or 4
  constexpr int NT = kBN / (8 * WARPS_N);  // n8 tiles per warp: 8 or 4
  extern __shared__ __align__(16) unsigned char gsmem[];
  uint16_t* as_base = reinterpret_cast<uint16_t*>(gsmem);  // [kGStages][BM * kGStride]
  uint16_t* bs_base = as_base + kGStages * BM * kGStride;  // [kGStages][kBN * kGStride]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const RowTile rt = FindRowTile<BM, kGThreads>(p, blockIdx.y);
  if (rt.group < 0) return;  // past the last tile
  const int group = rt.group;
  const int64_t row0 = rt.row0;
  const int64_t row_end = p.offsets[group + 1];
  const int64_t col0 = int64_t{blockIdx.x} * kBN;
  const int64_t K = p.k, N = p.n;
  const uint16_t* A = static_cast<const uint16_t*>(p.a);
  const uint16_t* B = static_cast<const uint16_t*>(p.b) + group * (p.b_group_stride != 0 ? p.b_group_stride : N * K);

  auto load = [&](int64_t k0, int stage) {
    for (int c = tid; c < BM * (kBK / 8); c += kGThreads) {
      const int r = c / (kBK / 8), ch = c % (kBK / 8);
      const int64_t row = row0 + r, kk = k0 + ch * 8;
      const bool ok = row < row_end && kk < K;
      CpAsync16(as_base + (stage * BM + r) * kGStride + ch * 8, ok ? A + row * K + kk : A, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < kBN * (kBK / 8) / kGThreads; ++i) {
      const int c = tid + i * kGThreads;
      const int r = c / (kBK / 8), ch = c % (kBK / 8);
      const int64_t col = col0 + r, kk = k0 + ch * 8;
      const bool ok = col < N && kk < K;
      CpAsync16(bs_base + (stage * kBN + r) * kGStride + ch * 8, ok ? B + col * K + kk : B, ok ? 16 : 0);
    }
  };
  const int64_t ktiles = (K + kBK - 1) / kBK;
  for (int s = 0; s < kGStages - 1; ++s) {
    if (s < ktiles) load(s * kBK, s);
    CpAsyncCommit();
  }
  const int wm = warp % WARPS_M, wn = warp / WARPS_M;
  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;
  const int mi = lane / 8, mr = lane % 8;
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    CpAsyncWait<kGStages - 2>();
    __syncthreads();
    if (kt + kGStages - 1 < ktiles) load((kt + kGStages - 1) * kBK, static_cast<int>((kt + kGStages - 1) % kGStages));
    CpAsyncCommit();
    const uint16_t* at = as_base + (kt % kGStages) * BM * kGStride;
    const uint16_t* btile = bs_base + (kt % kGStages) * kBN * kGStride;
    // Two k16 steps' fragments at a time, then their mma.
#pragma unroll
    for (int k2 = 0; k2 < kBK / 16; k2 += 2) {
      uint32_t af[2][MT][4], bf[2][NT / 2][4];
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
#pragma unroll
        for (int i = 0; i < MT; ++i)
          LdMatrixX4(af[ks][i],
                     at + (wm * 16 * MT + i * 16 + (lane % 16)) * kGStride + (k2 + ks) * 16 + (lane / 16) * 8);
#pragma unroll
        for (int j = 0; j < NT / 2; ++j)
          LdMatrixX4(bf[ks][j],
                     btile + (wn * 8 * NT + j * 16 + (mi / 2) * 8 + mr) * kGStride + (k2 + ks) * 16 + (mi % 2) * 8);
      }
#pragma unroll
      for (int ks = 0; ks < 2; ++ks)
#pragma unroll
        for (int j = 0; j < NT / 2; ++j)
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            Mma16816(acc[i][2 * j], af[ks][i], bf[ks][j][0], bf[ks][j][1]);
            Mma16816(acc[i][2 * j + 1], af[ks][i], bf[ks][j][2], bf[ks][j][3]);
          }
    }
  }
  CpAsyncWait<0>();
  const int g = lane / 4, q4 = lane % 4;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int64_t row = row0 + wm * 16 * MT + i * 16 + g + hh * 8;
      if (row >= row_end) continue;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int64_t col = col0 + wn * 8 * NT + j * 8 + q4 * 2;
        if (col >= N) continue;  // N % 8 == 0: both columns in range
        StorePair(p, row, col, acc[i][j][hh * 2], acc[i][j][hh * 2 + 1]);
      }
    }
  }
}

// ---- Hopper grouped GEMM: wgmma.m64n256k16 over 128 x 256 tiles. ----
// Two warpgroups, each 64 rows x 256 columns (128 float32 accumulators per
// thread) of the tile. Both operands stream through a 4-stage cp.async ring
// of 128-byte-swizzled K-major tiles (A 128 x 64, B 256 x 64: 48 KB a
// stage), two k-tiles ahead, and each warpgroup keeps one k-tile's MMAs in
// flight while the next tile's barrier and copies are issued. A warpgroup
// whose 64 rows are all past its group's end issues no MMAs (the tensor
// cores go to the other one). For groups of many rows (prefill); decode's
// few rows per expert stay on the 16-row mma.sync tiles above.
constexpr int kWBM = 128, kWBN = 256, kWBK = 64, kWStages = 4, kWThreads = 256;
constexpr size_t kWTileA = size_t{kWBM} * 128, kWTileB = size_t{kWBN} * 128;
constexpr size_t kWStageBytes = kWTileA + kWTileB;
constexpr size_t kWSmemBytes = kWStages * kWStageBytes + 1024;  // + room to align the ring to 1024 bytes

__global__ void __launch_bounds__(kWThreads, 1) GroupedGemmWgmmaKernel(GroupedGemmParams p) {
#if DMOE_HAS_WGMMA
  extern __shared__ __align__(16) unsigned char wsmem[];
  unsigned char* ring = wsmem + ((1024 - SmemAddr(wsmem) % 1024) % 1024);
  const int tid = threadIdx.x;
  const RowTile rt = FindRowTile<kWBM, kWThreads>(p, blockIdx.y);
  if (rt.group < 0) return;
  const int64_t row0 = rt.row0, row_end = p.offsets[rt.group + 1];
  const int64_t col0 = int64_t{blockIdx.x} * kWBN;
  const int64_t K = p.k, N = p.n;
  const uint16_t* A = static_cast<const uint16_t*>(p.a);
  const uint16_t* B =
      static_cast<const uint16_t*>(p.b) + rt.group * (p.b_group_stride != 0 ? p.b_group_stride : N * K);

  // Rows past the group's end, columns past N and k past K are zero-filled,
  // so every byte a wgmma reads was written this stage.
  auto load = [&](int64_t k0, int stage) {
    unsigned char* sa = ring + stage * kWStageBytes;
    unsigned char* sb = sa + kWTileA;
#pragma unroll
    for (int i = 0; i < kWBM * 8 / kWThreads; ++i) {
      const int c = tid + i * kWThreads, r = c / 8, ch = c % 8;
      const int64_t row = row0 + r, kk = k0 + ch * 8;
      const bool ok = row < row_end && kk < K;
      CpAsync16(sa + Sw128Offset(r, ch), ok ? A + row * K + kk : A, ok ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < kWBN * 8 / kWThreads; ++i) {
      const int c = tid + i * kWThreads, r = c / 8, ch = c % 8;
      const int64_t col = col0 + r, kk = k0 + ch * 8;
      const bool ok = col < N && kk < K;
      CpAsync16(sb + Sw128Offset(r, ch), ok ? B + col * K + kk : B, ok ? 16 : 0);
    }
  };
  constexpr int kAhead = kWStages - 2;  // k-tiles loading while one computes and one's MMAs drain
  const int64_t ktiles = CeilDiv(K, kWBK);
  for (int s = 0; s < kAhead; ++s) {
    if (s < ktiles) load(s * kWBK, s);
    CpAsyncCommit();
  }
  const int wg = tid / 128;
  const bool active = row0 + wg * 64 < row_end;
  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.f;
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    CpAsyncWait<kAhead - 1>();  // this thread's copies of k-tile kt landed
    FenceProxyAsync();          // ... and are visible to wgmma's async proxy
    WgmmaWait<1>();             // this warpgroup's MMAs of k-tile kt-2 are done
    __syncthreads();            // all threads: tile kt complete, stage of kt-2 free
    if (kt + kAhead < ktiles) load((kt + kAhead) * kWBK, static_cast<int>((kt + kAhead) % kWStages));
    CpAsyncCommit();
    if (active) {
      const unsigned char* sa = ring + (kt % kWStages) * kWStageBytes + wg * 64 * 128;
      const uint64_t da = Sw128Desc(sa), db = Sw128Desc(sa - wg * 64 * 128 + kWTileA);
      FenceAccumulators(acc);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kWBK / 16; ++kk) WgmmaM64N256K16(acc, da + 2 * kk, db + 2 * kk, 1);
      WgmmaCommit();
      FenceAccumulators(acc);
    }
  }
  WgmmaWait<0>();
  FenceAccumulators(acc);
  CpAsyncWait<0>();
  if (!active) return;
  const int warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, q4 = lane % 4;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int64_t row = row0 + wg * 64 + warp * 16 + g + hh * 8;
    if (row >= row_end) continue;
#pragma unroll
    for (int j = 0; j < kWBN / 8; ++j) {
      const int64_t col = col0 + j * 8 + q4 * 2;
      if (col < N) StorePair(p, row, col, acc[j * 4 + hh * 2], acc[j * 4 + hh * 2 + 1]);
    }
  }
#else
  __trap();  // launched only where WgmmaAvailable()
#endif
}

cudaDataType_t CudaType(OutType t) { return t == OutType::kF32 ? CUDA_R_32F : CUDA_R_16BF; }

absl::Status GroupedGemmCublas(const GroupedGemmParams& p, Stream stream) {
  DMOE_CUDA_CHECK_ARG(p.blas != nullptr && p.host_offsets != nullptr,
                      "GroupedGemm: kCublas needs blas and host_offsets");
  BlasHandle::Impl& h = *p.blas->impl();
  const int64_t stride = p.b_group_stride != 0 ? p.b_group_stride : p.n * p.k;
  const size_t es = ElementBytes(p.ab_type);
  const char* a = static_cast<const char*>(p.a);
  const char* b = static_cast<const char*>(p.b);
  const cudaDataType_t ab = CudaType(p.ab_type);
  std::vector<int> ms, ns, ks, ldas, ldbs, ldcs, sizes;
  std::vector<const void*> aptr, bptr;
  std::vector<void*> cptr;
  for (int64_t g = 0; g < p.num_groups; ++g) {
    const int rows = p.host_offsets[g + 1] - p.host_offsets[g];
    if (rows <= 0) continue;
    // Column-major view: C^T[n, rows] = B_g[n, k] (op T of its k x n storage) · A_g^T.
    ms.push_back(static_cast<int>(p.n));
    ns.push_back(rows);
    ks.push_back(static_cast<int>(p.k));
    ldas.push_back(static_cast<int>(p.k));
    ldbs.push_back(static_cast<int>(p.k));
    ldcs.push_back(static_cast<int>(p.n));
    sizes.push_back(1);
    aptr.push_back(b + g * stride * es);
    bptr.push_back(a + int64_t{p.host_offsets[g]} * p.k * es);
    cptr.push_back(static_cast<char*>(p.c) + int64_t{p.host_offsets[g]} * p.n * ElementBytes(p.c_type));
  }
  const size_t count = ms.size();
  if (count == 0) return absl::OkStatus();
  if (count > h.ptr_capacity) {
    if (h.ptr_arrays != nullptr) DMOE_RETURN_IF_ERROR_CU(CudaStatus(cudaFree(h.ptr_arrays), "cudaFree"));
    h.ptr_arrays = nullptr;
    DMOE_RETURN_IF_ERROR_CU(CudaStatus(cudaMalloc(&h.ptr_arrays, 3 * count * sizeof(void*)), "cudaMalloc(ptr arrays)"));
    h.ptr_capacity = count;
  }
  std::vector<const void*> all(3 * count);
  for (size_t i = 0; i < count; ++i) {
    all[i] = aptr[i];
    all[count + i] = bptr[i];
    all[2 * count + i] = cptr[i];
  }
  // Pageable source: the copy is staged before cudaMemcpyAsync returns.
  DMOE_RETURN_IF_ERROR_CU(CudaStatus(
      cudaMemcpyAsync(h.ptr_arrays, all.data(), all.size() * sizeof(void*), cudaMemcpyHostToDevice, AsStream(stream)),
      "cudaMemcpyAsync(ptr arrays)"));
  std::vector<cublasOperation_t> ta(count, CUBLAS_OP_T), tb(count, CUBLAS_OP_N);
  std::vector<float> alpha(count, 1.0f), beta(count, 0.0f);
  void** dev = static_cast<void**>(h.ptr_arrays);
  DMOE_RETURN_IF_ERROR_CU(BlasStatus(cublasSetStream(h.blas, AsStream(stream)), "cublasSetStream"));
  const int type_index = 2 * static_cast<int>(p.ab_type) + static_cast<int>(p.c_type);
  if (!h.grouped_refused[type_index]) {
    const cublasStatus_t st = cublasGemmGroupedBatchedEx(
        h.blas, ta.data(), tb.data(), ms.data(), ns.data(), ks.data(), alpha.data(),
        const_cast<const void* const*>(dev), ab, ldas.data(), const_cast<const void* const*>(dev + count),
        ab, ldbs.data(), beta.data(), dev + 2 * count, CudaType(p.c_type), ldcs.data(),
        static_cast<int>(count), sizes.data(), CUBLAS_COMPUTE_32F);
    if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE)
      return BlasStatus(st, "cublasGemmGroupedBatchedEx");
    h.grouped_refused[type_index] = true;
    h.grouped_path = absl::StrCat("cublasGemmEx loop for ", p.ab_type == OutType::kF32 ? "fp32" : "bf16", " inputs, ",
                                  p.c_type == OutType::kF32 ? "fp32" : "bf16", " outputs (cublasGemmGroupedBatchedEx returned ",
                                  cublasGetStatusString(st), ")");
  }
  for (size_t i = 0; i < count; ++i) {
    DMOE_RETURN_IF_ERROR_CU(
        BlasStatus(cublasGemmEx(h.blas, CUBLAS_OP_T, CUBLAS_OP_N, ms[i], ns[i], ks[i], &alpha[i], aptr[i], ab,
                                ldas[i], bptr[i], ab, ldbs[i], &beta[i], cptr[i], CudaType(p.c_type), ldcs[i],
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "cublasGemmEx"));
  }
  return absl::OkStatus();
}

// ---- routed experts ----
constexpr size_t kAlign = 256;
size_t AlignUp(size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

struct MoeLayout {
  size_t offsets, slot_row, row_token, x_perm, h, act, y, total;
};
// es: bytes per element of the permuted activations (the weights' type).
MoeLayout Layout(int64_t n, int64_t k, int64_t E, int64_t D, int64_t I, size_t es) {
  MoeLayout l{};
  const size_t rows = static_cast<size_t>(n * k);
  size_t at = 0;
  l.offsets = at;
  at += AlignUp((E + 1) * sizeof(int32_t));
  l.slot_row = at;
  at += AlignUp(rows * sizeof(int32_t));
  l.row_token = at;
  at += AlignUp(rows * sizeof(int32_t));
  l.x_perm = at;
  at += AlignUp(rows * D * es);
  l.h = at;
  at += AlignUp(rows * 2 * I * 4);
  l.act = at;
  at += AlignUp(rows * I * es);
  l.y = at;
  at += AlignUp(rows * D * 4);
  l.total = at;
  return l;
}

// One block: counts slots per expert, scans them into offsets and gives every
// slot a row of its expert's segment (slots in index order within an expert
// is not needed: each row is computed independently and the combine reads
// rows through slot_row).
__global__ void MoePermuteKernel(const int32_t* topk_idx, int64_t slots, int64_t k, int E, int32_t* offsets,
                                 int32_t* slot_row, int32_t* row_token) {
  extern __shared__ int32_t sh[];  // counts[E], cursor[E]
  int32_t* counts = sh;
  int32_t* cursor = sh + E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  for (int64_t s = threadIdx.x; s < slots; s += blockDim.x) {
    const int e = topk_idx[s];
    if (e >= 0 && e < E) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t run = 0;
    for (int e = 0; e < E; ++e) {
      offsets[e] = run;
      cursor[e] = run;
      run += counts[e];
    }
    offsets[E] = run;
  }
  __syncthreads();
  for (int64_t s = threadIdx.x; s < slots; s += blockDim.x) {
    const int e = topk_idx[s];
    if (e >= 0 && e < E) {
      const int32_t row = atomicAdd(&cursor[e], 1);
      slot_row[s] = row;
      row_token[row] = static_cast<int32_t>(s / k);
    } else {
      slot_row[s] = -1;
    }
  }
}


// x_perm[row] = T(x[row_token[row]]), one block per row, 4 floats per
// thread and turn (D % 8 == 0) (T: bf16 bits or float).
template <typename T>
__global__ void MoeGatherKernel(const float* x, int64_t D, const int32_t* offsets, int E, const int32_t* row_token,
                                T* x_perm) {
  const int64_t row = blockIdx.x;
  if (row >= offsets[E]) return;
  const float4* src = reinterpret_cast<const float4*>(x + int64_t{row_token[row]} * D);
  T* dst = x_perm + row * D;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < D / 4; i += blockDim.x) Store4(dst + 4 * i, src[i]);
}

// act[row][i] = T(silu(h[row][i]) * h[row][I + i]) for rows < offsets[E],
// 4 columns per thread and turn (I % 8 == 0).
template <typename T>
__global__ void MoeSiluKernel(const float* h, int64_t I, const int32_t* offsets, int E, T* act) {
  const int64_t row = blockIdx.x;
  if (row >= offsets[E]) return;
  const float4* gate = reinterpret_cast<const float4*>(h + row * 2 * I);
  const float4* up = reinterpret_cast<const float4*>(h + row * 2 * I + I);
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < I / 4; i += blockDim.x) {
    const float4 g = gate[i], u = up[i];
    const float4 a = make_float4(g.x / (1.0f + expf(-g.x)) * u.x, g.y / (1.0f + expf(-g.y)) * u.y,
                                 g.z / (1.0f + expf(-g.z)) * u.z, g.w / (1.0f + expf(-g.w)) * u.w);
    Store4(act + row * I + 4 * i, a);
  }
}

// out[t] = sum_j w[t][j] * y[slot_row[t*k+j]] in slot order. Block (t,
// chunk): kCombineThreads threads of 4 columns each over one token's
// chunk of D (D % 8 == 0), the k rows' loads all in flight together.
constexpr int kCombineThreads = 128;
constexpr int kCombineMaxK = 32;
__global__ void __launch_bounds__(kCombineThreads) MoeCombineKernel(const float* y, int64_t D,
                                                                     const int32_t* slot_row, const float* w,
                                                                     int64_t k, float* out) {
  __shared__ int32_t rows[kCombineMaxK];
  __shared__ float weights[kCombineMaxK];
  const int64_t t = blockIdx.x;
  if (threadIdx.x < k) {
    rows[threadIdx.x] = slot_row[t * k + threadIdx.x];
    weights[threadIdx.x] = w[t * k + threadIdx.x];
  }
  __syncthreads();
  const int64_t c4 = int64_t{blockIdx.y} * kCombineThreads + threadIdx.x;  // float4 column
  if (c4 >= D / 4) return;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
  for (int64_t j = 0; j < k; ++j) {
    const int32_t row = rows[j];
    if (row < 0) continue;
    const float4 v = reinterpret_cast<const float4*>(y + int64_t{row} * D)[c4];
    const float wj = weights[j];
    acc.x += wj * v.x;
    acc.y += wj * v.y;
    acc.z += wj * v.z;
    acc.w += wj * v.w;
  }
  reinterpret_cast<float4*>(out + t * D)[c4] = acc;
}

}  // namespace

bool WgmmaAvailable() {
#if defined(DMOE_SM90A)
  static const bool ok = [] {
    int dev = 0, major = 0, minor = 0;
    return cudaGetDevice(&dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
           cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess && major == 9 &&
           minor == 0;
  }();
  return ok;
#else
  return false;
#endif
}

BlasHandle::BlasHandle(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
BlasHandle::~BlasHandle() = default;

absl::StatusOr<std::unique_ptr<BlasHandle>> BlasHandle::Create() {
  auto impl = std::make_unique<Impl>();
  DMOE_RETURN_IF_ERROR_CU(BlasStatus(cublasCreate(&impl->blas), "cublasCreate"));
  DMOE_RETURN_IF_ERROR_CU(BlasStatus(cublasLtCreate(&impl->lt), "cublasLtCreate"));
  DMOE_RETURN_IF_ERROR_CU(
      CudaStatus(cudaMalloc(&impl->lt_workspace, impl->lt_workspace_bytes), "cudaMalloc(cuBLASLt workspace)"));
  return std::unique_ptr<BlasHandle>(new BlasHandle(std::move(impl)));
}

absl::Status Gemm(BlasHandle& blas, const GemmParams& p0, Stream stream) {
  GemmParams p = p0;
  if (p.lda == 0) p.lda = p.k;
  if (p.ldb == 0) p.ldb = p.k;
  if (p.ldc == 0) p.ldc = p.n;
  DMOE_CUDA_CHECK_ARG(p.n > 0 && p.k > 0 && p.lda >= p.k && p.ldb >= p.k && p.ldc >= p.n, "Gemm: shapes");
  if (p.m <= 0) return absl::OkStatus();
  BlasHandle::Impl& h = *blas.impl();
  const auto key = std::make_tuple(p.m, p.n, p.k, p.lda, p.ldb, p.ldc,
                                   2 * static_cast<int>(p.ab_type) + static_cast<int>(p.c_type));
  auto it = h.plans.find(key);
  if (it == h.plans.end()) {
    // Column-major view: C^T[n, m] = op_T(B stored k x n) · A stored k x m.
    BlasHandle::Impl::LtPlan plan;
    cublasLtMatmulPreference_t pref = nullptr;
    absl::Status st = [&]() -> absl::Status {
      DMOE_RETURN_IF_ERROR_CU(
          BlasStatus(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate"));
      const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
      DMOE_RETURN_IF_ERROR_CU(BlasStatus(
          cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta), "TRANSA"));
      DMOE_RETURN_IF_ERROR_CU(BlasStatus(
          cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb), "TRANSB"));
      DMOE_RETURN_IF_ERROR_CU(
          BlasStatus(cublasLtMatrixLayoutCreate(&plan.la, CudaType(p.ab_type), p.k, p.n, p.ldb), "layout A"));
      DMOE_RETURN_IF_ERROR_CU(
          BlasStatus(cublasLtMatrixLayoutCreate(&plan.lb, CudaType(p.ab_type), p.k, p.m, p.lda), "layout B"));
      DMOE_RETURN_IF_ERROR_CU(
          BlasStatus(cublasLtMatrixLayoutCreate(&plan.lc, CudaType(p.c_type), p.n, p.m, p.ldc), "layout C"));
      DMOE_RETURN_IF_ERROR_CU(BlasStatus(cublasLtMatmulPreferenceCreate(&pref), "preference"));
      DMOE_RETURN_IF_ERROR_CU(
          BlasStatus(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                          &h.lt_workspace_bytes, sizeof h.lt_workspace_bytes),
                     "preference workspace"));
      cublasLtMatmulHeuristicResult_t result{};
      int found = 0;
      DMOE_RETURN_IF_ERROR_CU(BlasStatus(
          cublasLtMatmulAlgoGetHeuristic(h.lt, plan.desc, plan.la, plan.lb, plan.lc, plan.lc, pref, 1, &result, &found),
          "cublasLtMatmulAlgoGetHeuristic"));
      if (found == 0) return absl::InternalError("Gemm: cuBLASLt found no algorithm");
      plan.algo = result.algo;
      return absl::OkStatus();
    }();
    if (pref != nullptr) cublasLtMatmulPreferenceDestroy(pref);
    if (!st.ok()) {
      BlasHandle::Impl::DestroyPlan(plan);
      return st;
    }
    it = h.plans.emplace(key, plan).first;
  }
  const BlasHandle::Impl::LtPlan& plan = it->second;
  const float alpha = 1.0f, beta = 0.0f;
  return BlasStatus(cublasLtMatmul(h.lt, plan.desc, &alpha, p.b, plan.la, p.a, plan.lb, &beta, p.c, plan.lc, p.c,
                                   plan.lc, &plan.algo, h.lt_workspace, h.lt_workspace_bytes, AsStream(stream)),
                    "cublasLtMatmul");
}

const char* CublasGroupedPath(const BlasHandle& blas) { return blas.impl()->grouped_path.c_str(); }

template <class Tile>
absl::Status LaunchMmaTiles(const GroupedGemmParams& p, int64_t tiles_y, cudaStream_t s) {
  static const cudaError_t attr = cudaFuncSetAttribute(
      GroupedGemmKernel<Tile>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Tile::kSmemBytes));
  DMOE_RETURN_IF_ERROR_CU(CudaStatus(attr, "cudaFuncSetAttribute(GroupedGemmKernel)"));
  const dim3 grid(static_cast<unsigned>(CeilDiv(p.n, Tile::BN)), static_cast<unsigned>(tiles_y));
  GroupedGemmKernel<Tile><<<grid, kGThreads, Tile::kSmemBytes, s>>>(p);
  return LaunchStatus("GroupedGemmKernel");
}

int GroupedGemmTileRows(int64_t max_rows, int64_t num_groups, int64_t n) {
  const int64_t per_group = num_groups > 0 ? max_rows / num_groups : max_rows;
  // Few rows per group (decode, <= 8 on average): 16-row tiles, so padding
  // does not turn a weight-bandwidth-bound product into a compute-bound one.
  if (per_group <= 8) return 16;
  // More: Hopper's 128 x 256 wgmma tiles where built and present (measured
  // faster than 64-row mma.sync tiles from 16 rows a group up, and 2x at
  // prefill's hundreds: bench/results/gpu_kernels.md).
  // (Not for products narrower than its 256 columns, e.g. MLA's per-head ones.)
  if (WgmmaAvailable() && n >= kWBN) return 128;
  return 64;
}

absl::Status GroupedGemm(const GroupedGemmParams& p, Stream stream) {
  DMOE_CUDA_CHECK_ARG(p.num_groups > 0 && p.num_groups <= kMaxGroups, "GroupedGemm: 0 < num_groups <= 1024");
  DMOE_CUDA_CHECK_ARG(p.n > 0 && p.k > 0 && p.n % 8 == 0 && p.k % 8 == 0, "GroupedGemm: n, k positive multiples of 8");
  DMOE_CUDA_CHECK_ARG(p.max_rows >= 0, "GroupedGemm: max_rows >= 0");
  if (p.impl == GroupedGemmImpl::kCublas) return GroupedGemmCublas(p, stream);
  DMOE_CUDA_CHECK_ARG(p.ab_type == OutType::kBF16, "GroupedGemm: float32 inputs take kCublas");
  if (p.max_rows == 0) return absl::OkStatus();
  DMOE_CUDA_CHECK_ARG(p.tile_rows == 0 || p.tile_rows == 16 || p.tile_rows == 64 || p.tile_rows == 128,
                      "GroupedGemm: tile_rows 0, 16, 64 or 128");
  DMOE_CUDA_CHECK_ARG(p.tile_rows != 128 || WgmmaAvailable(),
                      "GroupedGemm: tile_rows 128 needs an sm_90 device and a build for CUDA architecture 90a");
  const int bm = p.tile_rows != 0 ? p.tile_rows : GroupedGemmTileRows(p.max_rows, p.num_groups, p.n);
  const int64_t tiles_y = CeilDiv(p.max_rows, bm) + p.num_groups;
  DMOE_CUDA_CHECK_ARG(tiles_y < 65536, "GroupedGemm: too many row tiles");
  cudaStream_t s = AsStream(stream);
  if (bm == 128) {
    static const cudaError_t attr = cudaFuncSetAttribute(
        GroupedGemmWgmmaKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kWSmemBytes));
    DMOE_RETURN_IF_ERROR_CU(CudaStatus(attr, "cudaFuncSetAttribute(GroupedGemmWgmmaKernel)"));
    const dim3 grid(static_cast<unsigned>(CeilDiv(p.n, kWBN)), static_cast<unsigned>(tiles_y));
    GroupedGemmWgmmaKernel<<<grid, kWThreads, kWSmemBytes, s>>>(p);
    return LaunchStatus("GroupedGemmWgmmaKernel");
  }
  if (bm == 16) {
    // Narrower, deeper tiles when the grid of 128-column tiles is small
    // (under 64 blocks per SM, e.g. V2-Lite's and V3's gate_up at decode):
    // twice the blocks balance the SMs better and each weight row gives 256
    // contiguous bytes a stage. Measured on the H200 at 64 tokens: V2-Lite
    // gate_up 197 -> 189 us, down 103 -> 100, V3 gate_up 3292 -> 3120; V3's
    // down (14336 blocks) was slower with them, 1614 -> 1740.
    const int64_t blocks128 = CeilDiv(p.n, MmaTile16::BN) * std::min<int64_t>(p.num_groups, p.max_rows);
    if (blocks128 < 64 * int64_t{NumSms()}) return LaunchMmaTiles<MmaTile16N64K128>(p, tiles_y, s);
    return LaunchMmaTiles<MmaTile16>(p, tiles_y, s);
  }
  return LaunchMmaTiles<MmaTile64>(p, tiles_y, s);
}

size_t MoeExpertsWorkspaceBytes(int64_t n, int64_t top_k, int64_t num_experts, int64_t hidden, int64_t intermediate,
                                OutType weight_type) {
  return Layout(n, top_k, num_experts, hidden, intermediate, ElementBytes(weight_type)).total;
}

absl::Status MoeExperts(const MoeExpertsParams& p, Stream stream) {
  DMOE_CUDA_CHECK_ARG(p.num_experts > 0 && p.num_experts <= kMaxGroups, "MoeExperts: 0 < num_experts <= 1024");
  DMOE_CUDA_CHECK_ARG(p.top_k > 0 && p.hidden > 0 && p.intermediate > 0 && p.hidden % 8 == 0 && p.intermediate % 8 == 0,
                      "MoeExperts: top_k > 0, hidden and intermediate positive multiples of 8");
  DMOE_CUDA_CHECK_ARG(p.n * p.top_k < (int64_t{1} << 31), "MoeExperts: too many slots");
  DMOE_CUDA_CHECK_ARG(p.top_k <= kCombineMaxK, "MoeExperts: top_k <= 32");
  DMOE_CUDA_CHECK_ARG(reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.out) % 16 == 0,
                      "MoeExperts: x and out 16-byte aligned");
  if (p.n <= 0) return absl::OkStatus();
  DMOE_CUDA_CHECK_ARG(p.weight_type == OutType::kBF16 || p.impl == GroupedGemmImpl::kCublas,
                      "MoeExperts: float32 weights take kCublas");
  const bool f32 = p.weight_type == OutType::kF32;
  const MoeLayout l = Layout(p.n, p.top_k, p.num_experts, p.hidden, p.intermediate, ElementBytes(p.weight_type));
  DMOE_CUDA_CHECK_ARG(p.workspace != nullptr && p.workspace_bytes >= l.total,
                      absl::StrCat("MoeExperts: workspace needs ", l.total, " bytes"));
  char* ws = static_cast<char*>(p.workspace);
  auto* offsets = reinterpret_cast<int32_t*>(ws + l.offsets);
  auto* slot_row = reinterpret_cast<int32_t*>(ws + l.slot_row);
  auto* row_token = reinterpret_cast<int32_t*>(ws + l.row_token);
  void* x_perm = ws + l.x_perm;
  auto* h = reinterpret_cast<float*>(ws + l.h);
  void* act = ws + l.act;
  auto* y = reinterpret_cast<float*>(ws + l.y);
  const int E = static_cast<int>(p.num_experts);
  const int64_t slots = p.n * p.top_k;
  cudaStream_t s = AsStream(stream);

  MoePermuteKernel<<<1, 1024, 2 * E * sizeof(int32_t), s>>>(p.topk_idx, slots, p.top_k, E, offsets, slot_row,
                                                            row_token);
  DMOE_RETURN_IF_ERROR_CU(LaunchStatus("MoePermuteKernel"));
  if (f32) {
    MoeGatherKernel<<<static_cast<unsigned>(slots), 256, 0, s>>>(p.x, p.hidden, offsets, E, row_token,
                                                                  static_cast<float*>(x_perm));
  } else {
    MoeGatherKernel<<<static_cast<unsigned>(slots), 256, 0, s>>>(p.x, p.hidden, offsets, E, row_token,
                                                                  static_cast<uint16_t*>(x_perm));
  }
  DMOE_RETURN_IF_ERROR_CU(LaunchStatus("MoeGatherKernel"));

  std::vector<int32_t> host_offsets;
  GroupedGemmParams g;
  g.num_groups = E;
  g.offsets = offsets;
  g.max_rows = slots;
  g.impl = p.impl;
  g.blas = p.blas;
  if (p.impl == GroupedGemmImpl::kCublas) {
    host_offsets.resize(E + 1);
    DMOE_RETURN_IF_ERROR_CU(
        CudaStatus(cudaMemcpyAsync(host_offsets.data(), offsets, (E + 1) * sizeof(int32_t), cudaMemcpyDeviceToHost, s),
                   "offsets to host"));
    DMOE_RETURN_IF_ERROR_CU(CudaStatus(cudaStreamSynchronize(s), "cudaStreamSynchronize"));
    g.host_offsets = host_offsets.data();
  }
  g.ab_type = p.weight_type;
  g.a = x_perm;
  g.b = p.w_gate_up;
  g.c = h;
  g.c_type = OutType::kF32;
  g.n = 2 * p.intermediate;
  g.k = p.hidden;
  DMOE_RETURN_IF_ERROR_CU(GroupedGemm(g, stream));
  if (f32) {
    MoeSiluKernel<<<static_cast<unsigned>(slots), 256, 0, s>>>(h, p.intermediate, offsets, E, static_cast<float*>(act));
  } else {
    MoeSiluKernel<<<static_cast<unsigned>(slots), 256, 0, s>>>(h, p.intermediate, offsets, E,
                                                                static_cast<uint16_t*>(act));
  }
  DMOE_RETURN_IF_ERROR_CU(LaunchStatus("MoeSiluKernel"));
  g.a = act;
  g.b = p.w_down;
  g.c = y;
  g.n = p.hidden;
  g.k = p.intermediate;
  DMOE_RETURN_IF_ERROR_CU(GroupedGemm(g, stream));
  const dim3 combine(static_cast<unsigned>(p.n), static_cast<unsigned>(CeilDiv(p.hidden / 4, kCombineThreads)));
  MoeCombineKernel<<<combine, kCombineThreads, 0, s>>>(y, p.hidden, slot_row, p.topk_weights, p.top_k, p.out);
  return LaunchStatus("MoeCombineKernel");
}

}  // namespace dmoe::cuda
