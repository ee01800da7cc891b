// The CUDA compute backend's own kernels (core/cuda/backend_kernels.h)
// against host references on fresh random inputs: the dummy-weight
// generator bit for bit against the CPU's, the strided copies and the
// absorbed-MLA transpose exactly, the any-dims MLA kernel against a
// float64 reference and against kernels.h's tuned kernel at V2/V3 dims.
// Without a GPU every test skips, saying why.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "core/cuda/backend_kernels.h"
#include "core/cuda/cuda_compute_backend.h"
#include "core/dtype.h"
#include "core/synthetic_checkpoint.h"
#include "gtest/gtest.h"

namespace dmoe::cuda {
namespace {

class CudaBackendKernelsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const absl::Status st = CheckCudaDevice(0);
    if (!st.ok()) GTEST_SKIP() << "no CUDA device: " << st.message();
  }
};

// A device copy of a host vector, freed with the test.
template <typename T>
class Dev {
 public:
  explicit Dev(const std::vector<T>& host) : n_(host.size()) {
    EXPECT_EQ(cudaMalloc(&p_, std::max<size_t>(n_, 1) * sizeof(T)), cudaSuccess);
    if (n_ > 0) EXPECT_EQ(cudaMemcpy(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  explicit Dev(size_t n) : Dev(std::vector<T>(n)) {}
  ~Dev() { cudaFree(p_); }
  T* get() const { return static_cast<T*>(p_); }
  std::vector<T> Host() const {
    std::vector<T> h(n_);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    if (n_ > 0) EXPECT_EQ(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }

 private:
  void* p_ = nullptr;
  size_t n_;
};

TEST_F(CudaBackendKernelsTest, FillRandomIsTheCpuGeneratorBitForBit) {
  RandomTensorSpec spec{"model.layers.3.mlp.experts.7.up_proj.weight", {3, 70001}, 0.f, 0.0457f};
  const std::vector<float> cpu = RandomTensorValues(spec, 42);
  const int64_t n = static_cast<int64_t>(cpu.size());  // 210003: crosses 65536-value chunks
  const uint64_t key = RandomTensorKey(spec.name, 42);
  Dev<float> f32(n);
  ASSERT_TRUE(FillRandom(f32.get(), OutType::kF32, n, 0, key, spec.center, spec.half_width, nullptr).ok());
  const std::vector<float> g = f32.Host();
  ASSERT_EQ(std::memcmp(g.data(), cpu.data(), n * sizeof(float)), 0);
  // bf16, from an offset inside a chunk (as a tensor filled in parts would be).
  const int64_t first = 70000;
  Dev<uint16_t> bf(n - first);
  ASSERT_TRUE(FillRandom(bf.get(), OutType::kBF16, n - first, first, key, spec.center, spec.half_width, nullptr).ok());
  const std::vector<uint16_t> b = bf.Host();
  for (int64_t i = 0; i < n - first; ++i) ASSERT_EQ(b[i], FloatToBf16(cpu[first + i])) << "element " << first + i;
  // Norm-like values (center 1) too.
  RandomTensorSpec norm{"model.norm.weight", {2048}, 1.f, 0.1f};
  const std::vector<float> cn = RandomTensorValues(norm, 0);
  Dev<float> gn(cn.size());
  ASSERT_TRUE(FillRandom(gn.get(), OutType::kF32, 2048, 0, RandomTensorKey(norm.name, 0), 1.f, 0.1f, nullptr).ok());
  EXPECT_EQ(gn.Host(), cn);
}

TEST_F(CudaBackendKernelsTest, StridedCopyTransposeGatherEmbedAdd) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-2, 2);
  // [n, H, d] token-major -> [H, n, d] head-major, bf16.
  const int64_t n = 37, H = 5, d = 24, ld = H * d + 8;
  std::vector<float> src(n * ld);
  for (float& v : src) v = u(rng);
  Dev<float> dsrc(src);
  Dev<uint16_t> dst(H * n * d);
  StridedCopyParams p;
  p.src = dsrc.get() + 3;
  p.src_a = d;
  p.src_b = ld;
  p.dst = dst.get();
  p.dst_type = OutType::kBF16;
  p.dst_a = n * d;
  p.dst_b = d;
  p.na = H;
  p.nb = n;
  p.nc = d;
  ASSERT_TRUE(StridedCopy(p, nullptr).ok());
  const std::vector<uint16_t> out = dst.Host();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = 0; c < d; ++c)
        ASSERT_EQ(out[(h * n + t) * d + c], FloatToBf16(src[3 + t * ld + h * d + c]));
  // Aligned to 4 elements (the vectorized kernel), to bf16 and to float32.
  p.src = dsrc.get() + 4;
  ASSERT_TRUE(StridedCopy(p, nullptr).ok());
  const std::vector<uint16_t> out4 = dst.Host();
  Dev<float> dst32(H * n * d);
  p.dst = dst32.get();
  p.dst_type = OutType::kF32;
  ASSERT_TRUE(StridedCopy(p, nullptr).ok());
  const std::vector<float> out32 = dst32.Host();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t c = 0; c < d; ++c) {
        ASSERT_EQ(out4[(h * n + t) * d + c], FloatToBf16(src[4 + t * ld + h * d + c]));
        ASSERT_EQ(out32[(h * n + t) * d + c], src[4 + t * ld + h * d + c]);
      }

  // W_UK[h]^T from kv_b [H*(dn+dv), r].
  const int64_t dn = 16, dv = 8, r = 32;
  std::vector<uint16_t> kvb(H * (dn + dv) * r);
  for (uint16_t& v : kvb) v = FloatToBf16(u(rng));
  Dev<uint16_t> dkvb(kvb), duk(H * r * dn);
  ASSERT_TRUE(TransposeUk(dkvb.get(), OutType::kBF16, H, dn, dv, r, duk.get(), nullptr).ok());
  const std::vector<uint16_t> uk = duk.Host();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t c = 0; c < r; ++c)
      for (int64_t e = 0; e < dn; ++e) ASSERT_EQ(uk[(h * r + c) * dn + e], kvb[(h * (dn + dv) + e) * r + c]);
  // The same in float32 (a float32 checkpoint's precision).
  std::vector<float> kvb32(kvb.size());
  for (float& v : kvb32) v = u(rng);
  Dev<float> dkvb32(kvb32), duk32(H * r * dn);
  ASSERT_TRUE(TransposeUk(dkvb32.get(), OutType::kF32, H, dn, dv, r, duk32.get(), nullptr).ok());
  const std::vector<float> uk32 = duk32.Host();
  for (int64_t h = 0; h < H; ++h)
    for (int64_t c = 0; c < r; ++c)
      for (int64_t e = 0; e < dn; ++e) ASSERT_EQ(uk32[(h * r + c) * dn + e], kvb32[(h * (dn + dv) + e) * r + c]);

  // Embedding rows, row gather, residual adds.
  const int64_t V = 50, D = 24;
  std::vector<uint16_t> table(V * D);
  for (uint16_t& v : table) v = FloatToBf16(u(rng));
  const std::vector<int32_t> ids = {3, 49, 0, 3, 17};
  Dev<uint16_t> dtable(table);
  Dev<int32_t> dids(ids);
  Dev<float> emb(ids.size() * D);
  ASSERT_TRUE(EmbedRows(dtable.get(), OutType::kBF16, dids.get(), static_cast<int64_t>(ids.size()), D, emb.get(),
                        nullptr)
                  .ok());
  const std::vector<float> e = emb.Host();
  for (size_t t = 0; t < ids.size(); ++t)
    for (int64_t c = 0; c < D; ++c) ASSERT_EQ(e[t * D + c], Bf16ToFloat(table[ids[t] * D + c]));
  std::vector<float> table32(V * D);
  for (float& v : table32) v = u(rng);
  Dev<float> dtable32(table32), emb32(ids.size() * D);
  ASSERT_TRUE(EmbedRows(dtable32.get(), OutType::kF32, dids.get(), static_cast<int64_t>(ids.size()), D, emb32.get(),
                        nullptr)
                  .ok());
  const std::vector<float> e32 = emb32.Host();
  for (size_t t = 0; t < ids.size(); ++t)
    for (int64_t c = 0; c < D; ++c) ASSERT_EQ(e32[t * D + c], table32[ids[t] * D + c]);
  const std::vector<int32_t> rows = {4, 1};
  Dev<int32_t> drows(rows);
  Dev<float> picked(rows.size() * D);
  ASSERT_TRUE(GatherRows(emb.get(), drows.get(), 2, D, picked.get(), nullptr).ok());
  const std::vector<float> pk = picked.Host();
  for (size_t i = 0; i < rows.size(); ++i)
    for (int64_t c = 0; c < D; ++c) ASSERT_EQ(pk[i * D + c], e[rows[i] * D + c]);
  std::vector<float> x(D), a(D), b(D);
  for (int64_t i = 0; i < D; ++i) x[i] = u(rng), a[i] = u(rng), b[i] = u(rng);
  Dev<float> dx(x), da(a), db(b);
  ASSERT_TRUE(AddInPlace(dx.get(), da.get(), db.get(), D, nullptr).ok());
  ASSERT_TRUE(AddInPlace(dx.get(), da.get(), nullptr, D, nullptr).ok());
  const std::vector<float> xs = dx.Host();
  for (int64_t i = 0; i < D; ++i) ASSERT_EQ(xs[i], (x[i] + (a[i] + b[i])) + a[i]);
}

// A paged latent cache with random bf16 entries, random block tables and
// queries at many positions (page crossings included).
struct MlaCase {
  LatentCacheShape shape;
  int64_t H = 0, num_seqs = 3, max_pages = 0;
  std::vector<uint16_t> cache, q_lat, q_pe;
  std::vector<int32_t> tables, qseq, qpos;
  float scale = 0.1f;

  MlaCase(int64_t r, int64_t dr, int64_t heads, std::vector<int32_t> positions, uint32_t seed) : H(heads) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-1, 1);
    shape.kv_lora_rank = r;
    shape.rope_dim = dr;
    shape.page_size = 64;
    int64_t max_pos = 0;
    for (int32_t p : positions) max_pos = std::max<int64_t>(max_pos, p);
    max_pages = max_pos / 64 + 1;
    shape.num_pages = num_seqs * max_pages + 2;
    cache.resize(shape.layer_elements());
    for (uint16_t& v : cache) v = FloatToBf16(u(rng));
    // Pages handed out in a shuffled order, as a long-running cache does.
    std::vector<int32_t> pages(shape.num_pages);
    for (int32_t i = 0; i < shape.num_pages; ++i) pages[i] = i;
    std::shuffle(pages.begin(), pages.end(), rng);
    tables.assign(pages.begin(), pages.begin() + num_seqs * max_pages);
    for (size_t i = 0; i < positions.size(); ++i) {
      qseq.push_back(static_cast<int32_t>(i % num_seqs));
      qpos.push_back(positions[i]);
    }
    const int64_t nq = static_cast<int64_t>(positions.size());
    q_lat.resize(nq * H * r);
    q_pe.resize(nq * H * dr);
    for (uint16_t& v : q_lat) v = FloatToBf16(u(rng));
    for (uint16_t& v : q_pe) v = FloatToBf16(u(rng));
    scale = 1.0f / std::sqrt(static_cast<float>(r + dr));
  }

  // float64 reference out [nq, H, r].
  std::vector<double> Reference() const {
    const int64_t r = shape.kv_lora_rank, dr = shape.rope_dim, w = r + dr, nq = static_cast<int64_t>(qpos.size());
    std::vector<double> out(nq * H * r, 0.0);
    for (int64_t q = 0; q < nq; ++q) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row = q * H + h;
        std::vector<double> s(qpos[q] + 1);
        double mx = -INFINITY;
        for (int64_t j = 0; j <= qpos[q]; ++j) {
          const uint16_t* e = cache.data() + (int64_t{tables[qseq[q] * max_pages + j / 64]} * 64 + j % 64) * w;
          double d = 0;
          for (int64_t i = 0; i < r; ++i) d += Bf16ToFloat(q_lat[row * r + i]) * Bf16ToFloat(e[i]);
          for (int64_t i = 0; i < dr; ++i) d += Bf16ToFloat(q_pe[row * dr + i]) * Bf16ToFloat(e[r + i]);
          s[j] = d * scale;
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (double& v : s) sum += (v = std::exp(v - mx));
        for (int64_t j = 0; j <= qpos[q]; ++j) {
          const uint16_t* e = cache.data() + (int64_t{tables[qseq[q] * max_pages + j / 64]} * 64 + j % 64) * w;
          for (int64_t i = 0; i < r; ++i) out[row * r + i] += s[j] / sum * Bf16ToFloat(e[i]);
        }
      }
    }
    return out;
  }
};

std::vector<float> Widen(const std::vector<uint16_t>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) f[i] = Bf16ToFloat(v[i]);
  return f;
}

// f32: the any-dims kernel over a float32 cache and queries holding the same values.
std::vector<float> RunMla(const MlaCase& m, bool tuned, bool f32 = false) {
  Dev<uint16_t> cache(m.cache), q_lat(m.q_lat), q_pe(m.q_pe);
  Dev<float> cache32(Widen(m.cache)), q_lat32(Widen(m.q_lat)), q_pe32(Widen(m.q_pe));
  Dev<int32_t> tables(m.tables), qseq(m.qseq), qpos(m.qpos);
  const int64_t nq = static_cast<int64_t>(m.qpos.size());
  Dev<float> out(nq * m.H * m.shape.kv_lora_rank);
  MlaAttentionParams p;
  p.shape = m.shape;
  p.cache = cache.get();
  p.q_lat = q_lat.get();
  p.q_pe = q_pe.get();
  if (f32) {
    p.shape.elem_type = OutType::kF32;
    p.cache = cache32.get();
    p.q_lat = q_lat32.get();
    p.q_pe = q_pe32.get();
  }
  p.num_queries = nq;
  p.num_heads = m.H;
  p.query_seq = qseq.get();
  p.query_pos = qpos.get();
  p.block_tables = tables.get();
  p.max_pages_per_seq = m.max_pages;
  for (int32_t q : m.qpos) p.max_context_len = std::max<int64_t>(p.max_context_len, q + 1);
  p.scale = m.scale;
  p.out = out.get();
  absl::Status st;
  if (tuned) {
    const int splits = MlaAttentionNumSplits(nq, m.H, p.max_context_len, 0);
    p.num_splits = splits;
    p.workspace_bytes = MlaAttentionWorkspaceBytes(nq, m.H, m.shape.kv_lora_rank, splits);
    Dev<uint8_t> ws(std::max<size_t>(p.workspace_bytes, 1));
    p.workspace = ws.get();
    st = MlaAttention(p, nullptr);
    EXPECT_TRUE(st.ok()) << st;
    return out.Host();
  }
  st = MlaAttentionAnyDims(p, nullptr);
  EXPECT_TRUE(st.ok()) << st;
  return out.Host();
}

double MaxRel(const std::vector<float>& a, const std::vector<double>& ref) {
  double mx = 0, diff = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    mx = std::max(mx, std::fabs(ref[i]));
    diff = std::max(diff, std::fabs(a[i] - ref[i]));
  }
  return std::isfinite(diff) ? diff / mx : INFINITY;
}

TEST_F(CudaBackendKernelsTest, MlaAnyDimsMatchesFloat64AtTinyDims) {
  // tiny-v3's dims; positions 0, page edges 63/64, and beyond two pages.
  MlaCase m(32, 8, 4, {0, 1, 62, 63, 64, 65, 127, 128, 200, 255}, 5);
  const std::vector<float> got = RunMla(m, false);
  const double rel = MaxRel(got, m.Reference());
  EXPECT_LE(rel, 1e-5);
  const double rel32 = MaxRel(RunMla(m, false, /*f32=*/true), m.Reference());
  EXPECT_LE(rel32, 1e-5);
  std::printf("[cuda mla any-dims] tiny dims: max relative error vs float64 %.3g (bf16 cache), %.3g (float32 cache)\n",
              rel, rel32);
}

TEST_F(CudaBackendKernelsTest, MlaAnyDimsAgreesWithTheTunedKernelAtV3Dims) {
  MlaCase m(512, 64, 16, {0, 63, 64, 300, 1000, 70}, 9);
  const std::vector<double> ref = m.Reference();
  const double any = MaxRel(RunMla(m, false), ref), tuned = MaxRel(RunMla(m, true), ref);
  EXPECT_LE(any, 1e-5);
  EXPECT_LE(tuned, 2e-2);  // bf16 probabilities on the tensor cores
  std::printf("[cuda mla any-dims] 512/64 dims: any-dims %.3g, tuned %.3g max relative error vs float64\n", any, tuned);
}

}  // namespace
}  // namespace dmoe::cuda
