#include "core/synthetic_checkpoint.h"

#include <cmath>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "core/cpu/parallel.h"
#include "core/log.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

using json = nlohmann::ordered_json;

json TinyConfig() {
  return json::parse(R"({
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
    "num_hidden_layers": 4, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true, "routed_scaling_factor": 2.5,
    "hidden_act": "silu", "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "max_position_embeddings": 256, "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1})");
}

// DeepSeek-V2-Lite's published dimensions.
json V2LiteConfig() {
  return json::parse(R"({
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": null, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
    "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": false, "routed_scaling_factor": 1.0,
    "hidden_act": "silu", "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "max_position_embeddings": 163840, "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1})");
}

// DeepSeek-V3's published dimensions.
json V3Config() {
  return json::parse(R"({
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true, "routed_scaling_factor": 2.5,
    "hidden_act": "silu", "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "max_position_embeddings": 163840, "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1,
    "num_nextn_predict_layers": 1})");
}

}  // namespace

uint64_t RandomTensorKey(const std::string& name, uint64_t seed) {
  uint64_t h = 1469598103934665603ull ^ seed;
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  return h;
}

namespace {

uint64_t SplitMix(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Uniform values in center ± half_width, deterministic per (seed, name),
// generated in parallel chunks.
std::vector<float> RandomValues(const std::string& name, int64_t n, uint64_t seed, float center, float half_width) {
  std::vector<float> v(n);
  constexpr int64_t kChunk = kRandomTensorChunk;
  const uint64_t base = RandomTensorKey(name, seed);
  cpu::ParallelFor((n + kChunk - 1) / kChunk, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      uint64_t state = base ^ (static_cast<uint64_t>(c) * 0xd1b54a32d192ed03ull);
      const int64_t end = std::min(n, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < end; ++i) {
        const double u = static_cast<double>(SplitMix(state) >> 11) * 0x1.0p-53;  // [0, 1)
        v[i] = center + half_width * static_cast<float>(2.0 * u - 1.0);
      }
    }
  });
  return v;
}

using Spec = RandomTensorSpec;

}  // namespace

std::vector<float> RandomTensorValues(const RandomTensorSpec& spec, uint64_t seed) {
  int64_t numel = 1;
  for (int64_t d : spec.shape) numel *= d;
  return RandomValues(spec.name, numel, seed, spec.center, spec.half_width);
}

std::vector<RandomTensorSpec> RandomTensorSpecs(const ModelConfig& c) {
  const int64_t D = c.hidden_size, H = c.num_attention_heads, dq = c.qk_head_dim();
  const int64_t r = c.kv_lora_rank, dr = c.qk_rope_head_dim, dn = c.qk_nope_head_dim, dv = c.v_head_dim;
  auto proj = [](int64_t in) { return std::sqrt(3.0f / static_cast<float>(in)); };
  std::vector<Spec> specs;
  specs.push_back({"model.embed_tokens.weight", {c.vocab_size, D}, 0.f, 1.f});
  specs.push_back({"model.norm.weight", {D}, 1.f, 0.1f});
  if (!c.tie_word_embeddings) specs.push_back({"lm_head.weight", {c.vocab_size, D}, 0.f, proj(D)});
  auto mlp = [&](const std::string& p, int64_t width) {
    specs.push_back({p + "gate_proj.weight", {width, D}, 0.f, proj(D)});
    specs.push_back({p + "up_proj.weight", {width, D}, 0.f, proj(D)});
    specs.push_back({p + "down_proj.weight", {D, width}, 0.f, proj(width)});
  };
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    specs.push_back({p + "input_layernorm.weight", {D}, 1.f, 0.1f});
    specs.push_back({p + "post_attention_layernorm.weight", {D}, 1.f, 0.1f});
    const std::string a = p + "self_attn.";
    if (c.q_lora_rank == 0) {
      specs.push_back({a + "q_proj.weight", {H * dq, D}, 0.f, proj(D)});
    } else {
      specs.push_back({a + "q_a_proj.weight", {c.q_lora_rank, D}, 0.f, proj(D)});
      specs.push_back({a + "q_a_layernorm.weight", {c.q_lora_rank}, 1.f, 0.1f});
      specs.push_back({a + "q_b_proj.weight", {H * dq, c.q_lora_rank}, 0.f, proj(c.q_lora_rank)});
    }
    specs.push_back({a + "kv_a_proj_with_mqa.weight", {r + dr, D}, 0.f, proj(D)});
    specs.push_back({a + "kv_a_layernorm.weight", {r}, 1.f, 0.1f});
    specs.push_back({a + "kv_b_proj.weight", {H * (dn + dv), r}, 0.f, proj(r)});
    specs.push_back({a + "o_proj.weight", {D, H * dv}, 0.f, proj(H * dv)});
    if (!c.is_moe_layer(l)) {
      mlp(p + "mlp.", c.intermediate_size);
      continue;
    }
    specs.push_back({p + "mlp.gate.weight", {c.n_routed_experts, D}, 0.f, proj(D)});
    if (c.model_type == ModelType::kDeepseekV3) {
      specs.push_back({p + "mlp.gate.e_score_correction_bias", {c.n_routed_experts}, 0.f, 0.01f});
    }
    for (int64_t e = 0; e < c.n_routed_experts; ++e) mlp(absl::StrCat(p, "mlp.experts.", e, "."), c.moe_intermediate_size);
    if (c.n_shared_experts > 0) mlp(p + "mlp.shared_experts.", c.n_shared_experts * c.moe_intermediate_size);
  }
  return specs;
}

namespace {

std::vector<uint8_t> Bytes(const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  return std::vector<uint8_t>(b, b + n);
}

absl::Status WriteText(const std::filesystem::path& file, const std::string& text) {
  std::ofstream out(file, std::ios::trunc);
  out << text;
  out.close();
  if (!out) return absl::PermissionDeniedError(absl::StrCat(file.string(), ": cannot write"));
  return absl::OkStatus();
}

}  // namespace

bool IsFp8Projection(const std::string& name) {
  return absl::EndsWith(name, "_proj.weight") || absl::EndsWith(name, "_proj_with_mqa.weight");
}

std::vector<TensorToWrite> EncodeTensor(const std::string& name, const std::vector<float>& values,
                                        const std::vector<int64_t>& shape, DType dtype,
                                        std::array<int64_t, 2> block) {
  std::vector<TensorToWrite> out(1);
  TensorToWrite& t = out[0];
  t.name = name;
  t.dtype = dtype;
  t.shape = shape;
  switch (dtype) {
    case DType::kF32:
      t.bytes = Bytes(values.data(), values.size() * 4);
      break;
    case DType::kBF16:
    case DType::kF16: {
      std::vector<uint16_t> h(values.size());
      for (size_t i = 0; i < values.size(); ++i) {
        h[i] = dtype == DType::kBF16 ? FloatToBf16(values[i]) : FloatToF16(values[i]);
      }
      t.bytes = Bytes(h.data(), h.size() * 2);
      break;
    }
    case DType::kF8E4M3: {
      // Per-block scale = amax / 448 (the E4M3 maximum), as DeepSeek's quantizer.
      const int64_t rows = shape[0], cols = shape.size() > 1 ? shape[1] : 1;
      const int64_t sr = (rows + block[0] - 1) / block[0], sc = (cols + block[1] - 1) / block[1];
      std::vector<float> scale(sr * sc, 0.f);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) {
          float& s = scale[(i / block[0]) * sc + j / block[1]];
          s = std::max(s, std::fabs(values[i * cols + j]));
        }
      for (float& s : scale) s = s > 0 ? s / 448.0f : 1.0f;
      t.bytes.resize(values.size());
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) {
          t.bytes[i * cols + j] = FloatToFp8E4M3(values[i * cols + j] / scale[(i / block[0]) * sc + j / block[1]]);
        }
      TensorToWrite s;
      s.name = name + "_scale_inv";
      s.dtype = DType::kF32;
      s.shape = {sr, sc};
      s.bytes = Bytes(scale.data(), scale.size() * 4);
      out.push_back(std::move(s));
      break;
    }
  }
  return out;
}

absl::StatusOr<std::vector<float>> ReadAsFloats(const TensorStore& store, const std::string& name,
                                                std::array<int64_t, 2> block) {
  const TensorInfo* t = store.Find(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("tensor '", name, "' is missing"));
  if (t->dtype == DType::kF8E4M3) {
    const TensorInfo* s = store.Find(name + "_scale_inv");
    if (s == nullptr || s->dtype != DType::kF32 || t->shape.size() != 2) {
      return absl::DataLossError(absl::StrCat("tensor '", name, "': FP8 without F32 scale_inv"));
    }
    return DequantizeFp8(t->data, t->shape[0], t->shape[1], reinterpret_cast<const float*>(s->data), block[0],
                         block[1]);
  }
  std::vector<float> v(t->numel());
  for (int64_t i = 0; i < t->numel(); ++i) {
    uint16_t h;
    switch (t->dtype) {
      case DType::kF32:
        std::memcpy(&v[i], t->data + 4 * i, 4);
        break;
      case DType::kBF16:
        std::memcpy(&h, t->data + 2 * i, 2);
        v[i] = Bf16ToFloat(h);
        break;
      case DType::kF16:
        std::memcpy(&h, t->data + 2 * i, 2);
        v[i] = F16ToFloat(h);
        break;
      case DType::kF8E4M3:
        break;
    }
  }
  return v;
}

absl::StatusOr<std::string> SyntheticConfigJson(const SyntheticModelOptions& o) {
  json config;
  if (o.preset == "tiny") {
    config = TinyConfig();
  } else if (o.preset == "v2-lite-shape") {
    config = V2LiteConfig();
  } else if (o.preset == "v3-shape") {
    config = V3Config();
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown preset '", o.preset, "' (presets: tiny, v2-lite-shape, v3-shape)"));
  }
  if (o.num_layers < 0) return absl::InvalidArgumentError(absl::StrCat("layers = ", o.num_layers, " must be positive"));
  if (o.num_layers > 0) {
    config["num_hidden_layers"] = o.num_layers;
    const int64_t dense = config["first_k_dense_replace"].get<int64_t>();
    if (o.num_layers > 1 && dense >= o.num_layers) config["first_k_dense_replace"] = o.num_layers - 1;
  }
  switch (o.dtype) {
    case DType::kF32: config["torch_dtype"] = "float32"; break;
    case DType::kBF16: config["torch_dtype"] = "bfloat16"; break;
    case DType::kF8E4M3:
      config["torch_dtype"] = "bfloat16";
      config["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e4m3"},
                                       {"weight_block_size", {128, 128}}, {"activation_scheme", "dynamic"}};
      break;
    case DType::kF16:
      return absl::InvalidArgumentError("dtype f16 is not offered by make-model (f32, bf16, fp8)");
  }
  return config.dump(2) + "\n";
}

absl::Status WriteSyntheticModel(const SyntheticModelOptions& o, const std::filesystem::path& out_dir) {
  DMOE_ASSIGN_OR_RETURN(std::string config_text, SyntheticConfigJson(o));
  if (o.config_only) {
    std::error_code ec;
    std::filesystem::create_directories(out_dir, ec);
    if (ec) return absl::PermissionDeniedError(absl::StrCat(out_dir.string(), ": cannot create: ", ec.message()));
    DMOE_RETURN_IF_ERROR(WriteText(out_dir / "config.json", config_text));
    DMOE_RETURN_IF_ERROR(WriteText(out_dir / "tokenizer.json", BundledTokenizerJson()));
    DMOE_RETURN_IF_ERROR(WriteText(out_dir / "tokenizer_config.json", BundledTokenizerConfigJson()));
    DMOE_LOG(kInfo, "make-model") << "preset " << o.preset << ": config and tokenizer only (for --load-format dummy) in "
                                  << out_dir.string();
    return absl::OkStatus();
  }
  DMOE_LOG(kInfo, "make-model") << "preset " << o.preset << ", " << DTypeName(o.dtype) << ", seed " << o.seed;
  return WriteRandomModel(config_text, o.dtype, o.seed, out_dir, o.shard_bytes);
}

absl::Status WriteRandomModel(const std::string& config_text, DType model_dtype, uint64_t seed,
                              const std::filesystem::path& out_dir, int64_t shard_bytes) {
  DMOE_ASSIGN_OR_RETURN(ModelConfig config, ModelConfig::FromJson(config_text));
  if (model_dtype == DType::kF8E4M3 && !config.fp8_weight_block_size.has_value()) {
    return absl::InvalidArgumentError("FP8 weights need quantization_config in config.json");
  }
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(out_dir.string(), ": cannot create: ", ec.message()));
  DMOE_RETURN_IF_ERROR(WriteText(out_dir / "config.json", config_text));
  DMOE_RETURN_IF_ERROR(WriteText(out_dir / "tokenizer.json", BundledTokenizerJson()));
  DMOE_RETURN_IF_ERROR(WriteText(out_dir / "tokenizer_config.json", BundledTokenizerConfigJson()));

  std::vector<TensorToWrite> tensors;
  int64_t total = 0;
  const std::array<int64_t, 2> block = config.fp8_weight_block_size.value_or(std::array<int64_t, 2>{128, 128});
  for (const Spec& spec : RandomTensorSpecs(config)) {
    const DType dtype = model_dtype == DType::kF8E4M3
                            ? (IsFp8Projection(spec.name) ? DType::kF8E4M3 : DType::kBF16)
                        : spec.shape.size() == 1 ? DType::kF32  // norms and biases stay float32
                                                 : model_dtype;
    int64_t numel = 1;
    for (int64_t d : spec.shape) numel *= d;
    // An FP8 weight and its scales are produced from the same draw (drawn twice).
    const int parts = dtype == DType::kF8E4M3 ? 2 : 1;
    for (int part = 0; part < parts; ++part) {
      TensorToWrite t;
      t.name = part == 0 ? spec.name : spec.name + "_scale_inv";
      t.dtype = part == 0 ? dtype : DType::kF32;
      t.shape = part == 0 ? spec.shape
                          : std::vector<int64_t>{(spec.shape[0] + block[0] - 1) / block[0],
                                                 (spec.shape[1] + block[1] - 1) / block[1]};
      t.produce = [spec, dtype, numel, seed, block, part] {
        const std::vector<float> v = RandomValues(spec.name, numel, seed, spec.center, spec.half_width);
        return std::move(EncodeTensor(spec.name, v, spec.shape, dtype, block)[part].bytes);
      };
      total += t.nbytes();
      tensors.push_back(std::move(t));
    }
  }
  // Progress: one line per 10% of the bytes written.
  auto written = std::make_shared<int64_t>(0);
  for (TensorToWrite& t : tensors) {
    t.produce = [inner = std::move(t.produce), written, total, size = t.nbytes()] {
      std::vector<uint8_t> bytes = inner();
      const int64_t before = *written;
      *written += size;
      if (total > (64ll << 20) && (before * 10) / total != (*written * 10) / total) {
        DMOE_LOG(kInfo, "make-model") << "written " << *written / (1 << 20) << " / " << total / (1 << 20) << " MiB ("
                                      << 100 * *written / total << "%)";
      }
      return bytes;
    };
  }
  DMOE_LOG(kInfo, "make-model") << "writing " << tensors.size() << " tensors (" << total / (1 << 20) << " MiB) to "
                                << out_dir.string();
  DMOE_RETURN_IF_ERROR(WriteCheckpoint(out_dir, tensors, shard_bytes));
  DMOE_LOG(kInfo, "make-model") << "wrote " << out_dir.string();
  return absl::OkStatus();
}

}  // namespace dmoe
