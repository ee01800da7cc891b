#include "core/mla.h"

#include <algorithm>
#include <cmath>

#include "core/cpu/matmul.h"
#include "core/cpu/ops.h"
#include "core/cpu/parallel.h"

namespace dmoe {
namespace {

// The inner norms of MLA always use eps 1e-6 (MODEL_SPEC.md 3.2).
constexpr float kInnerNormEps = 1e-6f;

bool UsesAbsorbed(MlaForm form, const MlaSequence& s) {
  if (form == MlaForm::kAbsorbed) return true;
  if (form == MlaForm::kExpanded) return false;
  return s.num_tokens == 1;
}

struct Dims {
  int64_t D, H, dn, dr, dq, dv, r;
  explicit Dims(const ModelConfig& c)
      : D(c.hidden_size), H(c.num_attention_heads), dn(c.qk_nope_head_dim), dr(c.qk_rope_head_dim),
        dq(c.qk_head_dim()), dv(c.v_head_dim), r(c.kv_lora_rank) {}
};

// Softmax-weighted attention for one query over positions [0, len):
// scores s_j = scale * score_fn(j); returns P in `p`.
template <typename ScoreFn>
void AttentionWeightsFor(int64_t len, float scale, ScoreFn score_fn, std::vector<float>& p) {
  p.resize(len);
  for (int64_t j = 0; j < len; ++j) p[j] = scale * score_fn(j);
  cpu::Softmax(p.data(), len);
}

// Expanded form (3.3) for one sequence: k_nope and v of every cached
// position come from W_kvb c_j; attention per head over positions <= i.
void ExpandedAttention(const Dims& d, const AttentionWeights& w, float scale, int64_t layer, const MlaSequence& s,
                       const float* q, const LatentCache& cache, float* o) {
  const int64_t ctx = s.start_pos + s.num_tokens;
  std::vector<float> latent(ctx * d.r);
  for (int64_t j = 0; j < ctx; ++j) {
    const float* e = cache.Entry(s.seq, layer, j);
    std::copy(e, e + d.r, latent.data() + j * d.r);
  }
  const int64_t kv_width = d.H * (d.dn + d.dv);
  std::vector<float> kv(ctx * kv_width);
  cpu::MatMul(latent.data(), ctx, w.kv_b_proj, kv.data());
  cpu::ParallelFor(d.H * s.num_tokens, 1, [&](int64_t b, int64_t e) {
    std::vector<float> p;
    for (int64_t item = b; item < e; ++item) {
      const int64_t h = item % d.H, i = item / d.H;
      const int64_t len = s.start_pos + i + 1;  // causal: positions <= start_pos + i
      const float* qi = q + (s.row_begin + i) * d.H * d.dq + h * d.dq;
      AttentionWeightsFor(len, scale, [&](int64_t j) {
        const float* k_nope = kv.data() + j * kv_width + h * (d.dn + d.dv);
        const float* k_pe = cache.Entry(s.seq, layer, j) + d.r;
        return cpu::Dot(qi, k_nope, d.dn) + cpu::Dot(qi + d.dn, k_pe, d.dr);
      }, p);
      float* oi = o + (s.row_begin + i) * d.H * d.dv + h * d.dv;
      std::fill(oi, oi + d.dv, 0.0f);
      for (int64_t j = 0; j < len; ++j) {
        cpu::Axpy(p[j], kv.data() + j * kv_width + h * (d.dn + d.dv) + d.dn, oi, d.dv);
      }
    }
  });
}

// Absorbed form (3.5): multi-query attention with queries [q_lat ; q_pe]
// over cache entries [c ; k_pe]; writes u[h] = sum_j P c_j ([r] per head).
void AbsorbedAttention(const Dims& d, float scale, int64_t layer, const MlaSequence& s, const float* query,
                       const LatentCache& cache, float* u) {
  const int64_t width = d.r + d.dr;
  cpu::ParallelFor(d.H * s.num_tokens, 1, [&](int64_t b, int64_t e) {
    std::vector<float> p;
    for (int64_t item = b; item < e; ++item) {
      const int64_t h = item % d.H, i = item / d.H;
      const int64_t len = s.start_pos + i + 1;
      const float* qi = query + ((s.row_begin + i) * d.H + h) * width;
      AttentionWeightsFor(len, scale, [&](int64_t j) {
        return cpu::Dot(qi, cache.Entry(s.seq, layer, j), width);
      }, p);
      float* ui = u + ((s.row_begin + i) * d.H + h) * d.r;
      std::fill(ui, ui + d.r, 0.0f);
      for (int64_t j = 0; j < len; ++j) cpu::Axpy(p[j], cache.Entry(s.seq, layer, j), ui, d.r);
    }
  });
}

}  // namespace

void MlaForward(const ModelConfig& config, const AttentionWeights& w, const Rope& rope, int64_t layer,
                const std::vector<MlaSequence>& sequences, MlaForm form, const float* h, int64_t n,
                LatentCache& cache, float* out) {
  const Dims d(config);
  // Queries: [n, H * dq], rope part rotated below.
  std::vector<float> q(n * d.H * d.dq);
  if (w.q_proj.empty()) {
    std::vector<float> qa(n * config.q_lora_rank);
    cpu::MatMul(h, n, w.q_a_proj, qa.data());
    cpu::RmsNorm(qa.data(), n, config.q_lora_rank, w.q_a_layernorm.data(), kInnerNormEps, qa.data());
    cpu::MatMul(qa.data(), n, w.q_b_proj, q.data());
  } else {
    cpu::MatMul(h, n, w.q_proj, q.data());
  }
  std::vector<float> kva(n * (d.r + d.dr));
  cpu::MatMul(h, n, w.kv_a_proj_with_mqa, kva.data());

  // Cache entries first: a token attends to itself.
  for (const MlaSequence& s : sequences) {
    for (int64_t i = 0; i < s.num_tokens; ++i) {
      const int64_t row = s.row_begin + i, pos = s.start_pos + i;
      float* entry = cache.Entry(s.seq, layer, pos);
      const float* a = kva.data() + row * (d.r + d.dr);
      cpu::RmsNorm(a, 1, d.r, w.kv_a_layernorm.data(), kInnerNormEps, entry);
      std::copy(a + d.r, a + d.r + d.dr, entry + d.r);  // raw slice, not normalized
      rope.Apply(pos, entry + d.r);
      for (int64_t hh = 0; hh < d.H; ++hh) rope.Apply(pos, q.data() + row * d.H * d.dq + hh * d.dq + d.dn);
    }
  }

  const float scale = rope.softmax_scale();
  std::vector<float> o(n * d.H * d.dv);  // head outputs, head-major per token
  std::vector<int64_t> absorbed_rows;
  for (const MlaSequence& s : sequences) {
    if (UsesAbsorbed(form, s)) {
      for (int64_t i = 0; i < s.num_tokens; ++i) absorbed_rows.push_back(s.row_begin + i);
    } else {
      ExpandedAttention(d, w, scale, layer, s, q.data(), cache, o.data());
    }
  }
  if (!absorbed_rows.empty()) {
    // query[row][h] = [W_UK[h]^T q_nope[h] ; q_pe[h]] for the absorbed rows.
    const int64_t width = d.r + d.dr;
    std::vector<float> query(n * d.H * width, 0.0f), u(n * d.H * d.r, 0.0f);
    const int64_t na = static_cast<int64_t>(absorbed_rows.size());
    std::vector<float> q_nope(na * d.dn), q_lat(na * d.r), u_rows(na * d.r), o_rows(na * d.dv);
    for (int64_t hh = 0; hh < d.H; ++hh) {
      for (int64_t i = 0; i < na; ++i) {
        const float* src = q.data() + absorbed_rows[i] * d.H * d.dq + hh * d.dq;
        std::copy(src, src + d.dn, q_nope.data() + i * d.dn);
      }
      cpu::MatMul(q_nope.data(), na, w.w_uk_t.RowSlice(hh * d.r, d.r), q_lat.data());
      for (int64_t i = 0; i < na; ++i) {
        float* dst = query.data() + (absorbed_rows[i] * d.H + hh) * width;
        std::copy(q_lat.data() + i * d.r, q_lat.data() + (i + 1) * d.r, dst);
        const float* pe = q.data() + absorbed_rows[i] * d.H * d.dq + hh * d.dq + d.dn;
        std::copy(pe, pe + d.dr, dst + d.r);
      }
    }
    for (const MlaSequence& s : sequences) {
      if (UsesAbsorbed(form, s)) AbsorbedAttention(d, scale, layer, s, query.data(), cache, u.data());
    }
    // o[h] = W_UV[h] u[h].
    for (int64_t hh = 0; hh < d.H; ++hh) {
      for (int64_t i = 0; i < na; ++i) {
        const float* src = u.data() + (absorbed_rows[i] * d.H + hh) * d.r;
        std::copy(src, src + d.r, u_rows.data() + i * d.r);
      }
      cpu::MatMul(u_rows.data(), na, w.kv_b_proj.RowSlice(hh * (d.dn + d.dv) + d.dn, d.dv), o_rows.data());
      for (int64_t i = 0; i < na; ++i) {
        std::copy(o_rows.data() + i * d.dv, o_rows.data() + (i + 1) * d.dv,
                  o.data() + absorbed_rows[i] * d.H * d.dv + hh * d.dv);
      }
    }
  }
  cpu::MatMul(o.data(), n, w.o_proj, out);
}

}  // namespace dmoe
