#include "core/safetensors_writer.h"

#include <cstdio>
#include <fstream>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace dmoe {

int64_t TensorToWrite::nbytes() const {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  return numel * DTypeSize(dtype);
}

absl::Status WriteSafetensors(const std::filesystem::path& file, const std::vector<TensorToWrite>& tensors) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  std::map<std::string, const TensorToWrite*> sorted;
  for (const TensorToWrite& t : tensors) sorted[t.name] = &t;
  uint64_t offset = 0;
  for (const auto& [name, t] : sorted) {
    if (!t->produce && static_cast<int64_t>(t->bytes.size()) != t->nbytes()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': ", t->bytes.size(),
                                                     " bytes do not match its dtype and shape"));
    }
    const uint64_t size = static_cast<uint64_t>(t->nbytes());
    header[name] = {{"dtype", std::string(DTypeName(t->dtype))},
                    {"shape", t->shape},
                    {"data_offsets", {offset, offset + size}}};
    offset += size;
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat(file.string(), ": cannot write"));
  const uint64_t n = text.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& [name, t] : sorted) {
    if (t->produce && t->bytes.empty()) {
      const std::vector<uint8_t> bytes = t->produce();
      if (static_cast<int64_t>(bytes.size()) != t->nbytes()) {
        return absl::InternalError(absl::StrCat("tensor '", name, "': producer gave ", bytes.size(), " bytes"));
      }
      out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    } else {
      out.write(reinterpret_cast<const char*>(t->bytes.data()), static_cast<std::streamsize>(t->bytes.size()));
    }
  }
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat(file.string(), ": write failed"));
  return absl::OkStatus();
}

absl::Status WriteCheckpoint(const std::filesystem::path& dir, const std::vector<TensorToWrite>& tensors,
                             int64_t shard_bytes) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  std::vector<std::vector<TensorToWrite>> shards(1);
  int64_t cur = 0;
  for (const TensorToWrite& t : tensors) {
    if (cur > 0 && shard_bytes > 0 && cur + t.nbytes() > shard_bytes) {
      shards.emplace_back();
      cur = 0;
    }
    shards.back().push_back(t);
    cur += t.nbytes();
  }
  if (shards.size() == 1) {
    std::filesystem::remove(dir / "model.safetensors.index.json", ec);
    return WriteSafetensors(dir / "model.safetensors", shards[0]);
  }
  std::filesystem::remove(dir / "model.safetensors", ec);
  nlohmann::ordered_json index;
  index["metadata"] = {{"total_size", 0}};
  int64_t total = 0;
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string name = absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, shards.size());
    DMOE_RETURN_IF_ERROR(WriteSafetensors(dir / name, shards[s]));
    for (const TensorToWrite& t : shards[s]) {
      index["weight_map"][t.name] = name;
      total += t.nbytes();
    }
  }
  index["metadata"]["total_size"] = total;
  std::ofstream out(dir / "model.safetensors.index.json");
  out << index.dump(2) << "\n";
  if (!out) return absl::DataLossError(absl::StrCat((dir / "model.safetensors.index.json").string(), ": write failed"));
  return absl::OkStatus();
}

}  // namespace dmoe
