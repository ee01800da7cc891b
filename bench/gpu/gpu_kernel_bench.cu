// GPU kernel benchmarks (one run prints a table and writes JSON + markdown):
//  1. device-to-device copy bandwidth (the memory ceiling, bytes read + written);
//  2. MLA absorbed decode over the paged bf16 latent cache at DeepSeek-V3
//     attention dims (128 heads, kv_lora 512, rope 64), batch x context grid:
//     time, achieved GB/s (latent bytes read + q + out) and TFLOP/s;
//  3. routed experts: dmoe's grouped GEMM and cuBLAS grouped GEMM for the
//     gate_up and down products at V2-Lite and V3 expert dims, the whole
//     MoE pipeline with each, and one cuBLAS GEMM of equal FLOPs.
// Inputs are random (never zeros); small working sets rotate over several
// copies so repeated runs do not measure the L2 cache.
//   gpu_kernel_bench --json out.json --md out.md [--quick]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/cuda/kernels.h"

// Writes what was measured so far, then exits 1 (any failed call).
void WritePartialAndExit();

namespace dmoe::cuda {
namespace {

#define CK(expr)                                                                                 \
  do {                                                                                           \
    cudaError_t e_ = (expr);                                                                     \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      WritePartialAndExit();                                                                     \
    }                                                                                            \
  } while (0)
#define CS(expr)                                                                                            \
  do {                                                                                                      \
    absl::Status s_ = (expr);                                                                               \
    if (!s_.ok()) {                                                                                         \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, std::string(s_.message()).c_str()); \
      WritePartialAndExit();                                                                                \
    }                                                                                                       \
  } while (0)

__global__ void FillRandomBf16(uint16_t* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n; i += size_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed ^ static_cast<uint32_t>(i >> 32) * 40503u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    const float u = (h & 0xFFFFFF) / 16777216.0f * 2.f - 1.f;
    const float v = u * scale;
    p[i] = static_cast<uint16_t>(__float_as_uint(v) >> 16);
  }
}

void RandomBf16(void* p, size_t n, uint32_t seed, float scale = 1.f) {
  FillRandomBf16<<<4096, 256>>>(static_cast<uint16_t*>(p), n, seed, scale);
  CK(cudaGetLastError());
}

void* Alloc(size_t bytes) {
  void* p = nullptr;
  CK(cudaMalloc(&p, bytes));
  return p;
}

// Median milliseconds per call of fn over `batches` batches of `reps` calls
// (events around each batch: back-to-back launches as in serving).
template <typename F>
double TimeMs(F fn, int reps = 20, int batches = 5) {
  for (int i = 0; i < 3; ++i) fn(i);
  CK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<double> ms;
  for (int bt = 0; bt < batches; ++bt) {
    CK(cudaEventRecord(a));
    for (int r = 0; r < reps; ++r) fn(bt * reps + r);
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float t = 0;
    CK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t / reps);
  }
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Out {
  std::string json = "{\n";
  std::string md;
  std::string json_path, md_path;
};
Out* g_out = nullptr;

void WriteFiles(const Out& out, bool partial) {
  if (!out.json_path.empty()) {
    FILE* f = std::fopen(out.json_path.c_str(), "w");
    if (f) {
      std::fputs(out.json.c_str(), f);
      if (partial) std::fputs("\n\"error\": \"run stopped early, see stderr\"\n}\n", f);
      std::fclose(f);
    }
  }
  if (!out.md_path.empty()) {
    FILE* f = std::fopen(out.md_path.c_str(), "w");
    if (f) {
      std::fputs(out.md.c_str(), f);
      if (partial) std::fputs("\n**The run stopped early (an error; see the log).**\n", f);
      std::fclose(f);
    }
  }
}

std::string Fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

double CopyBandwidth(Out& out) {
  const size_t bytes = size_t{2} << 30;
  void* src = Alloc(bytes);
  void* dst = Alloc(bytes);
  RandomBf16(src, bytes / 2, 1);
  const double ms = TimeMs([&](int) { CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); }, 10, 5);
  const double gbs = 2.0 * bytes / (ms * 1e-3) / 1e9;
  CK(cudaFree(src));
  CK(cudaFree(dst));
  out.json += "  \"copy\": {\"bytes_each_way\": " + std::to_string(bytes) + ", \"ms\": " + Fmt("%.4f", ms) +
              ", \"gbps_read_plus_write\": " + Fmt("%.1f", gbs) + "},\n";
  out.md += "## Device-to-device copy\n\ncudaMemcpyAsync of 2 GiB, bytes read + written: **" + Fmt("%.0f", gbs) +
            " GB/s** (" + Fmt("%.3f", ms) + " ms per copy, median of 5 batches of 10).\n\n";
  std::printf("copy: %.0f GB/s (read+write)\n", gbs);
  return gbs;
}

void MlaDecode(Out& out, double copy_gbs, const char* key, const char* title, int64_t H, std::vector<int64_t> batches,
               std::vector<int64_t> contexts, int head_block = 0, bool allow_wgmma = true) {
  constexpr int64_t R = 512, DR = 64, W = R + DR, PAGE = 64;
  int64_t max_tokens = 0, max_b = 0;
  for (int64_t b : batches)
    for (int64_t c : contexts) max_tokens = std::max(max_tokens, b * ((c + 63) / 64 * 64));
  for (int64_t b : batches) max_b = std::max(max_b, b);
  const int64_t pool_pages = max_tokens / PAGE + 64;
  LatentCacheShape shape;
  shape.kv_lora_rank = R;
  shape.rope_dim = DR;
  shape.page_size = PAGE;
  shape.num_pages = pool_pages;
  uint16_t* cache = static_cast<uint16_t*>(Alloc(shape.layer_elements() * 2));
  RandomBf16(cache, shape.layer_elements(), 2);
  uint16_t* q_lat = static_cast<uint16_t*>(Alloc(max_b * H * R * 2));
  uint16_t* q_pe = static_cast<uint16_t*>(Alloc(max_b * H * DR * 2));
  RandomBf16(q_lat, max_b * H * R, 3);
  RandomBf16(q_pe, max_b * H * DR, 4);
  float* o = static_cast<float*>(Alloc(max_b * H * R * 4));
  float* lse = static_cast<float*>(Alloc(max_b * H * 4));
  std::vector<int32_t> qseq(max_b);
  std::iota(qseq.begin(), qseq.end(), 0);
  int32_t* d_qseq = static_cast<int32_t*>(Alloc(max_b * 4));
  int32_t* d_qpos = static_cast<int32_t*>(Alloc(max_b * 4));
  CK(cudaMemcpy(d_qseq, qseq.data(), max_b * 4, cudaMemcpyHostToDevice));
  std::mt19937 rng(5);
  out.json += std::string("  \"") + key + "\": [\n";
  out.md += std::string("## ") + title +
            "\n\n"
            "Bytes = latent cache read (B x ctx x 1152) + q (bf16) + out (fp32) + LSE. "
            "% copy = GB/s over the copy bandwidth above.\n\n"
            "| batch | context | splits | kernel | time (us) | GB/s | % copy | TFLOP/s |\n|---|---|---|---|---|---|---|---|\n";
  std::printf("\n%s\nMLA decode  B  ctx  splits  kernel  us  GB/s  %%copy  TFLOP/s\n", title);
  bool first = true;
  for (int64_t B : batches) {
    for (int64_t ctx : contexts) {
      const int64_t pages_per_seq = (ctx + PAGE - 1) / PAGE;
      const int64_t need = B * pages_per_seq;
      const int sets = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(8, pool_pages / need)));
      // Each set: its own shuffled pages, so a rotation reads fresh memory.
      std::vector<int32_t> tables(int64_t{sets} * B * pages_per_seq);
      for (int s = 0; s < sets; ++s) {
        std::vector<int32_t> pages(need);
        std::iota(pages.begin(), pages.end(), static_cast<int32_t>(s * need));
        std::shuffle(pages.begin(), pages.end(), rng);
        std::copy(pages.begin(), pages.end(), tables.begin() + int64_t{s} * need);
      }
      int32_t* d_tables = static_cast<int32_t*>(Alloc(tables.size() * 4));
      CK(cudaMemcpy(d_tables, tables.data(), tables.size() * 4, cudaMemcpyHostToDevice));
      std::vector<int32_t> qpos(B, static_cast<int32_t>(ctx - 1));
      CK(cudaMemcpy(d_qpos, qpos.data(), B * 4, cudaMemcpyHostToDevice));
      MlaAttentionParams p;
      p.shape = shape;
      p.cache = cache;
      p.q_lat = q_lat;
      p.q_pe = q_pe;
      p.num_queries = B;
      p.num_heads = H;
      p.query_seq = d_qseq;
      p.query_pos = d_qpos;
      p.max_pages_per_seq = pages_per_seq;
      p.max_context_len = ctx;
      p.scale = 0.135234f;
      p.out = o;
      p.lse = lse;
      p.head_block = head_block;
      p.allow_wgmma = allow_wgmma;
      const int splits = MlaAttentionSplits(p);
      const size_t ws_bytes = MlaAttentionWorkspaceBytes(B, H, R, splits);
      void* ws = ws_bytes ? Alloc(ws_bytes) : nullptr;
      p.workspace = ws;
      p.workspace_bytes = ws_bytes;
      const char* kernel = MlaAttentionUsesWgmma(p) ? "wgmma" : "mma.sync";
      const double ms = TimeMs([&](int i) {
        MlaAttentionParams pi = p;
        pi.block_tables = d_tables + int64_t{i % sets} * need;
        CS(MlaAttention(pi, nullptr));
      });
      CK(cudaDeviceSynchronize());
      const double bytes = double(B) * ctx * W * 2 + double(B) * H * W * 2 + double(B) * H * (R + 1) * 4;
      const double gbs = bytes / (ms * 1e-3) / 1e9;
      const double tflops = double(B) * ctx * H * (W + R) * 2 / (ms * 1e-3) / 1e12;
      out.json += std::string(first ? "" : ",\n") + "    {\"batch\": " + std::to_string(B) +
                  ", \"context\": " + std::to_string(ctx) + ", \"splits\": " + std::to_string(splits) +
                  ", \"kernel\": \"" + kernel + "\"" +
                  ", \"us\": " + Fmt("%.2f", ms * 1e3) + ", \"gbps\": " + Fmt("%.1f", gbs) +
                  ", \"pct_copy\": " + Fmt("%.1f", 100 * gbs / copy_gbs) + ", \"tflops\": " + Fmt("%.1f", tflops) +
                  ", \"rotated_sets\": " + std::to_string(sets) + "}";
      first = false;
      out.md += "| " + std::to_string(B) + " | " + std::to_string(ctx) + " | " + std::to_string(splits) + " | " + kernel + " | " +
                Fmt("%.1f", ms * 1e3) + " | " + Fmt("%.0f", gbs) + " | " + Fmt("%.1f", 100 * gbs / copy_gbs) + " | " +
                Fmt("%.0f", tflops) + " |\n";
      std::printf("MLA %4ld %6ld %4d %-8s %9.1f %7.0f %5.1f %6.0f\n", long(B), long(ctx), splits, kernel, ms * 1e3, gbs,
                  100 * gbs / copy_gbs, tflops);
      if (ws) CK(cudaFree(ws));
      CK(cudaFree(d_tables));
    }
  }
  out.json += "\n  ],\n";
  out.md += "\n";
  CK(cudaFree(cache));
  CK(cudaFree(q_lat));
  CK(cudaFree(q_pe));
  CK(cudaFree(o));
  CK(cudaFree(lse));
  CK(cudaFree(d_qseq));
  CK(cudaFree(d_qpos));
}

struct MoeDims {
  const char* name;
  int64_t D, I, E, k;
};

void GroupedGemms(Out& out, bool quick) {
  auto blas_or = BlasHandle::Create();
  CS(blas_or.status());
  BlasHandle& blas = **blas_or;
  const std::vector<MoeDims> models = {{"V2-Lite", 2048, 1408, 64, 6}, {"V3", 7168, 2048, 256, 8}};
  const std::vector<int64_t> token_counts =
      quick ? std::vector<int64_t>{64, 4096} : std::vector<int64_t>{64, 512, 4096};
  out.json += "  \"grouped_gemm\": [\n";
  out.md +=
      "## Routed experts: grouped GEMM (bf16 in, fp32 accumulate)\n\n"
      "Tokens routed uniformly at random (top-k distinct experts each). gate_up: [rows, D] x [2I, D]^T per "
      "expert; down: [rows, I] x [D, I]^T. TFLOP/s counts 2*rows*N*K. 'weights GB/s' = bytes of the touched "
      "experts' weights over the time (the bound at few tokens per expert). 'dense cuBLAS' = one cuBLASLt GEMM "
      "[rows, D] x [2I, D]^T of the same FLOPs (one weight). 'pipeline' = MoeExperts end to end (permute, "
      "gather, both GEMMs, SwiGLU, weighted combine).\n\n"
      "'tile rows' = the rows per tile dmoe picks (16, 64: mma.sync; 128: wgmma 128 x 256 tiles); the two "
      "columns after its time force 64-row mma.sync and 128-row wgmma tiles.\n\n"
      "| model | tokens | rows | product | tile rows | dmoe us | dmoe TFLOP/s | 64-row mma.sync us | "
      "128-row wgmma us | dmoe weights GB/s | cuBLAS grouped us | "
      "cuBLAS TFLOP/s | dense cuBLAS us | dense TFLOP/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  std::printf("\ngrouped GEMM  model tokens product  dmoe_us TF  cublas_us TF  dense_us TF\n");
  bool first = true;
  std::string pipeline_md =
      "\n| model | tokens | pipeline dmoe kernels (us) | pipeline cuBLAS grouped (us) |\n|---|---|---|---|\n";
  std::mt19937 rng(6);
  for (const MoeDims& m : models) {
    const size_t gu_elems = size_t(m.E) * 2 * m.I * m.D, d_elems = size_t(m.E) * m.D * m.I;
    uint16_t* w_gu = static_cast<uint16_t*>(Alloc(gu_elems * 2));
    uint16_t* w_d = static_cast<uint16_t*>(Alloc(d_elems * 2));
    RandomBf16(w_gu, gu_elems, 7, 0.05f);
    RandomBf16(w_d, d_elems, 8, 0.05f);
    const int64_t max_n = token_counts.back();
    uint16_t* a = static_cast<uint16_t*>(Alloc(max_n * m.k * std::max(m.D, m.I) * 2));
    RandomBf16(a, max_n * m.k * std::max(m.D, m.I), 9);
    float* c = static_cast<float*>(Alloc(max_n * m.k * std::max(2 * m.I, m.D) * 4));
    float* x = static_cast<float*>(Alloc(max_n * m.D * 4));
    {
      std::vector<float> hx(max_n * m.D);
      std::uniform_real_distribution<float> u(-1, 1);
      for (auto& v : hx) v = u(rng);
      CK(cudaMemcpy(x, hx.data(), hx.size() * 4, cudaMemcpyHostToDevice));
    }
    for (int64_t n : token_counts) {
      std::vector<int32_t> idx(n * m.k);
      std::vector<float> w(n * m.k, 1.0f / m.k);
      std::vector<int32_t> counts(m.E, 0);
      for (int64_t t = 0; t < n; ++t) {
        std::vector<int32_t> e(m.E);
        std::iota(e.begin(), e.end(), 0);
        for (int64_t j = 0; j < m.k; ++j) {
          std::swap(e[j], e[j + rng() % (m.E - j)]);
          idx[t * m.k + j] = e[j];
          ++counts[e[j]];
        }
      }
      std::vector<int32_t> offsets(m.E + 1, 0);
      for (int64_t e = 0; e < m.E; ++e) offsets[e + 1] = offsets[e] + counts[e];
      const int64_t rows = offsets[m.E];
      int64_t touched = 0;
      for (int32_t cnt : counts) touched += cnt > 0;
      int32_t* d_off = static_cast<int32_t*>(Alloc((m.E + 1) * 4));
      CK(cudaMemcpy(d_off, offsets.data(), (m.E + 1) * 4, cudaMemcpyHostToDevice));
      struct Product {
        const char* name;
        const uint16_t* b;
        int64_t N, K;
      };
      for (const Product& pr : {Product{"gate_up", w_gu, 2 * m.I, m.D}, Product{"down", w_d, m.D, m.I}}) {
        GroupedGemmParams g;
        g.a = a;
        g.b = pr.b;
        g.c = c;
        g.c_type = OutType::kF32;
        g.num_groups = m.E;
        g.n = pr.N;
        g.k = pr.K;
        g.offsets = d_off;
        g.host_offsets = offsets.data();
        g.max_rows = rows;
        g.blas = &blas;
        g.impl = GroupedGemmImpl::kOwn;
        const int tile_rows = GroupedGemmTileRows(g.max_rows, g.num_groups, g.n);
        const double own = TimeMs([&](int) { CS(GroupedGemm(g, nullptr)); });
        // Each of dmoe's tile shapes on this product, beside the default's choice.
        auto own_with = [&](int rows_per_tile) {
          if (rows_per_tile == 128 && !WgmmaAvailable()) return -1.0;
          g.tile_rows = rows_per_tile;
          const double ms = TimeMs([&](int) { CS(GroupedGemm(g, nullptr)); });
          g.tile_rows = 0;
          return ms;
        };
        const double own64 = own_with(64), own128 = own_with(128);
        g.impl = GroupedGemmImpl::kCublas;
        const double cub = TimeMs([&](int) { CS(GroupedGemm(g, nullptr)); });
        GemmParams d{a, pr.b, OutType::kBF16, c, OutType::kF32, rows, pr.N, pr.K};
        const double dense = TimeMs([&](int) { CS(Gemm(blas, d, nullptr)); });
        CK(cudaDeviceSynchronize());
        const double flops = 2.0 * rows * pr.N * pr.K;
        const double wbytes = double(touched) * pr.N * pr.K * 2;
        auto tf = [&](double ms) { return flops / (ms * 1e-3) / 1e12; };
        out.json += std::string(first ? "" : ",\n") + "    {\"model\": \"" + m.name +
                    "\", \"tokens\": " + std::to_string(n) + ", \"rows\": " + std::to_string(rows) +
                    ", \"product\": \"" + pr.name + "\", \"N\": " + std::to_string(pr.N) +
                    ", \"K\": " + std::to_string(pr.K) + ", \"experts_touched\": " + std::to_string(touched) +
                    ", \"tile_rows\": " + std::to_string(tile_rows) + ", \"dmoe_us\": " + Fmt("%.2f", own * 1e3) +
                    ", \"mma_sync_64_us\": " + Fmt("%.2f", own64 * 1e3) +
                    ", \"wgmma_128_us\": " + Fmt("%.2f", own128 * 1e3) + ", \"dmoe_tflops\": " + Fmt("%.1f", tf(own)) +
                    ", \"dmoe_weight_gbps\": " + Fmt("%.0f", wbytes / (own * 1e-3) / 1e9) +
                    ", \"cublas_grouped_us\": " + Fmt("%.2f", cub * 1e3) +
                    ", \"cublas_grouped_tflops\": " + Fmt("%.1f", tf(cub)) +
                    ", \"dense_cublas_us\": " + Fmt("%.2f", dense * 1e3) +
                    ", \"dense_cublas_tflops\": " + Fmt("%.1f", tf(dense)) + "}";
        first = false;
        out.md += std::string("| ") + m.name + " | " + std::to_string(n) + " | " + std::to_string(rows) + " | " +
                  pr.name + " | " + std::to_string(tile_rows) + " | " + Fmt("%.1f", own * 1e3) + " | " +
                  Fmt("%.0f", tf(own)) + " | " + Fmt("%.1f", own64 * 1e3) + " | " +
                  (own128 > 0 ? Fmt("%.1f", own128 * 1e3) + " (" + Fmt("%.0f", tf(own128)) + " TF)" : std::string("-")) +
                  " | " +
                  Fmt("%.0f", wbytes / (own * 1e-3) / 1e9) + " | " + Fmt("%.1f", cub * 1e3) + " | " +
                  Fmt("%.0f", tf(cub)) + " | " + Fmt("%.1f", dense * 1e3) + " | " + Fmt("%.0f", tf(dense)) + " |\n";
        std::printf("GG %-8s %5ld %-8s %9.1f %5.0f %9.1f %5.0f %9.1f %5.0f\n", m.name, long(n), pr.name, own * 1e3,
                    tf(own), cub * 1e3, tf(cub), dense * 1e3, tf(dense));
      }
      // The whole routed-expert pipeline with each GEMM implementation.
      int32_t* d_idx = static_cast<int32_t*>(Alloc(idx.size() * 4));
      float* d_w = static_cast<float*>(Alloc(w.size() * 4));
      float* d_out = static_cast<float*>(Alloc(n * m.D * 4));
      CK(cudaMemcpy(d_idx, idx.data(), idx.size() * 4, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(d_w, w.data(), w.size() * 4, cudaMemcpyHostToDevice));
      const size_t ws_bytes = MoeExpertsWorkspaceBytes(n, m.k, m.E, m.D, m.I);
      void* ws = Alloc(ws_bytes);
      MoeExpertsParams mp;
      mp.x = x;
      mp.n = n;
      mp.top_k = m.k;
      mp.topk_idx = d_idx;
      mp.topk_weights = d_w;
      mp.num_experts = m.E;
      mp.hidden = m.D;
      mp.intermediate = m.I;
      mp.w_gate_up = w_gu;
      mp.w_down = w_d;
      mp.out = d_out;
      mp.workspace = ws;
      mp.workspace_bytes = ws_bytes;
      mp.blas = &blas;
      mp.impl = GroupedGemmImpl::kOwn;
      const double p_own = TimeMs([&](int) { CS(MoeExperts(mp, nullptr)); }, 10, 5);
      mp.impl = GroupedGemmImpl::kCublas;
      const double p_cub = TimeMs([&](int) { CS(MoeExperts(mp, nullptr)); }, 10, 5);
      CK(cudaDeviceSynchronize());
      pipeline_md += std::string("| ") + m.name + " | " + std::to_string(n) + " | " + Fmt("%.1f", p_own * 1e3) + " | " +
                     Fmt("%.1f", p_cub * 1e3) + " |\n";
      out.json += ",\n    {\"model\": \"" + std::string(m.name) + "\", \"tokens\": " + std::to_string(n) +
                  ", \"product\": \"pipeline\", \"dmoe_us\": " + Fmt("%.2f", p_own * 1e3) +
                  ", \"cublas_grouped_us\": " + Fmt("%.2f", p_cub * 1e3) + "}";
      std::printf("MoE pipeline %-8s %5ld  dmoe %9.1f us  cublas %9.1f us\n", m.name, long(n), p_own * 1e3,
                  p_cub * 1e3);
      CK(cudaFree(ws));
      CK(cudaFree(d_idx));
      CK(cudaFree(d_w));
      CK(cudaFree(d_out));
      CK(cudaFree(d_off));
    }
    CK(cudaFree(w_gu));
    CK(cudaFree(w_d));
    CK(cudaFree(a));
    CK(cudaFree(c));
    CK(cudaFree(x));
  }
  out.json += std::string("\n  ],\n  \"cublas_grouped_path\": \"") + CublasGroupedPath(blas) + "\"\n";
  out.md += pipeline_md + "\ncuBLAS grouped path used: " + CublasGroupedPath(blas) + ".\n\n";
}

}  // namespace
}  // namespace dmoe::cuda

void WritePartialAndExit() {
  if (dmoe::cuda::g_out != nullptr) dmoe::cuda::WriteFiles(*dmoe::cuda::g_out, true);
  std::exit(1);
}

int main(int argc, char** argv) {
  dmoe::cuda::Out out;
  dmoe::cuda::g_out = &out;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc)
      out.json_path = argv[++i];
    else if (!std::strcmp(argv[i], "--md") && i + 1 < argc)
      out.md_path = argv[++i];
    else if (!std::strcmp(argv[i], "--quick"))
      quick = true;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  out.json += std::string("  \"device\": \"") + prop.name + "\", \"sms\": " + std::to_string(prop.multiProcessorCount) +
              ", \"l2_bytes\": " + std::to_string(prop.l2CacheSize) + ",\n";
  out.md += std::string("# GPU kernel benchmarks\n\nDevice: ") + prop.name + ", " +
            std::to_string(prop.multiProcessorCount) + " SMs, L2 " + std::to_string(prop.l2CacheSize >> 20) +
            " MiB. Times: median of 5 batches of back-to-back "
            "calls (CUDA events around each batch), after 3 warm-up calls.\n\n";
  const double copy = dmoe::cuda::CopyBandwidth(out);
  using V = std::vector<int64_t>;
  dmoe::cuda::MlaDecode(
      out, copy, "mla_decode",
      "MLA absorbed decode, DeepSeek-V3 attention (H=128, kv_lora 512, rope 64, bf16 latent pages of 64)", 128,
      quick ? V{1, 64} : V{1, 16, 64, 128}, quick ? V{1024, 16384} : V{1024, 4096, 16384});
  dmoe::cuda::MlaDecode(out, copy, "mla_decode_mma_sync",
                        "MLA absorbed decode, DeepSeek-V3 attention, the mma.sync kernel (allow_wgmma = false)", 128,
                        V{16, 64, 128}, V{4096, 16384}, 0, false);
  dmoe::cuda::MlaDecode(out, copy, "mla_decode_v2_lite",
                        "MLA absorbed decode, DeepSeek-V2-Lite attention (H=16, kv_lora 512, rope 64)", 16,
                        V{1, 16, 64, 256}, V{768, 4096});
  dmoe::cuda::MlaDecode(out, copy, "mla_decode_v2_lite_head_block_16",
                        "MLA absorbed decode, DeepSeek-V2-Lite attention (H=16), 16-head blocks (head_block = 16)", 16,
                        V{1, 16, 64, 256}, V{768, 4096}, 16);
  dmoe::cuda::GroupedGemms(out, quick);
  out.json += "}\n";
  dmoe::cuda::WriteFiles(out, false);
  return 0;
}
