#include "core/model_weights.h"

#include <chrono>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/match.h"
#include "core/checkpoint.h"
#include "core/log.h"
#include "core/status_macros.h"

namespace dmoe {
namespace {

// Prints "loading checkpoint: 40% (k/n layers)" at most once a second for
// checkpoints large enough for it to matter.
class Progress {
 public:
  Progress(int64_t total_layers, int64_t total_bytes)
      : total_(total_layers), show_(total_bytes > (1ll << 30)), start_(Clock::now()), last_(start_) {}
  void Layer(int64_t done) {
    if (!show_) return;
    const auto now = Clock::now();
    if (now - last_ < std::chrono::seconds(1) && done != total_) return;
    last_ = now;
    DMOE_LOG(kInfo, "core") << absl::StrFormat("loading checkpoint: %d%% (%d/%d layers, %.1f s)",
                                               100 * done / total_, done, total_,
                                               std::chrono::duration<double>(now - start_).count());
  }

 private:
  using Clock = std::chrono::steady_clock;
  int64_t total_;
  bool show_;
  Clock::time_point start_, last_;
};

absl::StatusOr<MlpWeights> ReadMlp(const CheckpointReader& r, const std::string& prefix, int64_t width,
                                   int64_t hidden) {
  MlpWeights m;
  DMOE_ASSIGN_OR_RETURN(m.gate_proj, r.ReadMatrix(prefix + "gate_proj.weight", width, hidden));
  DMOE_ASSIGN_OR_RETURN(m.up_proj, r.ReadMatrix(prefix + "up_proj.weight", width, hidden));
  DMOE_ASSIGN_OR_RETURN(m.down_proj, r.ReadMatrix(prefix + "down_proj.weight", hidden, width));
  return m;
}

// W_UK[h]^T for every head, stacked: [H*r, dn], same dtype as kv_b_proj.
Matrix TransposeUk(const Matrix& kv_b, int64_t heads, int64_t dn, int64_t dv, int64_t r) {
  const int64_t n = heads * r * dn;
  if (kv_b.dtype == DType::kBF16) {
    std::vector<uint16_t> out(n);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t d = 0; d < dn; ++d)
        for (int64_t c = 0; c < r; ++c)
          out[(h * r + c) * dn + d] = kv_b.bf16()[(h * (dn + dv) + d) * r + c];
    return Matrix::FromBf16(std::move(out), heads * r, dn);
  }
  std::vector<float> out(n);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t d = 0; d < dn; ++d)
      for (int64_t c = 0; c < r; ++c) out[(h * r + c) * dn + d] = kv_b.f32()[(h * (dn + dv) + d) * r + c];
  return Matrix::FromFloats(std::move(out), heads * r, dn);
}

absl::Status ReadAttention(const CheckpointReader& rd, const ModelConfig& c, const std::string& p,
                           AttentionWeights& a) {
  const int64_t D = c.hidden_size, H = c.num_attention_heads, dq = c.qk_head_dim();
  const int64_t r = c.kv_lora_rank, dr = c.qk_rope_head_dim, dn = c.qk_nope_head_dim, dv = c.v_head_dim;
  if (c.q_lora_rank == 0) {
    DMOE_ASSIGN_OR_RETURN(a.q_proj, rd.ReadMatrix(p + "q_proj.weight", H * dq, D));
  } else {
    DMOE_ASSIGN_OR_RETURN(a.q_a_proj, rd.ReadMatrix(p + "q_a_proj.weight", c.q_lora_rank, D));
    DMOE_ASSIGN_OR_RETURN(a.q_a_layernorm, rd.ReadVector(p + "q_a_layernorm.weight", c.q_lora_rank));
    DMOE_ASSIGN_OR_RETURN(a.q_b_proj, rd.ReadMatrix(p + "q_b_proj.weight", H * dq, c.q_lora_rank));
  }
  DMOE_ASSIGN_OR_RETURN(a.kv_a_proj_with_mqa, rd.ReadMatrix(p + "kv_a_proj_with_mqa.weight", r + dr, D));
  DMOE_ASSIGN_OR_RETURN(a.kv_a_layernorm, rd.ReadVector(p + "kv_a_layernorm.weight", r));
  DMOE_ASSIGN_OR_RETURN(a.kv_b_proj, rd.ReadMatrix(p + "kv_b_proj.weight", H * (dn + dv), r));
  a.w_uk_t = TransposeUk(a.kv_b_proj, H, dn, dv, r);
  DMOE_ASSIGN_OR_RETURN(a.o_proj, rd.ReadMatrix(p + "o_proj.weight", D, H * dv));
  return absl::OkStatus();
}

// Layer index of "model.layers.<l>.…", or -1.
int64_t LayerIndex(const std::string& name) {
  static const std::string kPrefix = "model.layers.";
  if (!absl::StartsWith(name, kPrefix)) return -1;
  const size_t dot = name.find('.', kPrefix.size());
  int64_t l = -1;
  if (dot == std::string::npos || !absl::SimpleAtoi(name.substr(kPrefix.size(), dot - kPrefix.size()), &l)) return -1;
  return l;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const ModelWeights>> ModelWeights::Load(const std::filesystem::path& model_dir,
                                                                       const WeightSelection& selection) {
  DMOE_ASSIGN_OR_RETURN(ModelConfig config, ModelConfig::Load(model_dir));
  DMOE_ASSIGN_OR_RETURN(std::unique_ptr<TensorStore> store, TensorStore::Open(model_dir));
  return Load(config, *store, selection);
}

absl::StatusOr<std::shared_ptr<const ModelWeights>> ModelWeights::Load(const ModelConfig& c,
                                                                       const TensorStore& store,
                                                                       const WeightSelection& selection) {
  auto w = std::make_shared<ModelWeights>();
  w->config = c;
  const CheckpointReader rd(store, c.fp8_weight_block_size);
  const int64_t D = c.hidden_size, V = c.vocab_size, L = c.num_hidden_layers;

  int64_t skipped = 0, skipped_bytes = 0;
  for (const auto& [name, t] : store.tensors()) {
    if (LayerIndex(name) >= L) {
      ++skipped;
      skipped_bytes += t.nbytes;
    }
  }
  if (skipped > 0) {
    DMOE_LOG(kInfo, "core") << "skipping " << skipped << " tensors (" << skipped_bytes / (1 << 20)
                            << " MiB) of layers >= num_hidden_layers = " << L << " (MTP modules, unused)";
  }

  if (selection.non_expert) {
    DMOE_ASSIGN_OR_RETURN(w->embed_tokens, rd.ReadMatrix("model.embed_tokens.weight", V, D));
    DMOE_ASSIGN_OR_RETURN(w->norm, rd.ReadVector("model.norm.weight", D));
    if (c.tie_word_embeddings && !rd.Has("lm_head.weight")) {
      w->lm_head = w->embed_tokens;
    } else {
      DMOE_ASSIGN_OR_RETURN(w->lm_head, rd.ReadMatrix("lm_head.weight", V, D));
    }
    w->total_bytes += w->embed_tokens.bytes() + (c.tie_word_embeddings ? 0 : w->lm_head.bytes());
  }

  Progress progress(L, store.total_bytes());
  w->layers.resize(L);
  for (int64_t l = 0; l < L; ++l) {
    LayerWeights& lw = w->layers[l];
    const std::string p = absl::StrCat("model.layers.", l, ".");
    if (selection.non_expert) {
      DMOE_ASSIGN_OR_RETURN(lw.input_layernorm, rd.ReadVector(p + "input_layernorm.weight", D));
      DMOE_ASSIGN_OR_RETURN(lw.post_attention_layernorm, rd.ReadVector(p + "post_attention_layernorm.weight", D));
      DMOE_RETURN_IF_ERROR(ReadAttention(rd, c, p + "self_attn.", lw.attn));
      const AttentionWeights& a = lw.attn;
      w->total_bytes += a.q_proj.bytes() + a.q_a_proj.bytes() + a.q_b_proj.bytes() +
                        a.kv_a_proj_with_mqa.bytes() + a.kv_b_proj.bytes() + a.o_proj.bytes();
    }
    if (!c.is_moe_layer(l)) {
      if (selection.non_expert) {
        DMOE_ASSIGN_OR_RETURN(lw.mlp, ReadMlp(rd, p + "mlp.", c.intermediate_size, D));
        w->total_bytes += lw.mlp.bytes();
      }
    } else {
      const int64_t E = c.n_routed_experts;
      if (selection.non_expert) {
        DMOE_ASSIGN_OR_RETURN(lw.moe.router, rd.ReadMatrixF32(p + "mlp.gate.weight", E, D));
        if (c.model_type == ModelType::kDeepseekV3) {
          DMOE_ASSIGN_OR_RETURN(lw.moe.e_score_correction_bias,
                                rd.ReadVector(p + "mlp.gate.e_score_correction_bias", E));
        }
        if (c.n_shared_experts > 0) {
          DMOE_ASSIGN_OR_RETURN(lw.moe.shared_experts, ReadMlp(rd, p + "mlp.shared_experts.",
                                                               c.n_shared_experts * c.moe_intermediate_size, D));
          w->total_bytes += lw.moe.shared_experts.bytes();
        }
      }
      lw.moe.experts.resize(E);
      for (int64_t e = 0; e < E; ++e) {
        if (selection.routed_expert && !selection.routed_expert(l, e)) continue;
        DMOE_ASSIGN_OR_RETURN(lw.moe.experts[e], ReadMlp(rd, absl::StrCat(p, "mlp.experts.", e, "."),
                                                         c.moe_intermediate_size, D));
        ++w->routed_experts_loaded;
        w->routed_expert_bytes += lw.moe.experts[e].bytes();
      }
    }
    progress.Layer(l + 1);
  }
  w->total_bytes += w->routed_expert_bytes;
  return std::shared_ptr<const ModelWeights>(std::move(w));
}

}  // namespace dmoe
