// Random checkpoints in the hub layout (config.json, safetensors, the
// bundled tokenizer) with the real dimensions of DeepSeek models, so that
// benchmarks and tests get real-size models without downloads; and the
// dtype encoders (BF16, FP8 block-scaled) they and checkpoint conversions use.
#ifndef DMOE_CORE_SYNTHETIC_CHECKPOINT_H_
#define DMOE_CORE_SYNTHETIC_CHECKPOINT_H_

#include <array>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/config.h"
#include "core/dtype.h"
#include "core/safetensors.h"
#include "core/safetensors_writer.h"

namespace dmoe {

struct SyntheticModelOptions {
  // tiny (tiny-v3's dimensions), v2-lite-shape (DeepSeek-V2-Lite's),
  // v3-shape (DeepSeek-V3's).
  std::string preset = "tiny";
  // 0: the preset's own depth. With fewer layers than the real model,
  // first_k_dense_replace is capped at layers - 1 so one MoE layer remains.
  int64_t num_layers = 0;
  // kF32, kBF16, or kF8E4M3 (projections FP8 block-scaled, the rest BF16,
  // as DeepSeek-V3's release).
  DType dtype = DType::kBF16;
  uint64_t seed = 0;
  int64_t shard_bytes = 4ll << 30;
  // Only config.json and the tokenizer, no weights: a model directory for
  // --load-format dummy (the weights are generated where they are used).
  bool config_only = false;
};

// The preset's config.json text. INVALID_ARGUMENT for an unknown preset.
absl::StatusOr<std::string> SyntheticConfigJson(const SyntheticModelOptions& options);

// Writes config.json, the weights, tokenizer.json and tokenizer_config.json
// into `out_dir`, logging progress per tensor group.
absl::Status WriteSyntheticModel(const SyntheticModelOptions& options, const std::filesystem::path& out_dir);

// Writes random weights for any config of the family (same initialization
// as the presets) plus config.json and the bundled tokenizer.
absl::Status WriteRandomModel(const std::string& config_json, DType dtype, uint64_t seed,
                              const std::filesystem::path& out_dir, int64_t shard_bytes = 4ll << 30);

// One tensor of a random model: its hub name and shape, and the uniform
// distribution center ± half_width its values are drawn from.
struct RandomTensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  float center = 0.f, half_width = 0.f;
};
// Every tensor of a random model of `config` (WriteRandomModel's and
// --load-format dummy's), in a fixed order.
std::vector<RandomTensorSpec> RandomTensorSpecs(const ModelConfig& config);
// The values of a tensor: element i of chunk c = i / kRandomTensorChunk is
// center + half_width * (2u - 1) with u = (z >> 11) * 2^-53 in double, z the
// (i % kRandomTensorChunk + 1)-th SplitMix64 output from the state
// RandomTensorKey(name, seed) ^ (c * 0xd1b54a32d192ed03). Stated exactly so
// that a GPU generates the same values (core/cuda).
inline constexpr int64_t kRandomTensorChunk = 1 << 16;
uint64_t RandomTensorKey(const std::string& name, uint64_t seed);
std::vector<float> RandomTensorValues(const RandomTensorSpec& spec, uint64_t seed);

// True for the weights DeepSeek-V3's FP8 release stores block-scaled: every
// attention and MLP/expert projection ("*_proj.weight", "*_proj_with_mqa.weight").
bool IsFp8Projection(const std::string& name);

// Encodes float values [rows, cols] (or a vector) as `dtype`; for kF8E4M3
// also emits `<name>_scale_inv` with the given block size.
std::vector<TensorToWrite> EncodeTensor(const std::string& name, const std::vector<float>& values,
                                        const std::vector<int64_t>& shape, DType dtype,
                                        std::array<int64_t, 2> block = {128, 128});

// Every tensor of `store` as float32 values (FP8 dequantized with its scales).
absl::StatusOr<std::vector<float>> ReadAsFloats(const TensorStore& store, const std::string& name,
                                                std::array<int64_t, 2> block = {128, 128});

// The bundled tokenizer (tiny-v3's byte-level BPE), compiled in.
const std::string& BundledTokenizerJson();
const std::string& BundledTokenizerConfigJson();

}  // namespace dmoe

#endif  // DMOE_CORE_SYNTHETIC_CHECKPOINT_H_
