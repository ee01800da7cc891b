// MLA attention in the absorbed form over the paged bf16 latent cache
// (kernels.h describes the function, the cache layout and the work split).
//
// Tensor-core kernel, per thread block (8 warps): 64 query heads of one
// query, a range of 32-token cache tiles. Q [64, 576] stays in shared memory;
// tiles stream through a 3-stage cp.async ring. Warp w owns head rows
// 16*(w%4).. and, for QK^T, the tile's tokens 16*(w/4)..; for PV, latent dims
// 256*(w/4)... Scores go through shared memory so both warps of a row block
// see the whole tile's row, then the online softmax runs in registers in the
// A-fragment layout of mma.m16n8k16 and PV uses the tile (c part) straight
// from shared memory through ldmatrix.trans.
#include <algorithm>
#include <cfloat>

#include "core/cuda/cuda_util.cuh"
#include "core/cuda/kernels.h"
#include "core/cuda/tensor_core.cuh"

namespace dmoe::cuda {
namespace {

constexpr int kRank = 512;  // kv_lora_rank
constexpr int kRope = 64;   // qk_rope_head_dim
constexpr int kWidth = kRank + kRope;
constexpr int kTile = 32;                  // tokens per tile
constexpr int kStride = kWidth + 8;        // bf16 per smem row: +16 bytes keeps ldmatrix rows on distinct banks
constexpr int kSStride = kTile + 4;        // floats per score row
constexpr int kChunksPerRow = kWidth / 8;  // 16-byte chunks
constexpr int kRefThreads = 256;           // the reference kernel
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// A block of ROWS heads: ROWS / 16 row blocks of 2 warps each. 64 rows: 8
// warps, 3 stages, 196 KB, 1 block per SM. 16 rows (H <= 16 without padding
// to 64): 2 warps, 2 stages, 96 KB, 2 blocks per SM.
template <int ROWS>
struct MlaCfg {
  static constexpr int kRB = ROWS / 16;
  static constexpr int kThreads = 64 * kRB;
  static constexpr int kStages = ROWS == 64 ? 3 : 2;
  static constexpr int kBlocksPerSm = ROWS == 64 ? 1 : 2;
  static constexpr size_t kSmemQ = size_t{ROWS} * kStride * 2;
  static constexpr size_t kSmemK = size_t{kStages} * kTile * kStride * 2;
  static constexpr size_t kSmemS = size_t{ROWS} * kSStride * 4;
  static constexpr size_t kSmemBytes = kSmemQ + kSmemK + kSmemS;
};

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const uint32_t l = FloatToBf16Bits(lo), h = FloatToBf16Bits(hi);
  return l | (h << 16);
}

struct Grid {
  int head_blocks;
  int splits;
};

// Query q's context length. A position past the block table's row (a
// caller's bug) is clamped, never read out of bounds.
__device__ __forceinline__ int64_t MlaContext(const MlaAttentionParams& p, int64_t q) {
  const int64_t cap = p.max_pages_per_seq * p.shape.page_size;
  const int32_t pos = p.query_pos[q];
  return pos < 0 ? 0 : (int64_t{pos} + 1 < cap ? int64_t{pos} + 1 : cap);
}

// A finished output row `row` (query * H + head) of this split, whose
// softmax sum is l and max m_log2 (log2 units): records its LSE (when
// write_lse) in the output, or with several splits in the split's workspace
// slice, and says where its normalized values go and the factor 1 / l.
struct RowOutput {
  float* dst;
  float inv;
};
__device__ __forceinline__ RowOutput MlaFinishRow(const MlaAttentionParams& p, int splits, int split, int64_t row,
                                                  float l, float m_log2, bool write_lse) {
  const float inv = l > 0.f ? 1.0f / l : 0.f;
  const float lse = l > 0.f ? (m_log2 + log2f(l)) * kLn2 : -INFINITY;
  if (splits == 1) {
    if (p.lse != nullptr && write_lse) p.lse[row] = lse;
    return {p.out + row * kRank, inv};
  }
  float* ws = static_cast<float*>(p.workspace);
  const int64_t rows_total = p.num_queries * p.num_heads;
  if (write_lse) ws[int64_t{splits} * rows_total * kRank + int64_t{split} * rows_total + row] = lse;
  return {ws + (int64_t{split} * rows_total + row) * kRank, inv};
}

// Tiles [t0, t1) of split `split`: the context's tiles cut into equal runs.
struct TileRange {
  int64_t t0, t1;
};
__device__ __forceinline__ TileRange SplitTiles(int64_t ctx, int tile, int splits, int split) {
  const int64_t tiles = CeilDiv(ctx, tile);
  const int64_t per_split = CeilDiv(tiles, splits);
  const int64_t t0 = split * per_split;
  return {t0, t0 + per_split < tiles ? t0 + per_split : tiles};
}

// Starts the copies of `rows` rows of Q ([q_lat | q_pe] of output row
// row_of(r); zeros where it is -1, a padding row) into shared memory; at(r,
// chunk) is where 16-byte chunk `chunk` (of 72) of row r goes.
template <typename RowOf, typename At>
__device__ __forceinline__ void LoadQuery(const MlaAttentionParams& p, int rows, int tid, int threads, RowOf row_of,
                                          At at) {
  const uint16_t* q_lat = static_cast<const uint16_t*>(p.q_lat);
  const uint16_t* q_pe = static_cast<const uint16_t*>(p.q_pe);
  for (int c = tid; c < rows * kChunksPerRow; c += threads) {
    const int row = c / kChunksPerRow, chunk = c % kChunksPerRow;
    const int64_t qrow = row_of(row);
    const uint16_t* src = q_lat;
    int bytes = 0;
    if (qrow >= 0) {
      bytes = 16;
      src = chunk < kRank / 8 ? q_lat + qrow * kRank + chunk * 8 : q_pe + qrow * kRope + (chunk - kRank / 8) * 8;
    }
    CpAsync16(at(row, chunk), src, bytes);
  }
}

// Starts the copies of cache tile ti (TILE tokens of the block table bt's
// sequence; rows at or past ctx zero-filled). A tile never straddles pages
// (page_size % TILE == 0): one block-table lookup, no per-chunk division.
template <int TILE, int THREADS, typename At>
__device__ __forceinline__ void LoadLatentTile(const MlaAttentionParams& p, const int32_t* bt, int64_t ctx, int64_t ti,
                                               int tid, At at) {
  const uint16_t* cache = static_cast<const uint16_t*>(p.cache);
  const int page_size = static_cast<int>(p.shape.page_size);
  const int64_t pos0 = ti * TILE;
  const int32_t page = bt[static_cast<int32_t>(pos0) / page_size];
  const uint16_t* base = cache + (int64_t{page} * page_size + static_cast<int32_t>(pos0) % page_size) * kWidth;
  const int valid_rows = ctx - pos0 < TILE ? static_cast<int>(ctx - pos0) : TILE;
#pragma unroll
  for (int i = 0; i < TILE * kChunksPerRow / THREADS; ++i) {
    const int c = tid + i * THREADS;
    const int row = c / kChunksPerRow, chunk = c % kChunksPerRow;
    const bool ok = row < valid_rows;
    CpAsync16(at(row, chunk), ok ? base + row * kWidth + chunk * 8 : cache, ok ? 16 : 0);
  }
}

// Block index -> (query, split, head block); head block fastest so the
// blocks reading the same tiles run side by side (the second read hits L2).
template <int ROWS>
__global__ void __launch_bounds__(MlaCfg<ROWS>::kThreads, MlaCfg<ROWS>::kBlocksPerSm)
    MlaAttentionKernel(MlaAttentionParams p, Grid grid) {
  using C = MlaCfg<ROWS>;
  constexpr int kRows = ROWS, kThreads = C::kThreads, kStages = C::kStages;
  constexpr size_t kSmemQ = C::kSmemQ, kSmemK = C::kSmemK;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* qs = reinterpret_cast<uint16_t*>(smem);
  uint16_t* ks = reinterpret_cast<uint16_t*>(smem + kSmemQ);
  float* ss = reinterpret_cast<float*>(smem + kSmemQ + kSmemK);

  const int64_t block = blockIdx.x;
  const int hb = static_cast<int>(block % grid.head_blocks);
  const int split = static_cast<int>((block / grid.head_blocks) % grid.splits);
  const int64_t qb = block / (int64_t{grid.head_blocks} * grid.splits);
  const int H = static_cast<int>(p.num_heads);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  // The block's queries: one, or (query_blocks) a run of one sequence's
  // queries, rows query-major then head.
  const bool grouped = p.query_blocks != nullptr;
  const int64_t q_first = grouped ? p.query_blocks[qb] : qb;
  const int q_count = grouped ? static_cast<int>(p.query_blocks[qb + 1] - q_first) : 1;
  // Block row r -> its row of q_lat / out (query * H + head), -1 for padding.
  auto row_of = [&](int r) -> int64_t {
    if (grouped) return r / H < q_count ? q_first * H + r : -1;
    const int h = hb * kRows + r;
    return h < H ? q_first * H + h : -1;
  };
  int64_t ctx = 0;
  for (int j = 0; j < q_count; ++j) {
    const int64_t c = MlaContext(p, q_first + j);
    ctx = c > ctx ? c : ctx;
  }
  const TileRange range = SplitTiles(ctx, kTile, grid.splits, split);
  const int64_t t0 = range.t0, t1 = range.t1;
  const int32_t* bt = p.block_tables + int64_t{p.query_seq[q_first]} * p.max_pages_per_seq;

  LoadQuery(p, kRows, tid, kThreads, row_of, [&](int row, int chunk) { return qs + row * kStride + chunk * 8; });
  auto load_tile = [&](int64_t ti, int stage) {
    uint16_t* dst = ks + stage * kTile * kStride;
    LoadLatentTile<kTile, kThreads>(p, bt, ctx, ti, tid,
                                    [&](int row, int chunk) { return dst + row * kStride + chunk * 8; });
  };
  for (int s = 0; s < kStages - 1; ++s) {
    if (t0 + s < t1) load_tile(t0 + s, s);
    CpAsyncCommit();  // Q rides with the first group
  }

  const int rb = warp % C::kRB;    // head rows rb*16 .. +16
  const int half = warp / C::kRB;  // QK: tokens half*16 ..; PV: dims half*256 ..
  const int g = lane / 4, q4 = lane % 4;
  const float scale2 = p.scale * kLog2e;
  // Context of this thread's two rows (g, g + 8): the block's, or per query.
  int64_t row_ctx[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int br = rb * 16 + g + r * 8;
    row_ctx[r] = !grouped ? ctx : (br / H < q_count ? MlaContext(p, q_first + br / H) : 0);
  }

  float o[32][4];
#pragma unroll
  for (int j = 0; j < 32; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // rows g, g+8 (log2 units)
  float l_run[2] = {0.f, 0.f};              // this thread's share of the row sums

  for (int64_t ti = t0; ti < t1; ++ti) {
    CpAsyncWait<kStages - 2>();
    __syncthreads();  // tile ti (and Q) landed for all; the stage refilled next was consumed
    if (ti + kStages - 1 < t1) load_tile(ti + kStages - 1, static_cast<int>((ti - t0 + kStages - 1) % kStages));
    CpAsyncCommit();
    const uint16_t* kt = ks + ((ti - t0) % kStages) * kTile * kStride;

    // S = Q K^T for rows rb*16.., tokens half*16.. (2 n-tiles). Four
    // accumulator chains (even / odd k-steps) and fragments loaded one step
    // ahead keep the tensor cores fed despite mma and ldmatrix latency.
    float s2[2][2][4] = {};
    const uint16_t* qa = qs + (rb * 16 + (lane % 16)) * kStride + (lane / 16) * 8;
    const int mi = lane / 8, mr = lane % 8;
    const uint16_t* kb = kt + (half * 16 + (mi / 2) * 8 + mr) * kStride + (mi % 2) * 8;
    {
      uint32_t a[2][4], b[2][4];
      LdMatrixX4(a[0], qa);
      LdMatrixX4(b[0], kb);
#pragma unroll
      for (int ks = 0; ks < kWidth / 16; ++ks) {
        const int cur = ks & 1;
        if (ks + 1 < kWidth / 16) {
          LdMatrixX4(a[cur ^ 1], qa + (ks + 1) * 16);
          LdMatrixX4(b[cur ^ 1], kb + (ks + 1) * 16);
        }
        Mma16816(s2[cur][0], a[cur], b[cur][0], b[cur][1]);
        Mma16816(s2[cur][1], a[cur], b[cur][2], b[cur][3]);
      }
    }
    float s[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = s2[0][nt][e] + s2[1][nt][e];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = half * 16 + nt * 8 + q4 * 2 + (e % 2);
        const int row = rb * 16 + g + (e / 2) * 8;
        const bool valid = ti * kTile + col < row_ctx[e / 2];
        ss[row * kSStride + col] = valid ? s[nt][e] * scale2 : -INFINITY;
      }
    }
    __syncthreads();

    // Online softmax over the tile's 32 scores of rows g and g+8, in the
    // A-fragment layout: k-step kk holds cols kk*16 + q4*2 + {0,1} and +8.
    float pv[2][8];  // [row][kk*4 + j]
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float* srow = ss + (rb * 16 + g + r * 8) * kSStride;
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const float2 v = *reinterpret_cast<const float2*>(srow + kk * 16 + hh * 8 + q4 * 2);
          pv[r][kk * 4 + hh * 2] = v.x;
          pv[r][kk * 4 + hh * 2 + 1] = v.y;
        }
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = pv[r][0];
#pragma unroll
      for (int j = 1; j < 8; ++j) mx = fmaxf(mx, pv[r][j]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[r], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[r] = exp2f(m_run[r] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        pv[r][j] = exp2f(pv[r][j] - m_use);
        sum += pv[r][j];
      }
      l_run[r] = l_run[r] * alpha[r] + sum;
      m_run[r] = m_new;
    }
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      o[j][0] *= alpha[0];
      o[j][1] *= alpha[0];
      o[j][2] *= alpha[1];
      o[j][3] *= alpha[1];
    }
    // O += P V over dims half*256 .. +256 (32 n-tiles), tokens in 2 k-steps;
    // V fragments (ldmatrix.trans of the tile's c part) loaded one step ahead.
    uint32_t pa[2][4];
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      pa[kk][0] = PackBf16(pv[0][kk * 4 + 0], pv[0][kk * 4 + 1]);
      pa[kk][1] = PackBf16(pv[1][kk * 4 + 0], pv[1][kk * 4 + 1]);
      pa[kk][2] = PackBf16(pv[0][kk * 4 + 2], pv[0][kk * 4 + 3]);
      pa[kk][3] = PackBf16(pv[1][kk * 4 + 2], pv[1][kk * 4 + 3]);
    }
    const uint16_t* vb = kt + ((mi % 2) * 8 + mr) * kStride + half * 256 + (mi / 2) * 8;
    {
      uint32_t b[2][4];
      LdMatrixX4Trans(b[0], vb);
#pragma unroll
      for (int step = 0; step < 32; ++step) {  // step = kk * 16 + j / 2
        const int cur = step & 1, kk = step / 16, j = (step % 16) * 2;
        if (step + 1 < 32) {
          const int nk = (step + 1) / 16, nj = ((step + 1) % 16) * 2;
          LdMatrixX4Trans(b[cur ^ 1], vb + nk * 16 * kStride + nj * 8);
        }
        Mma16816(o[j], pa[kk], b[cur][0], b[cur][1]);
        Mma16816(o[j + 1], pa[kk], b[cur][2], b[cur][3]);
      }
    }
  }
  CpAsyncWait<0>();

  // Row sums over the 4 lanes of a row; write normalized O and the LSE.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int64_t row = row_of(rb * 16 + g + r * 8);
    if (row < 0) continue;
    const RowOutput out = MlaFinishRow(p, grid.splits, split, row, l, m_run[r], half == 0 && q4 == 0);
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int col = half * 256 + j * 8 + q4 * 2;
      *reinterpret_cast<float2*>(out.dst + col) = make_float2(o[j][r * 2] * out.inv, o[j][r * 2 + 1] * out.inv);
    }
  }
}

// Hopper kernel (sm_90a, wgmma) for blocks of 64 heads of one query: 2
// warpgroups, 64-token tiles, 2 stages. Q, each tile and P live in shared
// memory as 128-byte-swizzled column blocks of 64 dims ([rows x 128 bytes]
// each), which serve as K-major wgmma operands for Q K^T and, for P V, the
// tile's c part as the MN-major B operand. Warpgroup w scores tokens
// 32w..32w+31 of the tile for all 64 heads; the two halves' row maxes meet in
// shared memory, each writes its half of P, then warpgroup w accumulates
// latent dims 256w..256w+255 of O over all 64 tokens.
struct MlaWg {
  static constexpr int kTile = 64;
  static constexpr int kThreads = 256;
  static constexpr int kColBlocks = kWidth / 64;                  // 9
  static constexpr uint32_t kColBlockBytes = 64 * 128;            // 64 rows (heads or tokens) x 64 dims
  static constexpr uint32_t kTileBytes = kColBlocks * kColBlockBytes;  // Q or one tile: 72 KB
  static constexpr size_t kSmemBytes = 3 * size_t{kTileBytes} + kColBlockBytes + 2 * 64 * sizeof(float);
};

// Byte offset of 16-byte chunk `chunk` (of the 72 in a 576-dim row) of row
// `row` in the column-block layout.
__device__ __forceinline__ uint32_t MlaWgChunkOffset(int row, int chunk) {
  return (chunk / 8) * MlaWg::kColBlockBytes + Sw128Offset(row, chunk % 8);
}

__global__ void __launch_bounds__(MlaWg::kThreads, 1) MlaAttentionWgmmaKernel(MlaAttentionParams p, Grid grid) {
#if DMOE_HAS_WGMMA
  constexpr int kT = MlaWg::kTile;
  extern __shared__ __align__(1024) unsigned char wg_smem[];
  unsigned char* qs = wg_smem;
  unsigned char* ks = wg_smem + MlaWg::kTileBytes;  // 2 stages
  unsigned char* ps = ks + 2 * MlaWg::kTileBytes;   // P: 64 heads x 64 tokens, bf16
  float* red = reinterpret_cast<float*>(ps + MlaWg::kColBlockBytes);  // [2 warpgroups][64 rows]

  const int64_t block = blockIdx.x;
  const int hb = static_cast<int>(block % grid.head_blocks);
  const int split = static_cast<int>((block / grid.head_blocks) % grid.splits);
  const int64_t q = block / (int64_t{grid.head_blocks} * grid.splits);
  const int H = static_cast<int>(p.num_heads);
  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int row0 = ((tid % 128) / 32) * 16 + (tid % 32) / 4;  // this thread's rows row0, row0 + 8
  const int q4 = tid % 4;
  auto row_of = [&](int r) -> int64_t {
    const int h = hb * 64 + r;
    return h < H ? q * H + h : -1;
  };
  const int64_t ctx = MlaContext(p, q);
  const TileRange range = SplitTiles(ctx, kT, grid.splits, split);
  const int64_t t0 = range.t0, t1 = range.t1;
  const int32_t* bt = p.block_tables + int64_t{p.query_seq[q]} * p.max_pages_per_seq;

  LoadQuery(p, 64, tid, MlaWg::kThreads, row_of, [&](int row, int chunk) { return qs + MlaWgChunkOffset(row, chunk); });
  auto load_tile = [&](int64_t ti, int stage) {
    unsigned char* dst = ks + stage * MlaWg::kTileBytes;
    LoadLatentTile<kT, MlaWg::kThreads>(p, bt, ctx, ti, tid,
                                        [&](int row, int chunk) { return dst + MlaWgChunkOffset(row, chunk); });
  };
  if (t0 < t1) load_tile(t0, 0);
  CpAsyncCommit();  // Q rides with the first tile

  const float scale2 = p.scale * kLog2e;
  const uint64_t q_desc = Sw128Desc(qs);
  const uint64_t p_desc = Sw128Desc(ps);
  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // log2 units
  float l_run[2] = {0.f, 0.f};              // this thread's share of the row sums

  for (int64_t ti = t0; ti < t1; ++ti) {
    CpAsyncWait<0>();
    FenceProxyAsync();
    __syncthreads();  // tile ti (and Q) landed for all; both warpgroups' P V of ti - 1 done
    if (ti + 1 < t1) load_tile(ti + 1, static_cast<int>((ti - t0 + 1) & 1));
    CpAsyncCommit();
    unsigned char* kt = ks + ((ti - t0) & 1) * MlaWg::kTileBytes;

    // S = Q K^T over this warpgroup's 32 tokens: 36 k-steps of 16 dims.
    float s[16];
    const uint64_t k_desc = Sw128Desc(kt + wg * 32 * 128);
    WgmmaFence();
#pragma unroll
    for (int kstep = 0; kstep < kWidth / 16; ++kstep) {
      const uint32_t off = (kstep / 4) * MlaWg::kColBlockBytes + (kstep % 4) * 32;
      WgmmaM64N32K16(s, q_desc + (off >> 4), k_desc + (off >> 4), kstep > 0);
    }
    WgmmaCommit();
    WgmmaWait<0>();
    FenceAccumulators(s);

    // s[4j + e]: row row0 + 8 (e / 2), token 32 wg + 8j + 2 q4 + e % 2.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int64_t tok = ti * kT + wg * 32 + (i / 4) * 8 + q4 * 2 + (i % 2);
      s[i] = tok < ctx ? s[i] * scale2 : -INFINITY;
      mx[(i / 2) % 2] = fmaxf(mx[(i / 2) % 2], s[i]);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      if (q4 == 0) red[wg * 64 + row0 + 8 * r] = mx[r];
    }
    __syncthreads();
    float alpha[2], m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m_run[r], fmaxf(red[row0 + 8 * r], red[64 + row0 + 8 * r]));
      m_use[r] = m_new == -INFINITY ? 0.f : m_new;
      alpha[r] = exp2f(m_run[r] - m_use[r]);
      m_run[r] = m_new;
      l_run[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float p0 = exp2f(s[4 * j + 2 * r] - m_use[r]);
        const float p1 = exp2f(s[4 * j + 2 * r + 1] - m_use[r]);
        l_run[r] += p0 + p1;
        const int col = wg * 32 + j * 8 + q4 * 2;
        *reinterpret_cast<uint32_t*>(ps + Sw128Offset(row0 + 8 * r, col / 8) + (col % 8) * 2) = PackBf16(p0, p1);
      }
    }
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] *= alpha[(i / 2) % 2];
    FenceProxyAsync();
    __syncthreads();  // P complete; the row maxes read

    // O[:, 256 wg ..] += P V: 4 k-steps of 16 tokens; V's dims 256 wg .. are
    // column blocks 4 wg .. 4 wg + 3 of the tile.
    const uint64_t v_desc = Sw128DescMn(kt + wg * 4 * MlaWg::kColBlockBytes, MlaWg::kColBlockBytes);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < kT / 16; ++kk) {
      WgmmaM64N256K16<1>(o, p_desc + ((kk * 32) >> 4), v_desc + ((kk * 16 * 128) >> 4), 1);
    }
    WgmmaCommit();
    WgmmaWait<0>();
    FenceAccumulators(o);
  }
  CpAsyncWait<0>();

  // Row sums: over the 4 lanes of a row, then over the two warpgroups'
  // tokens (the row maxes' slots are free: their last reads preceded the
  // last barrier).
  float l_tot[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (q4 == 0) red[wg * 64 + row0 + 8 * r] = l;
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; ++r) l_tot[r] = red[row0 + 8 * r] + red[64 + row0 + 8 * r];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row_of(row0 + 8 * r);
    if (row < 0) continue;
    const RowOutput out = MlaFinishRow(p, grid.splits, split, row, l_tot[r], m_run[r], wg == 0 && q4 == 0);
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int col = wg * 256 + j * 8 + q4 * 2;
      *reinterpret_cast<float2*>(out.dst + col) =
          make_float2(o[4 * j + 2 * r] * out.inv, o[4 * j + 2 * r + 1] * out.inv);
    }
  }
#else
  __trap();  // launched only where WgmmaAvailable()
#endif
}

// One block (128 threads, 4 dims each) per (query, head): merges the splits'
// normalized outputs by their LSE.
__global__ void MlaCombineKernel(MlaAttentionParams p, int splits) {
  const int64_t row = blockIdx.x;
  const int64_t rows_total = p.num_queries * p.num_heads;
  const float* ws = static_cast<const float*>(p.workspace);
  const float* ws_lse = ws + int64_t{splits} * rows_total * kRank;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, ws_lse[s * rows_total + row]);
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float wsum = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float w = expf(ws_lse[s * rows_total + row] - mx);
      if (w == 0.f) continue;  // an empty split (lse -inf) wrote zeros
      wsum += w;
      const float4 v = reinterpret_cast<const float4*>(ws + (s * rows_total + row) * kRank)[threadIdx.x];
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
    }
  }
  const float inv = wsum > 0.f ? 1.0f / wsum : 0.f;
  reinterpret_cast<float4*>(p.out + row * kRank)[threadIdx.x] =
      make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
  if (p.lse != nullptr && threadIdx.x == 0) p.lse[row] = wsum > 0.f ? mx + logf(wsum) : -INFINITY;
}

absl::Status CheckParams(const MlaAttentionParams& p) {
  DMOE_CUDA_CHECK_ARG(p.shape.kv_lora_rank == kRank && p.shape.rope_dim == kRope,
                      "MlaAttention: kv_lora_rank 512 and rope_dim 64 only");
  DMOE_CUDA_CHECK_ARG(p.shape.elem_type == OutType::kBF16, "MlaAttention: a bf16 latent cache only");
  DMOE_CUDA_CHECK_ARG(p.shape.page_size > 0 && p.shape.page_size % kTile == 0, "MlaAttention: page_size % 32 == 0");
  DMOE_CUDA_CHECK_ARG(p.num_heads > 0, "MlaAttention: num_heads > 0");
  DMOE_CUDA_CHECK_ARG(p.head_block == 0 || p.head_block == 16 || p.head_block == 64,
                      "MlaAttention: head_block 0, 16 or 64");
  DMOE_CUDA_CHECK_ARG(p.max_pages_per_seq > 0, "MlaAttention: max_pages_per_seq > 0");
  DMOE_CUDA_CHECK_ARG(p.query_blocks == nullptr || (p.num_heads <= 32 && p.head_block != 16 && p.num_query_blocks > 0),
                      "MlaAttention: query_blocks need H <= 32, 64-row blocks and num_query_blocks > 0");
  DMOE_CUDA_CHECK_ARG(p.max_context_len >= 0 && p.max_context_len <= p.max_pages_per_seq * p.shape.page_size,
                      "MlaAttention: max_context_len within max_pages_per_seq pages");
  return absl::OkStatus();
}

// Reference: one block of 256 threads per (query, head); 256-token chunks of
// float32 dot products, online softmax, each thread owning 2 latent dims.
__global__ void MlaReferenceKernel(MlaAttentionParams p) {
  constexpr int kChunk = 256;
  __shared__ float q[kWidth];
  __shared__ float sc[kChunk];
  __shared__ float red[32];
  const int64_t row = blockIdx.x;  // qi * H + h
  const int64_t qi = row / p.num_heads;
  const int tid = threadIdx.x;
  const uint16_t* q_lat = static_cast<const uint16_t*>(p.q_lat);
  const uint16_t* q_pe = static_cast<const uint16_t*>(p.q_pe);
  const uint16_t* cache = static_cast<const uint16_t*>(p.cache);
  for (int i = tid; i < kWidth; i += blockDim.x) {
    q[i] = Bf16BitsToFloat(i < kRank ? q_lat[row * kRank + i] : q_pe[row * kRope + i - kRank]);
  }
  const int64_t ps = p.shape.page_size;
  const int64_t ctx = MlaContext(p, qi);
  const int32_t* bt = p.block_tables + int64_t{p.query_seq[qi]} * p.max_pages_per_seq;
  float m = -INFINITY, l = 0.f, acc0 = 0.f, acc1 = 0.f;
  __syncthreads();
  for (int64_t c0 = 0; c0 < ctx; c0 += kChunk) {
    const int64_t pos = c0 + tid;
    float s = -INFINITY;
    if (pos < ctx) {
      const uint16_t* e = cache + (int64_t{bt[pos / ps]} * ps + pos % ps) * kWidth;
      float d = 0.f;
      for (int i = 0; i < kWidth; ++i) d += q[i] * Bf16BitsToFloat(e[i]);
      s = d * p.scale;
    }
    sc[tid] = s;
    float mx = s;
    for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (tid % 32 == 0) red[tid / 32] = mx;
    __syncthreads();
    mx = red[0];
    for (int w = 1; w < kRefThreads / 32; ++w) mx = fmaxf(mx, red[w]);
    const float m_new = fmaxf(m, mx);
    const float alpha = expf(m - m_new);
    acc0 *= alpha;
    acc1 *= alpha;
    l *= alpha;
    const int64_t n = ctx - c0 < kChunk ? ctx - c0 : kChunk;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pj = c0 + j;
      const float pr = expf(sc[j] - m_new);
      const uint16_t* e = cache + (int64_t{bt[pj / ps]} * ps + pj % ps) * kWidth;
      l += pr;
      acc0 += pr * Bf16BitsToFloat(e[tid]);
      acc1 += pr * Bf16BitsToFloat(e[tid + 256]);
    }
    m = m_new;
    __syncthreads();
  }
  const float inv = l > 0.f ? 1.0f / l : 0.f;
  p.out[row * kRank + tid] = acc0 * inv;
  p.out[row * kRank + tid + 256] = acc1 * inv;
  if (p.lse != nullptr && tid == 0) p.lse[row] = l > 0.f ? m + logf(l) : -INFINITY;
}

}  // namespace

int MlaAttentionNumSplits(int64_t num_queries, int64_t num_heads, int64_t max_context_len, int requested,
                          int head_block) {
  const int64_t tiles = CeilDiv(max_context_len > 0 ? max_context_len : 1, kTile);
  int64_t splits = requested;
  if (splits <= 0) {
    const bool small = head_block == 16;
    const int64_t blocks = num_queries * CeilDiv(num_heads, small ? 16 : 64);
    const int64_t sms = int64_t{NumSms()} * (small ? MlaCfg<16>::kBlocksPerSm : MlaCfg<64>::kBlocksPerSm);
    splits = blocks >= sms ? 1 : sms / (blocks > 0 ? blocks : 1);
    // At least one tile per split: with few blocks (small batches) the
    // latency of a split's tiles in a row is what the step waits for.
    const int64_t by_work = tiles;
    if (splits > by_work) splits = by_work;
  }
  if (splits > tiles) splits = tiles;
  if (splits < 1) splits = 1;
  if (splits > 1024) splits = 1024;
  return static_cast<int>(splits);
}

size_t MlaAttentionWorkspaceBytes(int64_t num_queries, int64_t num_heads, int64_t kv_lora_rank, int num_splits) {
  if (num_splits <= 1) return 0;
  return static_cast<size_t>(num_splits) * num_queries * num_heads * (kv_lora_rank + 1) * sizeof(float);
}

std::vector<int32_t> MlaQueryBlocks(absl::Span<const int32_t> query_seq, int64_t num_heads) {
  std::vector<int32_t> blocks;
  if (num_heads <= 0 || num_heads > 32) return blocks;
  const int64_t per = 64 / num_heads;
  for (size_t i = 0; i < query_seq.size(); ++i) {
    if (blocks.empty() || query_seq[i] != query_seq[i - 1] || static_cast<int64_t>(i) - blocks.back() >= per) {
      blocks.push_back(static_cast<int32_t>(i));
    }
  }
  blocks.push_back(static_cast<int32_t>(query_seq.size()));
  return blocks;
}

namespace {

// Sets a kernel's dynamic shared-memory limit once per process.
template <typename Kernel>
absl::Status AllowSmem(Kernel kernel, size_t bytes) {
  return CudaStatus(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
                    "cudaFuncSetAttribute(MlaAttention kernel)");
}

template <typename Kernel>
absl::Status LaunchMla(Kernel kernel, const absl::Status& smem_status, int64_t blocks, int threads, size_t smem,
                       const MlaAttentionParams& p, Grid grid, Stream stream) {
  if (!smem_status.ok()) return smem_status;
  DMOE_CUDA_CHECK_ARG(blocks < (int64_t{1} << 31), "MlaAttention: grid too large");
  kernel<<<static_cast<unsigned>(blocks), threads, smem, AsStream(stream)>>>(p, grid);
  return LaunchStatus("MlaAttentionKernel");
}

absl::Status LaunchMlaKernel(const MlaAttentionParams& p, bool wgmma, bool small, int64_t blocks, Grid grid,
                             Stream stream) {
  if (wgmma) {
    static const absl::Status smem = AllowSmem(MlaAttentionWgmmaKernel, MlaWg::kSmemBytes);
    return LaunchMla(MlaAttentionWgmmaKernel, smem, blocks, MlaWg::kThreads, MlaWg::kSmemBytes, p, grid, stream);
  }
  if (small) {
    static const absl::Status smem = AllowSmem(MlaAttentionKernel<16>, MlaCfg<16>::kSmemBytes);
    return LaunchMla(MlaAttentionKernel<16>, smem, blocks, MlaCfg<16>::kThreads, MlaCfg<16>::kSmemBytes, p, grid,
                     stream);
  }
  static const absl::Status smem = AllowSmem(MlaAttentionKernel<64>, MlaCfg<64>::kSmemBytes);
  return LaunchMla(MlaAttentionKernel<64>, smem, blocks, MlaCfg<64>::kThreads, MlaCfg<64>::kSmemBytes, p, grid, stream);
}

}  // namespace

bool MlaAttentionUsesWgmma(const MlaAttentionParams& p) {
  return p.allow_wgmma && p.head_block != 16 && p.query_blocks == nullptr && p.shape.page_size % MlaWg::kTile == 0 &&
         WgmmaAvailable();
}

int MlaAttentionSplits(const MlaAttentionParams& p) {
  const int64_t query_blocks = p.query_blocks != nullptr ? p.num_query_blocks : p.num_queries;
  const int splits = MlaAttentionNumSplits(query_blocks, p.num_heads, p.max_context_len, p.num_splits, p.head_block);
  if (!MlaAttentionUsesWgmma(p)) return splits;
  // The wgmma kernel's tiles are 64 tokens: no more splits than those (less
  // workspace than MlaAttentionNumSplits sized, never more).
  return static_cast<int>(std::min<int64_t>(splits, CeilDiv(std::max<int64_t>(p.max_context_len, 1), MlaWg::kTile)));
}

absl::Status MlaAttention(const MlaAttentionParams& p, Stream stream) {
  if (absl::Status st = CheckParams(p); !st.ok()) return st;
  if (p.num_queries <= 0) return absl::OkStatus();
  // Blocks of queries: one query each, or query_blocks' runs.
  const int64_t query_blocks = p.query_blocks != nullptr ? p.num_query_blocks : p.num_queries;
  const bool small = p.head_block == 16;
  const bool wgmma = MlaAttentionUsesWgmma(p);
  const int splits = MlaAttentionSplits(p);
  const size_t need = MlaAttentionWorkspaceBytes(p.num_queries, p.num_heads, kRank, splits);
  DMOE_CUDA_CHECK_ARG(p.workspace_bytes >= need && (need == 0 || p.workspace != nullptr),
                      absl::StrCat("MlaAttention: workspace needs ", need, " bytes for ", splits, " splits"));
  const int rows = small ? 16 : 64;
  const Grid grid{p.query_blocks != nullptr ? 1 : static_cast<int>(CeilDiv(p.num_heads, rows)), splits};
  const int64_t blocks = query_blocks * grid.head_blocks * splits;
  if (absl::Status st = LaunchMlaKernel(p, wgmma, small, blocks, grid, stream); !st.ok()) return st;
  if (splits > 1) {
    MlaCombineKernel<<<static_cast<unsigned>(p.num_queries * p.num_heads), kRank / 4, 0, AsStream(stream)>>>(p, splits);
    return LaunchStatus("MlaCombineKernel");
  }
  return absl::OkStatus();
}

absl::Status MlaAttentionReference(const MlaAttentionParams& p, Stream stream) {
  if (absl::Status st = CheckParams(p); !st.ok()) return st;
  if (p.num_queries <= 0) return absl::OkStatus();
  MlaReferenceKernel<<<static_cast<unsigned>(p.num_queries * p.num_heads), kRefThreads, 0, AsStream(stream)>>>(p);
  return LaunchStatus("MlaReferenceKernel");
}

}  // namespace dmoe::cuda
