// Memory-mapped safetensors checkpoints: one file or shards listed by
// model.safetensors.index.json (MODEL_SPEC.md 2.1).
#ifndef DMOE_CORE_SAFETENSORS_H_
#define DMOE_CORE_SAFETENSORS_H_

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/dtype.h"

namespace dmoe {

// One tensor inside a mapped file. `data` stays valid while the owning
// TensorStore (or any copy of `mapping`) lives.
struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  int64_t nbytes = 0;
  std::string file;  // file name, for error messages
  std::shared_ptr<const void> mapping;

  int64_t numel() const;
  std::string ShapeString() const;  // "[4, 128]"
};

// Every tensor of a checkpoint directory. Opening validates each file's
// header (length bound, JSON, dtype x shape = byte length, offsets inside
// the file, no overlap); errors are DATA_LOSS naming the file and tensor.
// Immutable after Open; safe to share across threads.
class TensorStore {
 public:
  static absl::StatusOr<std::unique_ptr<TensorStore>> Open(const std::filesystem::path& model_dir);
  // Opens one .safetensors file.
  static absl::StatusOr<std::unique_ptr<TensorStore>> OpenFile(const std::filesystem::path& file);

  // A store over tensors held in memory (each keeps its bytes alive
  // through `mapping`), e.g. random weights for --load-format dummy.
  static std::unique_ptr<TensorStore> FromTensors(std::vector<TensorInfo> tensors);

  const TensorInfo* Find(const std::string& name) const;
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  int64_t total_bytes() const;

 private:
  absl::Status AddFile(const std::filesystem::path& file, const std::vector<std::string>* expected);
  std::map<std::string, TensorInfo> tensors_;
};

}  // namespace dmoe

#endif  // DMOE_CORE_SAFETENSORS_H_
