#include "tests/core/reference_model.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/synthetic_checkpoint.h"
#include "gtest/gtest.h"

namespace dmoe::testing {
namespace {

using Vec = std::vector<double>;

struct Weights {
  const TensorStore& store;
  std::array<int64_t, 2> block;
  std::map<std::string, Vec> cache;
  const Vec& Get(const std::string& name) {
    auto it = cache.find(name);
    if (it != cache.end()) return it->second;
    auto v = ReadAsFloats(store, name, block);
    EXPECT_TRUE(v.ok()) << v.status();
    Vec d(v->begin(), v->end());
    return cache[name] = std::move(d);
  }
};

// y = W x for W [out, in].
Vec Apply(const Vec& w, const Vec& x) {
  const size_t in = x.size(), out = w.size() / in;
  Vec y(out, 0.0);
  for (size_t i = 0; i < out; ++i)
    for (size_t j = 0; j < in; ++j) y[i] += w[i * in + j] * x[j];
  return y;
}

Vec Norm(const Vec& x, const Vec& w, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double inv = 1.0 / std::sqrt(ss / x.size() + eps);
  Vec y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = w[i] * x[i] * inv;
  return y;
}

Vec Mlp(Weights& w, const std::string& p, const Vec& x) {
  Vec g = Apply(w.Get(p + "gate_proj.weight"), x);
  const Vec u = Apply(w.Get(p + "up_proj.weight"), x);
  for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
  return Apply(w.Get(p + "down_proj.weight"), g);
}

double Mscale(double s, double mu) { return s <= 1 ? 1.0 : 0.1 * mu * std::log(s) + 1.0; }

struct RopeTables {
  Vec inv_freq;
  double attention_factor = 1, scale = 1;
};

RopeTables MakeRope(const ModelConfig& c) {
  RopeTables t;
  const int64_t dr = c.qk_rope_head_dim;
  t.scale = 1.0 / std::sqrt(static_cast<double>(c.qk_head_dim()));
  for (int64_t i = 0; i < dr / 2; ++i) t.inv_freq.push_back(std::pow(c.rope_theta, -2.0 * i / dr));
  const RopeScaling& y = c.rope_scaling;
  if (!y.yarn) return t;
  const double f = y.factor, l0 = static_cast<double>(y.original_max_position_embeddings);
  auto corr = [&](double b) { return dr * std::log(l0 / (2 * M_PI * b)) / (2 * std::log(c.rope_theta)); };
  double lo = corr(y.beta_fast), hi = corr(y.beta_slow);
  if (y.truncate) {
    lo = std::floor(lo);
    hi = std::ceil(hi);
  }
  lo = std::max(lo, 0.0);
  hi = std::min(hi, static_cast<double>(dr - 1));
  if (lo == hi) hi += 0.001;
  for (int64_t i = 0; i < dr / 2; ++i) {
    const double ramp = std::clamp((i - lo) / (hi - lo), 0.0, 1.0);
    t.inv_freq[i] = t.inv_freq[i] / f * ramp + t.inv_freq[i] * (1 - ramp);
  }
  if (y.attention_factor) {
    t.attention_factor = *y.attention_factor;
  } else if (y.mscale.value_or(0) != 0 && y.mscale_all_dim.value_or(0) != 0) {
    t.attention_factor = Mscale(f, *y.mscale) / Mscale(f, *y.mscale_all_dim);
  } else {
    t.attention_factor = Mscale(f, 1);
  }
  if (y.mscale_all_dim.value_or(0) != 0) t.scale *= std::pow(Mscale(f, *y.mscale_all_dim), 2);
  return t;
}

void Rotate(const ModelConfig& c, const RopeTables& t, int64_t pos, double* y) {
  const int64_t half = c.qk_rope_head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const double ang = pos * t.inv_freq[i];
    const double cs = std::cos(ang) * t.attention_factor, sn = std::sin(ang) * t.attention_factor;
    double& a = c.rope_interleave ? y[2 * i] : y[i];
    double& b = c.rope_interleave ? y[2 * i + 1] : y[i + half];
    const double av = a, bv = b;
    a = av * cs - bv * sn;
    b = bv * cs + av * sn;
  }
}

std::vector<int> TopIndices(const Vec& v, size_t k) {
  std::vector<int> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return v[a] > v[b]; });
  idx.resize(k);
  return idx;
}

}  // namespace

void ReferenceGate(const ModelConfig& c, const Vec& z, const Vec& bias, std::vector<int>& experts, Vec& weights) {
  const size_t E = z.size(), k = c.num_experts_per_tok;
  Vec s(E);
  const bool v3 = c.model_type == ModelType::kDeepseekV3;
  if (v3) {
    for (size_t e = 0; e < E; ++e) s[e] = 1 / (1 + std::exp(-z[e]));
  } else {
    const double mx = *std::max_element(z.begin(), z.end());
    double sum = 0;
    for (size_t e = 0; e < E; ++e) sum += s[e] = std::exp(z[e] - mx);
    for (double& v : s) v /= sum;
  }
  Vec u = s;
  for (size_t e = 0; e < bias.size(); ++e) u[e] += bias[e];
  if (c.topk_method != TopkMethod::kGreedy) {
    const size_t G = c.n_group, per = E / G;
    Vec gs(G);
    for (size_t g = 0; g < G; ++g) {
      Vec grp(u.begin() + g * per, u.begin() + (g + 1) * per);
      std::sort(grp.rbegin(), grp.rend());
      gs[g] = v3 ? grp[0] + grp[1] : grp[0];
    }
    const std::vector<int> kept = TopIndices(gs, c.topk_group);
    for (size_t e = 0; e < E; ++e) {
      if (std::find(kept.begin(), kept.end(), static_cast<int>(e / per)) == kept.end()) u[e] = 0;
    }
  }
  experts = TopIndices(u, k);
  std::sort(experts.begin(), experts.end());
  double denom = 0;
  for (int e : experts) denom += s[e];
  weights.clear();
  for (int e : experts) {
    double w = s[e];
    if (v3 && c.norm_topk_prob) w /= denom + 1e-20;
    weights.push_back(w * c.routed_scaling_factor);
  }
}

std::vector<float> ReferenceLogits(const ModelConfig& c, const TensorStore& store, const std::vector<int32_t>& ids) {
  Weights w{store, c.fp8_weight_block_size.value_or(std::array<int64_t, 2>{128, 128}), {}};
  const int64_t D = c.hidden_size, H = c.num_attention_heads, dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim;
  const int64_t dq = dn + dr, dv = c.v_head_dim, r = c.kv_lora_rank, T = static_cast<int64_t>(ids.size());
  const RopeTables rope = MakeRope(c);
  const Vec& embed = w.Get("model.embed_tokens.weight");
  std::vector<Vec> x(T);
  for (int64_t t = 0; t < T; ++t) x[t] = Vec(embed.begin() + ids[t] * D, embed.begin() + (ids[t] + 1) * D);

  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    const std::string a = p + "self_attn.";
    std::vector<Vec> q(T), k_nope(T), v(T), k_pe(T);
    for (int64_t t = 0; t < T; ++t) {
      const Vec h = Norm(x[t], w.Get(p + "input_layernorm.weight"), c.rms_norm_eps);
      if (c.q_lora_rank == 0) {
        q[t] = Apply(w.Get(a + "q_proj.weight"), h);
      } else {
        q[t] = Apply(w.Get(a + "q_b_proj.weight"),
                     Norm(Apply(w.Get(a + "q_a_proj.weight"), h), w.Get(a + "q_a_layernorm.weight"), 1e-6));
      }
      for (int64_t hh = 0; hh < H; ++hh) Rotate(c, rope, t, &q[t][hh * dq + dn]);
      const Vec kva = Apply(w.Get(a + "kv_a_proj_with_mqa.weight"), h);
      const Vec latent = Norm(Vec(kva.begin(), kva.begin() + r), w.Get(a + "kv_a_layernorm.weight"), 1e-6);
      k_pe[t] = Vec(kva.begin() + r, kva.end());
      Rotate(c, rope, t, k_pe[t].data());
      const Vec kv = Apply(w.Get(a + "kv_b_proj.weight"), latent);
      k_nope[t] = kv;  // [H * (dn + dv)], read per head below
    }
    std::vector<Vec> attn_out(T);
    for (int64_t t = 0; t < T; ++t) {
      Vec o(H * dv, 0.0);
      for (int64_t hh = 0; hh < H; ++hh) {
        Vec s(t + 1);
        for (int64_t j = 0; j <= t; ++j) {
          double dot = 0;
          for (int64_t i = 0; i < dn; ++i) dot += q[t][hh * dq + i] * k_nope[j][hh * (dn + dv) + i];
          for (int64_t i = 0; i < dr; ++i) dot += q[t][hh * dq + dn + i] * k_pe[j][i];
          s[j] = rope.scale * dot;
        }
        const double mx = *std::max_element(s.begin(), s.end());
        double sum = 0;
        for (double& e : s) sum += e = std::exp(e - mx);
        for (int64_t j = 0; j <= t; ++j)
          for (int64_t i = 0; i < dv; ++i) o[hh * dv + i] += s[j] / sum * k_nope[j][hh * (dn + dv) + dn + i];
      }
      attn_out[t] = Apply(w.Get(a + "o_proj.weight"), o);
    }
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t i = 0; i < D; ++i) x[t][i] += attn_out[t][i];
      const Vec h = Norm(x[t], w.Get(p + "post_attention_layernorm.weight"), c.rms_norm_eps);
      Vec ffn;
      if (!c.is_moe_layer(l)) {
        ffn = Mlp(w, p + "mlp.", h);
      } else {
        const Vec z = Apply(w.Get(p + "mlp.gate.weight"), h);
        Vec bias;
        if (c.model_type == ModelType::kDeepseekV3) bias = w.Get(p + "mlp.gate.e_score_correction_bias");
        std::vector<int> experts;
        Vec weights;
        ReferenceGate(c, z, bias, experts, weights);
        ffn.assign(D, 0.0);
        for (size_t i = 0; i < experts.size(); ++i) {
          const Vec y = Mlp(w, absl::StrCat(p, "mlp.experts.", experts[i], "."), h);
          for (int64_t d = 0; d < D; ++d) ffn[d] += weights[i] * y[d];
        }
        if (c.n_shared_experts > 0) {
          const Vec y = Mlp(w, p + "mlp.shared_experts.", h);
          for (int64_t d = 0; d < D; ++d) ffn[d] += y[d];
        }
      }
      for (int64_t i = 0; i < D; ++i) x[t][i] += ffn[i];
    }
  }
  const Vec& head = store.Find("lm_head.weight") != nullptr ? w.Get("lm_head.weight") : embed;
  std::vector<float> logits;
  for (int64_t t = 0; t < T; ++t) {
    const Vec y = Apply(head, Norm(x[t], w.Get("model.norm.weight"), c.rms_norm_eps));
    logits.insert(logits.end(), y.begin(), y.end());
  }
  return logits;
}

}  // namespace dmoe::testing
