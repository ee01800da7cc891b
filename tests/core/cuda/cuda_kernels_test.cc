// The elementwise, gate, GEMM and routed-expert CUDA kernels against the CPU
// backend (core/cpu/ops, core/rope, core/moe_gate) or a float64 reference,
// on fresh random inputs. Without a GPU every test skips, saying why.
//
// Tolerances: float32 kernels (norm, rope, gate, GEMM accumulation of exact
// bf16 products) within 1e-5 relative; a bf16 output or a bf16 intermediate
// (the expert activations) within a few bf16 ulps: 2^-8 = 3.9e-3 relative.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "core/config.h"
#include "core/cpu/ops.h"
#include "core/dtype.h"
#include "core/moe_gate.h"
#include "core/rope.h"
#include "tests/core/cuda/cuda_test_util.h"

namespace dmoe::cuda {
namespace {

using testing::CudaTest;
using testing::Download;
using testing::Poisoned;
using testing::RelL2;
using testing::Upload;

std::vector<float> Random(size_t n, std::mt19937& rng, float lo = -1.f, float hi = 1.f) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

std::vector<uint16_t> RandomBf16(size_t n, std::mt19937& rng, float scale = 1.f) {
  std::vector<uint16_t> v(n);
  std::uniform_real_distribution<float> u(-scale, scale);
  for (auto& x : v) x = FloatToBf16(u(rng));
  return v;
}

class CudaElementwiseTest : public CudaTest {};

TEST_F(CudaElementwiseTest, RmsNormMatchesCpu) {
  std::mt19937 rng(11);
  for (auto [n, d, ldx] :
       std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {1, 512, 576}, {7, 2048, 2048}, {3, 7168, 7200}, {2, 40, 40}, {5, 1408, 1408}, {2, 9000, 9000}}) {
    const auto x = Random(n * ldx, rng, -3, 3);
    const auto w = Random(d, rng, 0.5, 1.5);
    std::vector<float> ref(n * d);
    cpu::RmsNorm(x.data(), n, d, w.data(), 1e-6f, ref.data(), ldx, d);
    DeviceBuffer dx = Upload(x), dw = Upload(w), out = Poisoned<float>(n * d), out16 = Poisoned<uint16_t>(n * d);
    RmsNormParams p{dx.as<float>(), n, d, ldx, dw.as<float>(), 1e-6f, out.data(), OutType::kF32, d};
    ASSERT_TRUE(RmsNorm(p, nullptr).ok());
    p.out = out16.data();
    p.out_type = OutType::kBF16;
    ASSERT_TRUE(RmsNorm(p, nullptr).ok());
    // float32 sums in another order over up to 7168 values: a few 1e-7.
    EXPECT_LT(RelL2(Download<float>(out, n * d), ref), 3e-6) << "d=" << d;
    const auto got16 = Download<uint16_t>(out16, n * d);
    std::vector<float> got16f(n * d);
    for (int64_t i = 0; i < n * d; ++i) got16f[i] = Bf16ToFloat(got16[i]);
    EXPECT_LT(RelL2(got16f, ref), 4e-3) << "d=" << d;
    if (ldx == d) {  // in place, as the engine normalizes
      p.out = dx.data();
      p.out_type = OutType::kF32;
      ASSERT_TRUE(RmsNorm(p, nullptr).ok());
      EXPECT_LT(RelL2(Download<float>(dx, n * d), ref), 3e-6) << "in place, d=" << d;
    }
  }
}

TEST_F(CudaElementwiseTest, RopeMatchesCoreRopeBothPairingsAndYarn) {
  std::mt19937 rng(12);
  for (int variant = 0; variant < 3; ++variant) {
    ModelConfig c;
    c.model_type = ModelType::kDeepseekV3;
    c.qk_nope_head_dim = 128;
    c.qk_rope_head_dim = 64;
    c.rope_theta = 10000;
    c.rope_interleave = variant != 1;
    if (variant == 2) {
      c.rope_scaling.yarn = true;
      c.rope_scaling.factor = 40;
      c.rope_scaling.original_max_position_embeddings = 4096;
      c.rope_scaling.mscale = 0.707;
      c.rope_scaling.mscale_all_dim = 1.0;
    }
    const Rope rope(c);
    // q-like rows: 5 tokens x 4 heads of [nope 128 | rope 64], row stride 800.
    const int64_t n = 5, H = 4, hs = 192, ld = 800, off = 128;
    auto x = Random(n * ld, rng);
    std::vector<int32_t> pos = {0, 1, 63, 4097, 100000};
    auto ref = x;
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < H; ++h) rope.Apply(pos[t], ref.data() + t * ld + h * hs + off);
    DeviceBuffer dx = Upload(x), dpos = Upload(pos), dfreq = Upload(rope.inv_freq());
    RopeParams p;
    p.x = dx.as<float>();
    p.n = n;
    p.ld = ld;
    p.num_heads = H;
    p.head_stride = hs;
    p.offset = off;
    p.rope_dim = 64;
    p.pos = dpos.as<int32_t>();
    p.inv_freq = dfreq.as<float>();
    p.attention_factor = rope.attention_factor();
    p.interleaved = c.rope_interleave;
    ASSERT_TRUE(ApplyRope(p, nullptr).ok());
    const auto got = Download<float>(dx, n * ld);
    for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], ref[i], 2e-6) << "variant " << variant << " i " << i;
  }
}

TEST_F(CudaElementwiseTest, SiluMulMatchesCpu) {
  std::mt19937 rng(13);
  const int64_t n = 9, I = 1408;
  const auto gu = Random(n * 2 * I, rng, -6, 6);
  std::vector<float> ref(n * I);
  for (int64_t t = 0; t < n; ++t) {
    std::vector<float> g(gu.begin() + t * 2 * I, gu.begin() + t * 2 * I + I);
    cpu::SiluMul(g.data(), gu.data() + t * 2 * I + I, I);
    std::copy(g.begin(), g.end(), ref.begin() + t * I);
  }
  DeviceBuffer dgu = Upload(gu), out = Poisoned<float>(n * I);
  ASSERT_TRUE(SiluMul(dgu.as<float>(), n, I, out.data(), OutType::kF32, nullptr).ok());
  EXPECT_LT(RelL2(Download<float>(out, n * I), ref), 1e-6);
}

TEST_F(CudaElementwiseTest, ConversionsRoundTripAsHost) {
  std::mt19937 rng(14);
  const auto x = Random(10007, rng, -100, 100);
  DeviceBuffer dx = Upload(x), d16 = Poisoned<uint16_t>(x.size()), dback = Poisoned<float>(x.size());
  ASSERT_TRUE(ConvertF32ToBf16(dx.as<float>(), x.size(), d16.as<uint16_t>(), nullptr).ok());
  ASSERT_TRUE(ConvertBf16ToF32(d16.as<uint16_t>(), x.size(), dback.as<float>(), nullptr).ok());
  const auto b16 = Download<uint16_t>(d16, x.size());
  const auto back = Download<float>(dback, x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(b16[i], FloatToBf16(x[i])) << i;
    ASSERT_EQ(back[i], Bf16ToFloat(b16[i])) << i;
  }
}

TEST_F(CudaElementwiseTest, ArgmaxLowestIndexOnTiesAndIgnoresNan) {
  std::mt19937 rng(15);
  const int64_t vocab = 102400, n = 6;
  auto logits = Random(n * vocab, rng, -10, 10);
  std::vector<int32_t> want(n);
  for (int64_t t = 0; t < n; ++t) {
    float* row = logits.data() + t * vocab;
    if (t == 1) {  // tie: the lower index wins
      row[777] = 50.f;
      row[90000] = 50.f;
    }
    if (t == 2) row[5] = NAN, row[vocab - 1] = 42.f;     // NaN never wins
    if (t == 3) std::fill(row, row + vocab, -INFINITY);  // all -inf: token 0
    int32_t best = 0;
    for (int64_t v = 1; v < vocab; ++v) {
      if (row[v] > row[best] || std::isnan(row[best])) best = static_cast<int32_t>(v);
    }
    want[t] = best;
  }
  DeviceBuffer dl = Upload(logits), out = Poisoned<int32_t>(n);
  ASSERT_TRUE(ArgmaxRows(dl.as<float>(), n, vocab, out.as<int32_t>(), nullptr).ok());
  EXPECT_EQ(Download<int32_t>(out, n), want);
  EXPECT_EQ(want[1], 777);
  EXPECT_EQ(want[3], 0);
}

TEST_F(CudaElementwiseTest, RouterLogitsMatchFloat64) {
  std::mt19937 rng(16);
  // (tokens, hidden, experts): decode and prefill sizes of V2-Lite and V3,
  // odd counts (a tile's second expert / token past the end), a tiny model.
  for (auto [n, d, E] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {1, 2048, 64}, {64, 2048, 64}, {7, 7168, 256}, {5, 64, 3}, {2048, 2048, 64}}) {
    const auto x = Random(n * d, rng, -2, 2);
    const auto w = Random(E * d, rng, -0.05, 0.05);
    DeviceBuffer dx = Upload(x), dw = Upload(w), out = Poisoned<float>(n * E);
    ASSERT_TRUE(RouterLogitsF32(dx.as<float>(), n, d, dw.as<float>(), E, out.as<float>(), nullptr).ok());
    const auto got = Download<float>(out, n * E);
    double worst = 0;
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t e = 0; e < E; ++e) {
        double ref = 0, mag = 0;
        for (int64_t i = 0; i < d; ++i) {
          ref += static_cast<double>(x[t * d + i]) * w[e * d + i];
          mag += std::fabs(static_cast<double>(x[t * d + i]) * w[e * d + i]);
        }
        worst = std::max(worst, std::fabs(got[t * E + e] - ref) / mag);
      }
    }
    // float32 products and sums (no TF32: that would be ~1e-3).
    EXPECT_LT(worst, 1e-6) << "n=" << n << " d=" << d << " E=" << E;
  }
  DeviceBuffer dx = Poisoned<float>(6), dw = Poisoned<float>(6), out = Poisoned<float>(1);
  EXPECT_EQ(RouterLogitsF32(dx.as<float>(), 1, 6, dw.as<float>(), 1, out.as<float>(), nullptr).code(),
            absl::StatusCode::kInvalidArgument);  // d % 4 != 0
}

// ---- gate ----

struct GateCase {
  const char* name;
  ModelType type;
  TopkMethod method;
  int64_t E, k, G, kg;
  bool norm;
  double rsf;
  bool correction_bias, serving_bias;
};

class CudaGateTest : public CudaTest, public ::testing::WithParamInterface<GateCase> {};

TEST_P(CudaGateTest, MatchesMoeGate) {
  const GateCase& gc = GetParam();
  ModelConfig c;
  c.model_type = gc.type;
  c.topk_method = gc.method;
  c.scoring_func = gc.type == ModelType::kDeepseekV3 ? ScoringFunc::kSigmoid : ScoringFunc::kSoftmax;
  c.n_routed_experts = gc.E;
  c.num_experts_per_tok = gc.k;
  c.n_group = gc.G;
  c.topk_group = gc.kg;
  c.norm_topk_prob = gc.norm;
  c.routed_scaling_factor = gc.rsf;
  const MoeGate gate(c);
  std::mt19937 rng(static_cast<unsigned>(gc.E * 131 + gc.k));
  const int64_t n = 53;
  const auto z = Random(n * gc.E, rng, -4, 4);
  const auto bias = gc.correction_bias ? Random(gc.E, rng, -0.5, 0.5) : std::vector<float>{};
  const auto serving = gc.serving_bias ? Random(gc.E, rng, -0.1, 0.1) : std::vector<float>{};
  std::vector<int32_t> ref_idx(n * gc.k);
  std::vector<float> ref_w(n * gc.k);
  for (int64_t t = 0; t < n; ++t) {
    gate.Route(absl::MakeConstSpan(z.data() + t * gc.E, gc.E), bias, serving, ref_idx.data() + t * gc.k,
               ref_w.data() + t * gc.k);
  }
  DeviceBuffer dz = Upload(z), db = Upload(bias.empty() ? std::vector<float>{0.f} : bias),
               ds = Upload(serving.empty() ? std::vector<float>{0.f} : serving);
  DeviceBuffer idx = Poisoned<int32_t>(n * gc.k), w = Poisoned<float>(n * gc.k);
  MoeGateParams p = GateParamsFor(c);
  p.logits = dz.as<float>();
  p.n = n;
  p.correction_bias = bias.empty() ? nullptr : db.as<float>();
  p.serving_bias = serving.empty() ? nullptr : ds.as<float>();
  p.topk_idx = idx.as<int32_t>();
  p.topk_weights = w.as<float>();
  ASSERT_TRUE(MoeGateRoute(p, nullptr).ok());
  EXPECT_EQ(Download<int32_t>(idx, n * gc.k), ref_idx) << gc.name;
  const auto got_w = Download<float>(w, n * gc.k);
  for (int64_t i = 0; i < n * gc.k; ++i)
    EXPECT_NEAR(got_w[i], ref_w[i], 1e-5 * std::abs(ref_w[i]) + 1e-7) << gc.name << " " << i;
}

INSTANTIATE_TEST_SUITE_P(
    Variants, CudaGateTest,
    ::testing::Values(GateCase{"v3_noaux_tc_norm", ModelType::kDeepseekV3, TopkMethod::kNoauxTc, 256, 8, 8, 4, true,
                               2.5, true, false},
                      GateCase{"v3_noaux_tc_nonorm_serving", ModelType::kDeepseekV3, TopkMethod::kNoauxTc, 64, 6, 8, 3,
                               false, 1.0, true, true},
                      GateCase{"v3_noaux_tc_one_group", ModelType::kDeepseekV3, TopkMethod::kNoauxTc, 16, 4, 1, 1, true,
                               2.5, true, false},
                      GateCase{"v2_greedy", ModelType::kDeepseekV2, TopkMethod::kGreedy, 64, 6, 1, 1, false, 1.0, false,
                               false},
                      GateCase{"v2_greedy_serving", ModelType::kDeepseekV2, TopkMethod::kGreedy, 160, 6, 1, 1, false,
                               16.0, false, true},
                      GateCase{"v2_group_limited", ModelType::kDeepseekV2, TopkMethod::kGroupLimitedGreedy, 160, 6, 8,
                               3, false, 16.0, false, false},
                      GateCase{"v2_group_limited_512", ModelType::kDeepseekV2, TopkMethod::kGroupLimitedGreedy, 512, 16,
                               16, 5, false, 1.0, false, false}),
    [](const ::testing::TestParamInfo<GateCase>& i) { return std::string(i.param.name); });

TEST_F(CudaElementwiseTest, GateRejectsUnsupportedShapes) {
  MoeGateParams p;
  p.num_experts = 1000;
  p.top_k = 8;
  EXPECT_EQ(MoeGateRoute(p, nullptr).code(), absl::StatusCode::kInvalidArgument);
  p.num_experts = 64;
  p.topk_method = GateTopk::kNoauxTc;
  p.n_group = 7;
  EXPECT_EQ(MoeGateRoute(p, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

// ---- GEMMs ----

// C[m, n] = A[m, k] · B[n, k]^T in float64.
std::vector<double> RefGemm(const std::vector<uint16_t>& a, const uint16_t* b, int64_t m, int64_t n, int64_t k) {
  std::vector<double> c(m * n);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t t = 0; t < k; ++t) s += double{Bf16ToFloat(a[i * k + t])} * Bf16ToFloat(b[j * k + t]);
      c[i * n + j] = s;
    }
  return c;
}

class CudaGemmTest : public CudaTest {};

TEST_F(CudaGemmTest, DenseGemmMatchesFloat64) {
  auto blas = BlasHandle::Create();
  ASSERT_TRUE(blas.ok()) << blas.status();
  std::mt19937 rng(21);
  for (auto [m, n, k] :
       std::vector<std::tuple<int64_t, int64_t, int64_t>>{{1, 136, 264}, {5, 2048, 512}, {64, 576, 2048}}) {
    const auto a = RandomBf16(m * k, rng), b = RandomBf16(n * k, rng);
    const auto ref = RefGemm(a, b.data(), m, n, k);
    DeviceBuffer da = Upload(a), db = Upload(b), dc = Poisoned<float>(m * n), dc16 = Poisoned<uint16_t>(m * n);
    GemmParams p{da.as<uint16_t>(), db.as<uint16_t>(), OutType::kBF16, dc.data(), OutType::kF32, m, n, k};
    ASSERT_TRUE(Gemm(**blas, p, nullptr).ok());
    EXPECT_LT(RelL2(Download<float>(dc, m * n), ref), 1e-5) << m << "x" << n << "x" << k;
    p.c = dc16.data();
    p.c_type = OutType::kBF16;
    ASSERT_TRUE(Gemm(**blas, p, nullptr).ok());
    const auto c16 = Download<uint16_t>(dc16, m * n);
    std::vector<float> c16f(m * n);
    for (int64_t i = 0; i < m * n; ++i) c16f[i] = Bf16ToFloat(c16[i]);
    EXPECT_LT(RelL2(c16f, ref), 4e-3);
  }
}

// Float32 inputs (a float32 checkpoint's precision) are multiplied in true
// float32: full-mantissa random values, where TF32's 10-bit inputs would
// leave ~1e-3 of error.
TEST_F(CudaGemmTest, Float32GemmIsNotTf32) {
  auto blas = BlasHandle::Create();
  ASSERT_TRUE(blas.ok()) << blas.status();
  std::mt19937 rng(22);
  for (auto [m, n, k] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{1, 104, 128}, {40, 512, 128}}) {
    const auto a = Random(m * k, rng), b = Random(n * k, rng);
    std::vector<double> ref(m * n);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double acc = 0;
        for (int64_t t = 0; t < k; ++t) acc += double{a[i * k + t]} * b[j * k + t];
        ref[i * n + j] = acc;
      }
    DeviceBuffer da = Upload(a), db = Upload(b), dc = Poisoned<float>(m * n);
    GemmParams p{da.data(), db.data(), OutType::kF32, dc.data(), OutType::kF32, m, n, k};
    ASSERT_TRUE(Gemm(**blas, p, nullptr).ok());
    EXPECT_LT(RelL2(Download<float>(dc, m * n), ref), 1e-6) << m << "x" << n << "x" << k;
  }
}

// C[offsets[g] ..) = A[offsets[g] ..) · B_g^T in float64, B_g = b + g * stride.
std::vector<double> GroupedReference(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b, int64_t stride,
                                     const std::vector<int32_t>& offsets, int64_t n, int64_t k) {
  const int64_t G = static_cast<int64_t>(offsets.size()) - 1;
  std::vector<double> ref(offsets[G] * n);
  for (int64_t g = 0; g < G; ++g) {
    std::vector<uint16_t> ag(a.begin() + offsets[g] * k, a.begin() + offsets[g + 1] * k);
    const auto cg = RefGemm(ag, b.data() + g * stride, offsets[g + 1] - offsets[g], n, k);
    std::copy(cg.begin(), cg.end(), ref.begin() + offsets[g] * n);
  }
  return ref;
}

class CudaGroupedGemmTest : public CudaTest, public ::testing::WithParamInterface<std::vector<int32_t>> {};

// Rows per group: well filled (64-row tiles), decode-like (16-row tiles)
// and prefill-like (hundreds of rows per group, with partial and empty
// tiles).
INSTANTIATE_TEST_SUITE_P(RowCounts, CudaGroupedGemmTest,
                         ::testing::Values(std::vector<int32_t>{0, 1, 17, 64, 65, 0, 130, 3, 200, 0},
                                           std::vector<int32_t>{0, 1, 5, 16, 17, 0, 3, 2},
                                           std::vector<int32_t>{300, 129, 0, 512, 128, 1, 250}));

TEST_P(CudaGroupedGemmTest, UnevenAndEmptyGroupsBothImpls) {
  auto blas = BlasHandle::Create();
  ASSERT_TRUE(blas.ok()) << blas.status();
  std::mt19937 rng(22);
  const std::vector<int32_t> counts = GetParam();
  // n spans a full and a partial 256-column tile, k a partial 64-deep one.
  const int64_t G = counts.size(), n = 392, k = 264;
  std::vector<int32_t> offsets(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) offsets[g + 1] = offsets[g] + counts[g];
  const int64_t rows = offsets[G];
  const auto a = RandomBf16(rows * k, rng), b = RandomBf16(G * n * k, rng);
  const std::vector<double> ref = GroupedReference(a, b, n * k, offsets, n, k);
  DeviceBuffer da = Upload(a), db = Upload(b), doff = Upload(offsets);
  // kOwn with its default tile, then each tile shape forced (128: wgmma,
  // where this build and device have it); kCublas (tile_rows unused).
  struct Variant {
    GroupedGemmImpl impl;
    int tile_rows;
  };
  std::vector<Variant> variants = {{GroupedGemmImpl::kOwn, 0}, {GroupedGemmImpl::kOwn, 16}, {GroupedGemmImpl::kOwn, 64}};
  if (WgmmaAvailable()) variants.push_back({GroupedGemmImpl::kOwn, 128});
  variants.push_back({GroupedGemmImpl::kCublas, 0});
  for (const auto& [impl, tile_rows] : variants) {
    for (OutType ct : {OutType::kF32, OutType::kBF16}) {
      DeviceBuffer dc = ct == OutType::kF32 ? Poisoned<float>(rows * n) : Poisoned<uint16_t>(rows * n);
      GroupedGemmParams p;
      p.a = da.as<uint16_t>();
      p.b = db.as<uint16_t>();
      p.c = dc.data();
      p.c_type = ct;
      p.num_groups = G;
      p.n = n;
      p.k = k;
      p.offsets = doff.as<int32_t>();
      p.host_offsets = offsets.data();
      p.max_rows = rows + 3;  // an upper bound, not exact
      p.impl = impl;
      p.tile_rows = tile_rows;
      p.blas = blas->get();
      ASSERT_TRUE(GroupedGemm(p, nullptr).ok()) << "tile_rows " << tile_rows;
      std::vector<float> got(rows * n);
      if (ct == OutType::kF32) {
        got = Download<float>(dc, rows * n);
      } else {
        const auto g16 = Download<uint16_t>(dc, rows * n);
        for (int64_t i = 0; i < rows * n; ++i) got[i] = Bf16ToFloat(g16[i]);
      }
      EXPECT_LT(RelL2(got, ref), ct == OutType::kF32 ? 1e-5 : 4e-3)
          << (impl == GroupedGemmImpl::kOwn ? "own" : "cublas") << (ct == OutType::kF32 ? " f32" : " bf16")
          << " tile_rows " << tile_rows;
    }
  }
}

// Decode over many experts: 1024 groups of 0-3 rows and 9 column tiles, a
// grid wide enough for the 16-row kernel's 128-column tiles (narrow grids
// take its 64-column ones, which the test above covers). The groups' weights
// overlap (stride k) to keep the test small.
TEST_F(CudaTest, GroupedGemmManyGroupsWideGrid) {
  std::mt19937 rng(24);
  const int64_t G = 1024, n = 1152, k = 264;
  std::vector<int32_t> offsets(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) offsets[g + 1] = offsets[g] + static_cast<int32_t>(rng() % 4);
  const int64_t rows = offsets[G];
  const auto a = RandomBf16(rows * k, rng), b = RandomBf16((G - 1) * k + n * k, rng);
  const std::vector<double> ref = GroupedReference(a, b, k, offsets, n, k);
  DeviceBuffer da = Upload(a), db = Upload(b), doff = Upload(offsets), dc = Poisoned<float>(rows * n);
  GroupedGemmParams p;
  p.a = da.as<uint16_t>();
  p.b = db.as<uint16_t>();
  p.b_group_stride = k;
  p.c = dc.data();
  p.num_groups = G;
  p.n = n;
  p.k = k;
  p.offsets = doff.as<int32_t>();
  p.max_rows = rows;
  ASSERT_EQ(GroupedGemmTileRows(p.max_rows, p.num_groups, p.n), 16);
  ASSERT_TRUE(GroupedGemm(p, nullptr).ok());
  EXPECT_LT(RelL2(Download<float>(dc, rows * n), ref), 1e-5);
}

TEST_F(CudaTest, GroupedGemmRejectsUnknownTileRows) {
  GroupedGemmParams p;
  p.num_groups = 1;
  p.n = 8;
  p.k = 8;
  p.max_rows = 1;
  p.tile_rows = 32;
  const absl::Status st = GroupedGemm(p, nullptr);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("tile_rows"), std::string::npos) << st;
  if (!WgmmaAvailable()) {
    p.tile_rows = 128;
    EXPECT_EQ(GroupedGemm(p, nullptr).code(), absl::StatusCode::kInvalidArgument);
  }
}

// Tokens: 45 (about 11 rows per expert: 64-row tiles) and 400 (100 per
// expert: the prefill tiles, wgmma on Hopper).
class CudaMoeExpertsTest : public CudaTest, public ::testing::WithParamInterface<int64_t> {};
INSTANTIATE_TEST_SUITE_P(Tokens, CudaMoeExpertsTest, ::testing::Values(45, 400));

TEST_P(CudaMoeExpertsTest, MoeExpertsMatchFloat64BothImpls) {
  auto blas = BlasHandle::Create();
  ASSERT_TRUE(blas.ok()) << blas.status();
  std::mt19937 rng(23);
  const int64_t n = GetParam(), k = 4, E = 16, D = 256, I = 136;
  const auto x = Random(n * D, rng);
  const auto wgu = RandomBf16(E * 2 * I * D, rng, 0.1f), wd = RandomBf16(E * D * I, rng, 0.1f);
  // Uneven routing: experts 0..11 only (12..15 stay empty), token 3 routes
  // one slot to -1 and one to an expert this node does not hold (>= E).
  std::vector<int32_t> idx(n * k);
  std::vector<float> w = Random(n * k, rng, 0.05f, 1.0f);
  for (int64_t t = 0; t < n; ++t) {
    std::vector<int32_t> e(12);
    std::iota(e.begin(), e.end(), 0);
    std::shuffle(e.begin(), e.end(), rng);
    for (int64_t j = 0; j < k; ++j) idx[t * k + j] = e[j];
  }
  idx[3 * k + 1] = -1;
  idx[3 * k + 2] = static_cast<int32_t>(E + 5);
  // float64 reference; with bf16 weights the kernel's roundings too (x and
  // the SwiGLU output to bf16), with float32 weights none.
  auto reference = [&](bool bf16) {
  auto round = [bf16](double v) { return bf16 ? double{Bf16ToFloat(FloatToBf16(static_cast<float>(v)))} : v; };
  std::vector<double> ref(n * D, 0.0);
  for (int64_t t = 0; t < n; ++t) {
    std::vector<double> xb(D);
    for (int64_t i = 0; i < D; ++i) xb[i] = round(x[t * D + i]);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = idx[t * k + j];
      if (e < 0 || e >= E) continue;
      std::vector<double> act(I);
      for (int64_t i = 0; i < I; ++i) {
        double g = 0, u = 0;
        for (int64_t d = 0; d < D; ++d) {
          g += double{Bf16ToFloat(wgu[(e * 2 * I + i) * D + d])} * xb[d];
          u += double{Bf16ToFloat(wgu[(e * 2 * I + I + i) * D + d])} * xb[d];
        }
        act[i] = round(g / (1 + std::exp(-g)) * u);
      }
      for (int64_t d = 0; d < D; ++d) {
        double y = 0;
        for (int64_t i = 0; i < I; ++i) y += double{Bf16ToFloat(wd[(e * D + d) * I + i])} * act[i];
        ref[t * D + d] += w[t * k + j] * y;
      }
    }
  }
  return ref;
  };
  const std::vector<double> ref = reference(true);
  DeviceBuffer dx = Upload(x), didx = Upload(idx), dw = Upload(w), dgu = Upload(wgu), dd = Upload(wd);
  // The parameters for weights of `type`, writing `out` through workspace `ws`.
  auto params = [&](const DeviceBuffer& gate_up, const DeviceBuffer& down, OutType type, const DeviceBuffer& out,
                    const DeviceBuffer& ws, GroupedGemmImpl impl) {
    MoeExpertsParams p;
    p.x = dx.as<float>();
    p.n = n;
    p.top_k = k;
    p.topk_idx = didx.as<int32_t>();
    p.topk_weights = dw.as<float>();
    p.num_experts = E;
    p.hidden = D;
    p.intermediate = I;
    p.w_gate_up = gate_up.data();
    p.w_down = down.data();
    p.weight_type = type;
    p.out = out.as<float>();
    p.workspace = ws.data();
    p.workspace_bytes = ws.size();
    p.impl = impl;
    p.blas = blas->get();
    return p;
  };
  const size_t ws_bytes = MoeExpertsWorkspaceBytes(n, k, E, D, I);
  auto ws = DeviceBuffer::Allocate(ws_bytes);
  ASSERT_TRUE(ws.ok());
  for (GroupedGemmImpl impl : {GroupedGemmImpl::kOwn, GroupedGemmImpl::kCublas}) {
    ASSERT_TRUE(FillBytes(ws->data(), 0xFF, ws_bytes, nullptr).ok());
    DeviceBuffer out = Poisoned<float>(n * D);
    ASSERT_TRUE(MoeExperts(params(dgu, dd, OutType::kBF16, out, *ws, impl), nullptr).ok());
    // Rounding a pre-activation differently at a bf16 boundary moves one
    // activation by one ulp: well inside 1e-3 of the whole output.
    EXPECT_LT(RelL2(Download<float>(out, n * D), ref), 1e-3) << (impl == GroupedGemmImpl::kOwn ? "own" : "cublas");
  }
  // Float32 weights (the same values) through cuBLAS: no bf16 rounding anywhere.
  std::vector<float> wgu32(wgu.size()), wd32(wd.size());
  for (size_t i = 0; i < wgu.size(); ++i) wgu32[i] = Bf16ToFloat(wgu[i]);
  for (size_t i = 0; i < wd.size(); ++i) wd32[i] = Bf16ToFloat(wd[i]);
  DeviceBuffer dgu32 = Upload(wgu32), dd32 = Upload(wd32);
  const size_t ws32_bytes = MoeExpertsWorkspaceBytes(n, k, E, D, I, OutType::kF32);
  auto ws32 = DeviceBuffer::Allocate(ws32_bytes);
  ASSERT_TRUE(ws32.ok());
  DeviceBuffer out = Poisoned<float>(n * D);
  EXPECT_EQ(MoeExperts(params(dgu32, dd32, OutType::kF32, out, *ws32, GroupedGemmImpl::kOwn), nullptr).code(),
            absl::StatusCode::kInvalidArgument)
      << "the bf16 kernel took float32";
  ASSERT_TRUE(MoeExperts(params(dgu32, dd32, OutType::kF32, out, *ws32, GroupedGemmImpl::kCublas), nullptr).ok());
  EXPECT_LT(RelL2(Download<float>(out, n * D), reference(false)), 1e-5) << "float32";
}

}  // namespace
}  // namespace dmoe::cuda
