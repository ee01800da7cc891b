// Writes safetensors files (single or sharded with an index), for
// `dmoe make-model` and for tests that convert checkpoints.
#ifndef DMOE_CORE_SAFETENSORS_WRITER_H_
#define DMOE_CORE_SAFETENSORS_WRITER_H_

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/dtype.h"

namespace dmoe {

struct TensorToWrite {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // little-endian, row-major, numel * DTypeSize
  // When set (and `bytes` is empty), produces the bytes at write time, so
  // checkpoints larger than memory can be written tensor by tensor.
  std::function<std::vector<uint8_t>()> produce;

  int64_t nbytes() const;
};

// Writes `tensors` to `file` (header padded to 8 bytes, sorted by name).
absl::Status WriteSafetensors(const std::filesystem::path& file, const std::vector<TensorToWrite>& tensors);

// Writes model-0000K-of-0000N.safetensors shards of about `shard_bytes` each
// plus model.safetensors.index.json into `dir`; one shard: model.safetensors.
absl::Status WriteCheckpoint(const std::filesystem::path& dir, const std::vector<TensorToWrite>& tensors,
                             int64_t shard_bytes);

}  // namespace dmoe

#endif  // DMOE_CORE_SAFETENSORS_WRITER_H_
