// dmoe's own GEMM kernel for y = x * w^T with float32 activations and F32 or
// BF16 weights, plus the dispatch between it and OpenBLAS. docs/cpu_gemm.md
// has the design and the measurements.
//
// Shape of the kernel. w is [n, k] row-major, so each output y[t][i] is a dot
// product of weight row i with activation row t. A tile of R weight rows x T
// tokens keeps R*T vector accumulators in registers; one step over W = 16
// (AVX-512) or 8 (AVX2, scalar) columns loads R weight vectors (BF16 is
// widened to float32 with a zero-extend and a 16-bit shift: exact), T
// activation vectors, and does R*T FMAs. After the last column each
// accumulator is reduced horizontally in a fixed tree.
//
// The activations are first packed per token group as [step][token][W]
// floats, zero-padded to a multiple of W columns: a tile then reads one
// sequential stream of x instead of T rows a power-of-two stride apart (hidden
// sizes are multiples of 1024, and T rows 4 KiB apart share one L1 set), and
// the column tail needs no masking on the x side.
//
// Batch invariance. Lane l of the accumulator of (i, t) sees the products
// w[i][j] * x[t][j] for j = l, l + W, l + 2W, ... in increasing j, each by
// one FMA (the zero padding of the last step adds exact zeros, as it would
// for any m); the final reduction tree is the same for every tile. None of
// that depends on R, T, on which tile or thread the element falls in, or on
// m, so the bits of y[t][i] depend only on row t of x, row i of w and the ISA
// variant (fixed per process).
//
// Memory traffic. With one token group (m <= T = 8 with AVX-512) the tiles
// stream the weights once. With more, row tiles are grouped into panels of
// ~256 KiB of weights and every token group passes over a panel while it
// sits in L2, so the weights still come from DRAM once. Threads split the
// rows (dynamically, through ParallelFor's chunks).
#include "core/cpu/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "core/cpu/parallel.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DMOE_GEMM_X86 1
#define DMOE_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define DMOE_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define DMOE_GEMM_X86 0
#endif

namespace dmoe::cpu {
namespace {

// One tile: y[t * ldy + r] = dot(w row r, x row t) for r < R, t < T.
struct TileArgs {
  const void* w;    // weight row 0 of the tile; rows are k elements apart
  int64_t k;
  const float* xp;  // the packed token group ([ceil(k / W)][T][W], aligned)
  float* y;
  int64_t ldy;
};
using TileFn = void (*)(const TileArgs& a);

constexpr int kMaxR = 8;
constexpr int kMaxT = 8;

// The tiles of one ISA variant and one weight dtype, and the tile shapes to
// use (any entry may be used for the edges: results do not depend on it).
// m <= tmax: one token group of T = m tokens, R = rows_for[m]; above, groups
// of <= tmax tokens with R = rows_for[tmax].
struct KernelSet {
  int lanes = 8;  // W
  int tmax = 1;
  std::array<int, kMaxT + 1> rows_for{};
  std::array<TileFn, kMaxR * kMaxT> tile{};
  TileFn at(int r, int t) const { return tile[(r - 1) * kMaxT + (t - 1)]; }
};

template <template <bool, int, int> class Tile, bool kBf16, int... Is>
constexpr std::array<TileFn, kMaxR * kMaxT> MakeTable(std::integer_sequence<int, Is...>) {
  return {{Tile<kBf16, Is / kMaxT + 1, Is % kMaxT + 1>::Get()...}};
}

template <template <bool, int, int> class Tile, bool kBf16>
constexpr std::array<TileFn, kMaxR * kMaxT> MakeTable() {
  return MakeTable<Tile, kBf16>(std::make_integer_sequence<int, kMaxR * kMaxT>());
}

// ---------------------------------------------------------------------------
// Portable scalar variant: W = 8 partial sums per output, reduced in a fixed
// tree. No FMA (the baseline ISA has none), so mul then add.

template <bool kBf16>
inline float LoadScalar(const void* w, int64_t i) {
  if constexpr (kBf16) {
    return Bf16ToFloat(static_cast<const uint16_t*>(w)[i]);
  } else {
    return static_cast<const float*>(w)[i];
  }
}

inline float Reduce8(const float* a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

template <bool kBf16, int R, int T>
void TileScalarImpl(const TileArgs& a) {
  float acc[R][T][8] = {};
  for (int64_t j = 0; j < a.k; j += 8) {
    const int lanes = static_cast<int>(std::min<int64_t>(8, a.k - j));
    const float* xs = a.xp + (j / 8) * T * 8;
    for (int r = 0; r < R; ++r) {
      float wr[8] = {};
      for (int l = 0; l < lanes; ++l) wr[l] = LoadScalar<kBf16>(a.w, r * a.k + j + l);
      for (int t = 0; t < T; ++t) {
        for (int l = 0; l < 8; ++l) {
          const float p = wr[l] * xs[t * 8 + l];
          acc[r][t][l] += p;
        }
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int r = 0; r < R; ++r) a.y[t * a.ldy + r] = Reduce8(acc[r][t]);
  }
}

template <bool kBf16, int R, int T>
struct TileScalar {
  static constexpr TileFn Get() {
    if constexpr (R <= 4 && T <= 2) {
      return &TileScalarImpl<kBf16, R, T>;
    } else {
      return nullptr;
    }
  }
};

#if DMOE_GEMM_X86

// ---------------------------------------------------------------------------
// AVX-512 variant (F + BW + VL): W = 16 lanes, 32 vector registers.

// GCC 12's AVX-512 intrinsics pass _mm512_undefined_*() as the unused merge
// source, which trips -W(maybe-)uninitialized once inlined; it is noise.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

DMOE_TARGET_AVX512 inline __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
DMOE_TARGET_AVX512 inline __m512 Load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
DMOE_TARGET_AVX512 inline __m512 Load16(const float* p, __mmask16 mask) {
  return _mm512_maskz_loadu_ps(mask, p);
}
DMOE_TARGET_AVX512 inline __m512 Load16(const uint16_t* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Fixed tree: lanes 0-7 + lanes 8-15, then as the AVX2 Reduce8 below.
DMOE_TARGET_AVX512 inline float Reduce16(__m512 v) {
  const __m256 lo = _mm512_castps512_ps256(v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 s8 = _mm256_add_ps(lo, hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}

// Makes the compiler load `v` into a register once: left alone, GCC folds
// the activation load into each of the R FMAs that use it, and R loads per
// FMA-ish saturate the load ports.
DMOE_TARGET_AVX512 inline __m512 InRegister(__m512 v) {
  __asm__("" : "+v"(v));
  return v;
}

// One step: acc[r][t] += w_r * x_t for the 16 columns at w + j, xs.
template <int R, int T, typename WT, typename WLoad>
DMOE_TARGET_AVX512 inline void Step16(__m512 (&acc)[R][T], const WT* w, int64_t k, int64_t j,
                                      const float* xs, WLoad wload) {
  // Keep the smaller operand set in registers: R*T + min(R, T) + 1 <= 32.
  // (Either way each accumulator gets the same FMA: the bits agree.)
  if constexpr (T < R) {
    __m512 xt[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) xt[t] = InRegister(_mm512_load_ps(xs + t * 16));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 wr = wload(w + r * k + j);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wr, xt[t], acc[r][t]);
    }
  } else {
    __m512 wr[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wr[r] = wload(w + r * k + j);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m512 xt = InRegister(_mm512_load_ps(xs + t * 16));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wr[r], xt, acc[r][t]);
    }
  }
}

template <typename WT>
struct FullLoad16 {
  DMOE_TARGET_AVX512 __m512 operator()(const WT* p) const { return Load16(p); }
};
template <typename WT>
struct MaskedLoad16 {
  __mmask16 mask;
  DMOE_TARGET_AVX512 __m512 operator()(const WT* p) const { return Load16(p, mask); }
};

template <bool kBf16, int R, int T>
DMOE_TARGET_AVX512 void TileAvx512Impl(const TileArgs& a) {
  using WT = std::conditional_t<kBf16, uint16_t, float>;
  const WT* w = static_cast<const WT*>(a.w);
  const int64_t k = a.k;
  __m512 acc[R][T];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  const float* xs = a.xp;
  int64_t j = 0;
  for (; j + 16 <= k; j += 16, xs += T * 16) {
    Step16<R, T>(acc, w, k, j, xs, FullLoad16<WT>{});
  }
  if (j < k) {
    const auto mask = static_cast<__mmask16>((1u << (k - j)) - 1u);
    Step16<R, T>(acc, w, k, j, xs, MaskedLoad16<WT>{mask});
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a.y[t * a.ldy + r] = Reduce16(acc[r][t]);
  }
}

template <bool kBf16, int R, int T>
struct TileAvx512 {
  static constexpr TileFn Get() {
    if constexpr (R * T <= 24) {
      return &TileAvx512Impl<kBf16, R, T>;
    } else {
      return nullptr;
    }
  }
};

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// ---------------------------------------------------------------------------
// AVX2 + FMA variant: W = 8 lanes, 16 vector registers.

DMOE_TARGET_AVX2 inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
DMOE_TARGET_AVX2 inline __m256 Load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

DMOE_TARGET_AVX2 inline float Reduce8(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}

DMOE_TARGET_AVX2 inline __m256 InRegister(__m256 v) {
  __asm__("" : "+x"(v));
  return v;
}

// One step over 8 columns; w rows are `ldw` elements apart from `w`.
// Activations first (T <= 3 here): R*T + T + 1 <= 16 registers.
template <int R, int T, typename WT>
DMOE_TARGET_AVX2 inline void Step8(__m256 (&acc)[R][T], const WT* w, int64_t ldw,
                                   const float* xs) {
  __m256 xt[T];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) xt[t] = InRegister(_mm256_load_ps(xs + t * 8));
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m256 wr = Load8(w + r * ldw);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(wr, xt[t], acc[r][t]);
  }
}

template <bool kBf16, int R, int T>
DMOE_TARGET_AVX2 void TileAvx2Impl(const TileArgs& a) {
  using WT = std::conditional_t<kBf16, uint16_t, float>;
  const WT* w = static_cast<const WT*>(a.w);
  const int64_t k = a.k;
  __m256 acc[R][T];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  }
  const float* xs = a.xp;
  int64_t j = 0;
  for (; j + 8 <= k; j += 8, xs += T * 8) {
    Step8<R, T>(acc, w + j, k, xs);
  }
  if (j < k) {
    // Weight tail through a zero-padded copy (AVX2 has no 16-bit masked load).
    alignas(32) WT wbuf[R][8] = {};
    for (int r = 0; r < R; ++r) std::memcpy(wbuf[r], w + r * k + j, (k - j) * sizeof(WT));
    Step8<R, T>(acc, &wbuf[0][0], 8, xs);
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a.y[t * a.ldy + r] = Reduce8(acc[r][t]);
  }
}

template <bool kBf16, int R, int T>
struct TileAvx2 {
  static constexpr TileFn Get() {
    if constexpr (R * T <= 12 && T <= 3) {
      return &TileAvx2Impl<kBf16, R, T>;
    } else {
      return nullptr;
    }
  }
};

#endif  // DMOE_GEMM_X86

// ---------------------------------------------------------------------------
// Kernel sets and the driver.

template <template <bool, int, int> class Tile, bool kBf16>
KernelSet MakeSet(int lanes, std::initializer_list<int> rows_for) {
  KernelSet ks;
  ks.lanes = lanes;
  ks.tmax = static_cast<int>(rows_for.size());
  std::copy(rows_for.begin(), rows_for.end(), ks.rows_for.begin() + 1);
  ks.tile = MakeTable<Tile, kBf16>();
  return ks;
}

// Tile shapes: R x T accumulators plus min(R, T) operand vectors must fit the
// register file (32 zmm / 16 ymm; the inner loops have no spills), and m <= 8
// (AVX-512) is a single token group so the weights stream in one pass.
const KernelSet& Kernels(GemmIsa isa, bool bf16) {
  static const KernelSet scalar_f32 = MakeSet<TileScalar, false>(8, {4, 2});
  static const KernelSet scalar_bf16 = MakeSet<TileScalar, true>(8, {4, 2});
#if DMOE_GEMM_X86
  static const KernelSet avx512_f32 = MakeSet<TileAvx512, false>(16, {8, 8, 8, 6, 4, 4, 3, 3});
  static const KernelSet avx512_bf16 = MakeSet<TileAvx512, true>(16, {8, 8, 8, 6, 4, 4, 3, 3});
  static const KernelSet avx2_f32 = MakeSet<TileAvx2, false>(8, {8, 6, 4});
  static const KernelSet avx2_bf16 = MakeSet<TileAvx2, true>(8, {8, 6, 4});
  if (isa == GemmIsa::kAvx512) return bf16 ? avx512_bf16 : avx512_f32;
  if (isa == GemmIsa::kAvx2) return bf16 ? avx2_bf16 : avx2_f32;
#endif
  return bf16 ? scalar_bf16 : scalar_f32;
}

// Weight bytes of a panel: a panel is revisited by every token group, so it
// should stay in L2 (1 MiB per core on Zen 4, >= 256 KiB on anything recent)
// next to the packed activations of a group.
constexpr int64_t kPanelBytes = 256 << 10;

struct Problem {
  int64_t m;
  const float* xp;  // packed activations, see PackActivations
  int64_t steps;    // ceil(k / W)
  int lanes;        // W
  const char* w;
  int64_t wsize, n, k;
  float* y;
  int64_t ldy;
};

// A 64-byte aligned float buffer that grows on demand (contents not kept).
class Scratch {
 public:
  ~Scratch() { std::free(p_); }
  float* Get(int64_t floats) {
    if (floats > cap_) {
      std::free(p_);
      cap_ = std::max(floats, 2 * cap_);
      p_ = static_cast<float*>(std::aligned_alloc(64, (cap_ * sizeof(float) + 63) / 64 * 64));
    }
    return p_;
  }

 private:
  float* p_ = nullptr;
  int64_t cap_ = 0;
};

// Size of token group g of `groups` over m tokens (balanced, <= T): the
// first groups take ceil(remaining / groups left).
inline int GroupSize(int64_t m, int64_t groups, int64_t t0, int64_t g) {
  const int64_t left = groups - g;
  return static_cast<int>((m - t0 + left - 1) / left);
}

// x [m, k] (rows ldx apart) -> per token group [steps][tn][W], zero-padded;
// the group that starts at token t0 starts at xp + t0 * steps * W.
void PackActivations(const float* x, int64_t ldx, int64_t m, int64_t k, int T, int W,
                     int64_t steps, float* xp) {
  const int64_t groups = (m + T - 1) / T;
  int64_t t0 = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int tn = GroupSize(m, groups, t0, g);
    float* out = xp + t0 * steps * W;
    ParallelFor(tn, std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, k)),
                [&](int64_t b, int64_t e) {
                  for (int64_t t = b; t < e; ++t) {
                    const float* row = x + (t0 + t) * ldx;
                    for (int64_t s = 0; s < steps; ++s) {
                      float* dst = out + (s * tn + t) * W;
                      const int64_t j = s * W;
                      const int64_t n = std::min<int64_t>(W, k - j);
                      std::memcpy(dst, row + j, n * sizeof(float));
                      for (int64_t l = n; l < W; ++l) dst[l] = 0.f;
                    }
                  }
                });
    t0 += tn;
  }
}

// Scratch for packed activations, one per calling thread, grown on demand.
float* PackBuffer(int64_t floats) {
  thread_local Scratch buf;
  return buf.Get(floats);
}

// Rows [rb, re) of y for all m tokens, with R x T tiles.
//
// One token group (m <= T): each tile makes a single pass over its weight
// rows, streaming them from memory (helped by the hardware prefetcher).
// Several groups: the rows go in panels of ~kPanelBytes; group 0 streams a
// panel from memory, groups 1.. re-read it from L2.
//
// Tried and dropped, as slower or no better in docs/cpu_gemm.md's runs:
// blocking the columns too (so a group's packed activations stay in L1: L2
// feeds them fast enough, and short weight runs defeat the hardware
// prefetcher), and software-prefetching the next panel during groups 1..
void RunRows(const KernelSet& ks, const Problem& p, int R, int T, int64_t rb, int64_t re) {
  const int64_t groups = (p.m + T - 1) / T;
  const int64_t row_bytes = p.k * p.wsize;
  int64_t panel = re - rb;
  if (groups > 1) {
    panel = std::max<int64_t>(R, kPanelBytes / std::max<int64_t>(1, row_bytes) / R * R);
  }
  for (int64_t p0 = rb; p0 < re; p0 += panel) {
    const int64_t p1 = std::min(re, p0 + panel);
    int64_t t0 = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const int tn = GroupSize(p.m, groups, t0, g);
      TileArgs a;
      a.k = p.k;
      a.xp = p.xp + t0 * p.steps * p.lanes;
      a.ldy = p.ldy;
      for (int64_t i = p0; i < p1; i += R) {
        const int rn = static_cast<int>(std::min<int64_t>(R, p1 - i));
        a.w = p.w + i * row_bytes;
        a.y = p.y + t0 * p.ldy + i;
        ks.at(rn, tn)(a);
      }
      t0 += tn;
    }
  }
}

GemmIsa DetectIsa() {
#if DMOE_GEMM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return GemmIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return GemmIsa::kAvx2;
#endif
  return GemmIsa::kScalar;
}

}  // namespace

GemmIsa BestGemmIsa() {
  static const GemmIsa isa = DetectIsa();
  return isa;
}

bool GemmIsaSupported(GemmIsa isa) {
  switch (isa) {
    case GemmIsa::kScalar:
      return true;
    case GemmIsa::kAvx2:
      return BestGemmIsa() != GemmIsa::kScalar;
    case GemmIsa::kAvx512:
      return BestGemmIsa() == GemmIsa::kAvx512;
  }
  return false;
}

const char* GemmIsaName(GemmIsa isa) {
  switch (isa) {
    case GemmIsa::kScalar:
      return "scalar";
    case GemmIsa::kAvx2:
      return "avx2";
    case GemmIsa::kAvx512:
      return "avx512";
  }
  return "?";
}

void MatMulOwn(GemmIsa isa, const float* x, int64_t m, const Matrix& w, float* y,
               int64_t ldx, int64_t ldy) {
  if (m <= 0 || w.rows == 0) return;
  if (ldx == 0) ldx = w.cols;
  if (ldy == 0) ldy = w.rows;
  if (!GemmIsaSupported(isa)) isa = BestGemmIsa();
  const bool bf16 = w.dtype == DType::kBF16;
  const KernelSet& ks = Kernels(isa, bf16);
  const int T = static_cast<int>(std::min<int64_t>(m, ks.tmax));
  const int R = ks.rows_for[T];
  const int W = ks.lanes;
  const int64_t k = w.cols;
  const int64_t steps = (k + W - 1) / W;
  float* xp = PackBuffer(std::max<int64_t>(1, m * steps * W));
  PackActivations(x, ldx, m, k, T, W, steps, xp);
  const Problem p{m, xp, steps, W, static_cast<const char*>(w.data), bf16 ? 2 : 4,
                  w.rows, k, y, ldy};
  const int64_t tiles = (p.n + R - 1) / R;
  // At least ~64K multiply-adds per chunk, or the pool's wake-up dominates.
  const int64_t work_per_tile = std::max<int64_t>(1, R * k * m);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / work_per_tile);
  ParallelFor(tiles, grain, [&](int64_t begin, int64_t end) {
    RunRows(ks, p, R, T, begin * R, std::min(p.n, end * R));
  });
}

void MatMul(const float* x, int64_t m, const Matrix& w, float* y, int64_t ldx,
            int64_t ldy) {
  if (m <= 0 || w.rows == 0) return;
  if (ldx == 0) ldx = w.cols;
  if (ldy == 0) ldy = w.rows;
  if (w.dtype == DType::kBF16 || m <= kOwnF32MaxTokens) {
    MatMulOwn(BestGemmIsa(), x, m, w, y, ldx, ldy);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m),
              static_cast<int>(w.rows), static_cast<int>(w.cols), 1.0f, x,
              static_cast<int>(ldx), w.f32(), static_cast<int>(w.cols), 0.0f, y,
              static_cast<int>(ldy));
}

}  // namespace dmoe::cpu
