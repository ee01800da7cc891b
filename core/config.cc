#include "core/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

using json = nlohmann::json;

absl::Status FieldError(const std::string& field, const json& value, const std::string& why) {
  return absl::InvalidArgumentError(
      absl::StrCat("config.json: ", field, " = ", value.dump(), ": ", why));
}

// Present and not null.
bool Has(const json& j, const char* key) { return j.contains(key) && !j[key].is_null(); }

absl::StatusOr<int64_t> GetInt(const json& j, const char* key, int64_t def) {
  if (!Has(j, key)) return def;
  const json& v = j[key];
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
    return FieldError(key, v, "out of range");
  }
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float()) {
    // 2048.0 is an integer; 1e300 or 0.5 are not (and casting 1e300 would be UB).
    const double d = v.get<double>();
    if (d >= -0x1p63 && d < 0x1p63 && d == std::trunc(d)) return static_cast<int64_t>(d);
  }
  return FieldError(key, v, "expected an integer");
}

// Sizes far beyond any model (DeepSeek-V3's largest is 163840 positions) are
// refused so that products of two or three sizes cannot overflow int64.
constexpr int64_t kMaxSize = int64_t{1} << 24;

absl::StatusOr<double> GetDouble(const json& j, const char* key, double def) {
  if (!Has(j, key)) return def;
  const json& v = j[key];
  if (!v.is_number()) return FieldError(key, v, "expected a number");
  return v.get<double>();
}

absl::StatusOr<bool> GetBool(const json& j, const char* key, bool def) {
  if (!Has(j, key)) return def;
  const json& v = j[key];
  if (!v.is_boolean()) return FieldError(key, v, "expected true or false");
  return v.get<bool>();
}

absl::StatusOr<std::string> GetString(const json& j, const char* key, const std::string& def) {
  if (!Has(j, key)) return def;
  const json& v = j[key];
  if (!v.is_string()) return FieldError(key, v, "expected a string");
  return v.get<std::string>();
}

absl::Status RequirePositive(const char* field, int64_t v) {
  if (v <= 0) return FieldError(field, json(v), "must be positive");
  if (v > kMaxSize) return FieldError(field, json(v), absl::StrCat("exceeds the limit of ", kMaxSize));
  return absl::OkStatus();
}

absl::Status ParseRopeScaling(const json& root, ModelConfig& c) {
  // transformers 5 saves the dict as rope_parameters; both mean the same.
  const json* rs = nullptr;
  const char* key = "rope_scaling";
  if (Has(root, "rope_scaling")) {
    rs = &root["rope_scaling"];
  } else if (Has(root, "rope_parameters")) {
    rs = &root["rope_parameters"];
    key = "rope_parameters";
  }
  if (rs == nullptr) return absl::OkStatus();
  if (!rs->is_object()) return FieldError(key, *rs, "expected an object or null");
  std::string type;
  if (Has(*rs, "rope_type")) {
    DMOE_ASSIGN_OR_RETURN(type, GetString(*rs, "rope_type", ""));
  } else if (Has(*rs, "type")) {
    DMOE_ASSIGN_OR_RETURN(type, GetString(*rs, "type", ""));
  } else {
    type = "default";
  }
  if (Has(*rs, "rope_theta")) {
    DMOE_ASSIGN_OR_RETURN(c.rope_theta, GetDouble(*rs, "rope_theta", c.rope_theta));
  }
  if (type == "default") return absl::OkStatus();
  if (type != "yarn") {
    return FieldError(absl::StrCat(key, ".type"), json(type), "unsupported rope type (supported: default, yarn)");
  }
  RopeScaling& y = c.rope_scaling;
  y.yarn = true;
  if (!Has(*rs, "original_max_position_embeddings")) {
    return FieldError(absl::StrCat(key, ".original_max_position_embeddings"), json(nullptr),
                      "required for yarn");
  }
  DMOE_ASSIGN_OR_RETURN(y.original_max_position_embeddings,
                        GetInt(*rs, "original_max_position_embeddings", 0));
  DMOE_RETURN_IF_ERROR(RequirePositive(absl::StrCat(key, ".original_max_position_embeddings").c_str(),
                                       y.original_max_position_embeddings));
  if (Has(*rs, "factor")) {
    DMOE_ASSIGN_OR_RETURN(y.factor, GetDouble(*rs, "factor", 1.0));
  } else {
    y.factor = static_cast<double>(c.max_position_embeddings) /
               static_cast<double>(y.original_max_position_embeddings);
  }
  if (!(y.factor > 0)) return FieldError(absl::StrCat(key, ".factor"), json(y.factor), "must be positive");
  // Absent, null or 0 take the default.
  DMOE_ASSIGN_OR_RETURN(double bf, GetDouble(*rs, "beta_fast", 0.0));
  DMOE_ASSIGN_OR_RETURN(double bs, GetDouble(*rs, "beta_slow", 0.0));
  y.beta_fast = bf != 0.0 ? bf : 32.0;
  y.beta_slow = bs != 0.0 ? bs : 1.0;
  if (Has(*rs, "mscale")) {
    DMOE_ASSIGN_OR_RETURN(double v, GetDouble(*rs, "mscale", 0.0));
    y.mscale = v;
  }
  if (Has(*rs, "mscale_all_dim")) {
    DMOE_ASSIGN_OR_RETURN(double v, GetDouble(*rs, "mscale_all_dim", 0.0));
    y.mscale_all_dim = v;
  }
  if (Has(*rs, "attention_factor")) {
    DMOE_ASSIGN_OR_RETURN(double v, GetDouble(*rs, "attention_factor", 0.0));
    y.attention_factor = v;
  }
  DMOE_ASSIGN_OR_RETURN(y.truncate, GetBool(*rs, "truncate", true));
  return absl::OkStatus();
}

absl::Status Validate(const ModelConfig& c) {
  DMOE_RETURN_IF_ERROR(RequirePositive("vocab_size", c.vocab_size));
  DMOE_RETURN_IF_ERROR(RequirePositive("hidden_size", c.hidden_size));
  DMOE_RETURN_IF_ERROR(RequirePositive("num_hidden_layers", c.num_hidden_layers));
  DMOE_RETURN_IF_ERROR(RequirePositive("num_attention_heads", c.num_attention_heads));
  DMOE_RETURN_IF_ERROR(RequirePositive("kv_lora_rank", c.kv_lora_rank));
  DMOE_RETURN_IF_ERROR(RequirePositive("qk_nope_head_dim", c.qk_nope_head_dim));
  DMOE_RETURN_IF_ERROR(RequirePositive("qk_rope_head_dim", c.qk_rope_head_dim));
  DMOE_RETURN_IF_ERROR(RequirePositive("v_head_dim", c.v_head_dim));
  DMOE_RETURN_IF_ERROR(RequirePositive("max_position_embeddings", c.max_position_embeddings));
  if (c.qk_rope_head_dim % 2 != 0) {
    return FieldError("qk_rope_head_dim", json(c.qk_rope_head_dim), "must be even");
  }
  if (c.q_lora_rank < 0 || c.q_lora_rank > kMaxSize) {
    return FieldError("q_lora_rank", json(c.q_lora_rank), absl::StrCat("must be null or in [1, ", kMaxSize, "]"));
  }
  if (!(c.rms_norm_eps > 0)) return FieldError("rms_norm_eps", json(c.rms_norm_eps), "must be positive");
  if (!(c.rope_theta > 0)) return FieldError("rope_theta", json(c.rope_theta), "must be positive");
  if (c.first_k_dense_replace < 0) {
    return FieldError("first_k_dense_replace", json(c.first_k_dense_replace), "must be >= 0");
  }
  const bool any_dense = !c.has_moe() || c.first_k_dense_replace > 0;
  if (any_dense) DMOE_RETURN_IF_ERROR(RequirePositive("intermediate_size", c.intermediate_size));
  if (!c.has_moe()) return absl::OkStatus();

  DMOE_RETURN_IF_ERROR(RequirePositive("moe_intermediate_size", c.moe_intermediate_size));
  if (c.num_experts_per_tok > c.n_routed_experts) {
    return FieldError("num_experts_per_tok", json(c.num_experts_per_tok),
                      absl::StrCat("exceeds n_routed_experts = ", c.n_routed_experts));
  }
  if (c.n_shared_experts < 0 || c.n_shared_experts > kMaxSize) {
    return FieldError("n_shared_experts", json(c.n_shared_experts), absl::StrCat("must be in [0, ", kMaxSize, "]"));
  }
  if (!(c.routed_scaling_factor > 0)) {
    return FieldError("routed_scaling_factor", json(c.routed_scaling_factor), "must be positive");
  }
  const bool grouped = c.topk_method != TopkMethod::kGreedy;
  if (grouped) {
    DMOE_RETURN_IF_ERROR(RequirePositive("n_group", c.n_group));
    if (c.n_routed_experts % c.n_group != 0) {
      return FieldError("n_routed_experts", json(c.n_routed_experts),
                        absl::StrCat("not divisible by n_group = ", c.n_group));
    }
    if (c.topk_group < 1 || c.topk_group > c.n_group) {
      return FieldError("topk_group", json(c.topk_group),
                        absl::StrCat("must be in [1, n_group = ", c.n_group, "]"));
    }
    const int64_t per_group = c.n_routed_experts / c.n_group;
    if (c.topk_group * per_group < c.num_experts_per_tok) {
      return FieldError("topk_group", json(c.topk_group),
                        absl::StrCat("topk_group * n_routed_experts / n_group = ",
                                     c.topk_group * per_group, " < num_experts_per_tok = ",
                                     c.num_experts_per_tok));
    }
    if (c.topk_method == TopkMethod::kNoauxTc && per_group < 2) {
      return FieldError("n_group", json(c.n_group),
                        "noaux_tc needs at least 2 experts per group (group score = top-2 sum)");
    }
  }
  return absl::OkStatus();
}

}  // namespace

bool ModelConfig::IsEos(int64_t token) const {
  return std::find(eos_token_ids.begin(), eos_token_ids.end(), token) != eos_token_ids.end();
}

absl::StatusOr<ModelConfig> ModelConfig::FromJson(const std::string& json_text) {
  json root = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return absl::InvalidArgumentError("config.json: not valid JSON");
  if (!root.is_object()) return absl::InvalidArgumentError("config.json: expected a JSON object");

  ModelConfig c;
  if (!Has(root, "model_type")) {
    return absl::InvalidArgumentError("config.json: model_type is missing (expected deepseek_v2 or deepseek_v3)");
  }
  DMOE_ASSIGN_OR_RETURN(c.model_type_name, GetString(root, "model_type", ""));
  if (c.model_type_name == "deepseek_v3") {
    c.model_type = ModelType::kDeepseekV3;
  } else if (c.model_type_name == "deepseek_v2") {
    c.model_type = ModelType::kDeepseekV2;
  } else {
    return FieldError("model_type", json(c.model_type_name),
                      "unsupported (supported: deepseek_v2, deepseek_v3)");
  }
  const bool v3 = c.model_type == ModelType::kDeepseekV3;

  DMOE_ASSIGN_OR_RETURN(c.vocab_size, GetInt(root, "vocab_size", v3 ? 129280 : 32000));
  DMOE_ASSIGN_OR_RETURN(c.hidden_size, GetInt(root, "hidden_size", v3 ? 7168 : 4096));
  DMOE_ASSIGN_OR_RETURN(c.intermediate_size, GetInt(root, "intermediate_size", v3 ? 18432 : 11008));
  DMOE_ASSIGN_OR_RETURN(c.moe_intermediate_size, GetInt(root, "moe_intermediate_size", v3 ? 2048 : 1407));
  DMOE_ASSIGN_OR_RETURN(c.num_hidden_layers, GetInt(root, "num_hidden_layers", v3 ? 61 : 32));
  DMOE_ASSIGN_OR_RETURN(c.num_attention_heads, GetInt(root, "num_attention_heads", v3 ? 128 : 32));
  DMOE_ASSIGN_OR_RETURN(int64_t kv_heads, GetInt(root, "num_key_value_heads", c.num_attention_heads));
  if (kv_heads != c.num_attention_heads) {
    return FieldError("num_key_value_heads", json(kv_heads),
                      absl::StrCat("must equal num_attention_heads = ", c.num_attention_heads));
  }
  // q_lora_rank: null means no query compression; absent means the default.
  if (root.contains("q_lora_rank") && root["q_lora_rank"].is_null()) {
    c.q_lora_rank = 0;
  } else {
    DMOE_ASSIGN_OR_RETURN(c.q_lora_rank, GetInt(root, "q_lora_rank", 1536));
    if (c.q_lora_rank <= 0) return FieldError("q_lora_rank", root["q_lora_rank"], "must be positive or null");
  }
  DMOE_ASSIGN_OR_RETURN(c.kv_lora_rank, GetInt(root, "kv_lora_rank", 512));
  DMOE_ASSIGN_OR_RETURN(c.qk_nope_head_dim, GetInt(root, "qk_nope_head_dim", 128));
  DMOE_ASSIGN_OR_RETURN(c.qk_rope_head_dim, GetInt(root, "qk_rope_head_dim", 64));
  DMOE_ASSIGN_OR_RETURN(c.v_head_dim, GetInt(root, "v_head_dim", 128));

  // n_routed_experts or num_experts_per_tok null: no MoE.
  const bool experts_null = root.contains("n_routed_experts") && root["n_routed_experts"].is_null();
  const bool k_null = root.contains("num_experts_per_tok") && root["num_experts_per_tok"].is_null();
  DMOE_ASSIGN_OR_RETURN(c.n_routed_experts, GetInt(root, "n_routed_experts", v3 ? 256 : 64));
  if (v3) {
    DMOE_ASSIGN_OR_RETURN(c.num_experts_per_tok, GetInt(root, "num_experts_per_tok", 8));
  } else {
    DMOE_ASSIGN_OR_RETURN(c.num_experts_per_tok, GetInt(root, "num_experts_per_tok", 0));
  }
  if (experts_null || k_null || c.num_experts_per_tok == 0) {
    c.n_routed_experts = 0;
    c.num_experts_per_tok = 0;
  } else {
    DMOE_RETURN_IF_ERROR(RequirePositive("n_routed_experts", c.n_routed_experts));
    DMOE_RETURN_IF_ERROR(RequirePositive("num_experts_per_tok", c.num_experts_per_tok));
  }
  // n_shared_experts: 0 or null means none (unlike most keys, null is not "absent").
  if (root.contains("n_shared_experts") && root["n_shared_experts"].is_null()) {
    c.n_shared_experts = 0;
  } else {
    DMOE_ASSIGN_OR_RETURN(c.n_shared_experts, GetInt(root, "n_shared_experts", v3 ? 1 : 2));
  }
  DMOE_ASSIGN_OR_RETURN(c.n_group, GetInt(root, "n_group", v3 ? 8 : 1));
  DMOE_ASSIGN_OR_RETURN(c.topk_group, GetInt(root, "topk_group", v3 ? 4 : 1));

  DMOE_ASSIGN_OR_RETURN(std::string topk_method, GetString(root, "topk_method", v3 ? "noaux_tc" : "greedy"));
  DMOE_ASSIGN_OR_RETURN(std::string scoring, GetString(root, "scoring_func", v3 ? "sigmoid" : "softmax"));
  if (v3) {
    if (topk_method != "noaux_tc") {
      return FieldError("topk_method", json(topk_method), "unsupported for deepseek_v3 (supported: noaux_tc)");
    }
    if (scoring != "sigmoid") {
      return FieldError("scoring_func", json(scoring), "unsupported for deepseek_v3 (supported: sigmoid)");
    }
    c.topk_method = TopkMethod::kNoauxTc;
    c.scoring_func = ScoringFunc::kSigmoid;
  } else {
    if (topk_method == "greedy") {
      c.topk_method = TopkMethod::kGreedy;
    } else if (topk_method == "group_limited_greedy") {
      c.topk_method = TopkMethod::kGroupLimitedGreedy;
    } else {
      return FieldError("topk_method", json(topk_method),
                        "unsupported for deepseek_v2 (supported: greedy, group_limited_greedy)");
    }
    if (scoring != "softmax") {
      return FieldError("scoring_func", json(scoring), "unsupported for deepseek_v2 (supported: softmax)");
    }
    c.scoring_func = ScoringFunc::kSoftmax;
  }
  DMOE_ASSIGN_OR_RETURN(c.norm_topk_prob, GetBool(root, "norm_topk_prob", v3));
  if (!v3 && c.norm_topk_prob) {
    return FieldError("norm_topk_prob", json(true),
                      "unsupported for deepseek_v2 (transformers ignores it, DeepSeek code honours it)");
  }
  DMOE_ASSIGN_OR_RETURN(c.routed_scaling_factor, GetDouble(root, "routed_scaling_factor", v3 ? 2.5 : 1.0));
  DMOE_ASSIGN_OR_RETURN(c.first_k_dense_replace, GetInt(root, "first_k_dense_replace", v3 ? 3 : 0));
  DMOE_ASSIGN_OR_RETURN(int64_t moe_layer_freq, GetInt(root, "moe_layer_freq", 1));
  if (moe_layer_freq != 1) return FieldError("moe_layer_freq", json(moe_layer_freq), "unsupported (must be 1)");
  DMOE_ASSIGN_OR_RETURN(std::string act, GetString(root, "hidden_act", "silu"));
  if (act != "silu") return FieldError("hidden_act", json(act), "unsupported (supported: silu)");
  DMOE_ASSIGN_OR_RETURN(c.rms_norm_eps, GetDouble(root, "rms_norm_eps", 1e-6));
  DMOE_ASSIGN_OR_RETURN(c.rope_theta, GetDouble(root, "rope_theta", 10000.0));
  DMOE_ASSIGN_OR_RETURN(c.max_position_embeddings,
                        GetInt(root, "max_position_embeddings", v3 ? 4096 : 2048));
  DMOE_RETURN_IF_ERROR(ParseRopeScaling(root, c));
  if (v3) {
    DMOE_ASSIGN_OR_RETURN(c.rope_interleave, GetBool(root, "rope_interleave", true));
  } else {
    c.rope_interleave = true;  // deepseek_v2 always pairs (y[2i], y[2i+1])
  }
  DMOE_ASSIGN_OR_RETURN(c.tie_word_embeddings, GetBool(root, "tie_word_embeddings", false));
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    DMOE_ASSIGN_OR_RETURN(bool bias, GetBool(root, key, false));
    if (bias) return FieldError(key, json(true), "unsupported (must be false)");
  }
  DMOE_ASSIGN_OR_RETURN(c.num_nextn_predict_layers, GetInt(root, "num_nextn_predict_layers", 0));
  DMOE_ASSIGN_OR_RETURN(c.bos_token_id, GetInt(root, "bos_token_id", v3 ? 0 : 1));
  if (Has(root, "eos_token_id") && root["eos_token_id"].is_array()) {
    for (const json& v : root["eos_token_id"]) {
      if (!v.is_number_integer()) return FieldError("eos_token_id", root["eos_token_id"], "expected integers");
      c.eos_token_ids.push_back(v.get<int64_t>());
    }
  } else {
    DMOE_ASSIGN_OR_RETURN(int64_t eos, GetInt(root, "eos_token_id", v3 ? 1 : 2));
    c.eos_token_ids.push_back(eos);
  }

  if (Has(root, "quantization_config")) {
    const json& q = root["quantization_config"];
    if (!q.is_object()) return FieldError("quantization_config", q, "expected an object");
    DMOE_ASSIGN_OR_RETURN(std::string method, GetString(q, "quant_method", ""));
    if (method != "fp8") {
      return FieldError("quantization_config.quant_method", q.value("quant_method", json()),
                        "unsupported (supported: fp8)");
    }
    DMOE_ASSIGN_OR_RETURN(std::string fmt, GetString(q, "fmt", "e4m3"));
    if (fmt != "e4m3") return FieldError("quantization_config.fmt", json(fmt), "unsupported (supported: e4m3)");
    DMOE_ASSIGN_OR_RETURN(std::string scheme, GetString(q, "activation_scheme", "dynamic"));
    if (scheme != "dynamic") {
      return FieldError("quantization_config.activation_scheme", json(scheme), "unsupported (supported: dynamic)");
    }
    std::array<int64_t, 2> block{128, 128};
    if (Has(q, "weight_block_size")) {
      const json& b = q["weight_block_size"];
      if (!b.is_array() || b.size() != 2 || !b[0].is_number_integer() || !b[1].is_number_integer() ||
          b[0].get<int64_t>() <= 0 || b[1].get<int64_t>() <= 0) {
        return FieldError("quantization_config.weight_block_size", b, "expected two positive integers");
      }
      block = {b[0].get<int64_t>(), b[1].get<int64_t>()};
    }
    c.fp8_weight_block_size = block;
  }
  DMOE_RETURN_IF_ERROR(Validate(c));
  return c;
}

absl::StatusOr<ModelConfig> ModelConfig::Load(const std::filesystem::path& model_dir) {
  const std::filesystem::path path = model_dir / "config.json";
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path.string(), ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  absl::StatusOr<ModelConfig> c = FromJson(ss.str());
  if (!c.ok()) {
    return absl::Status(c.status().code(), absl::StrCat(path.string(), ": ", c.status().message()));
  }
  return c;
}

}  // namespace dmoe
