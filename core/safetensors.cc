#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace dmoe {
namespace {

using json = nlohmann::json;

// Headers of real checkpoints are well under a few MiB; refuse absurd sizes
// before allocating.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

struct Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr != nullptr && addr != MAP_FAILED) munmap(addr, size);
  }
};

absl::Status Corrupt(const std::filesystem::path& file, const std::string& what) {
  return absl::DataLossError(absl::StrCat(file.string(), ": ", what));
}

absl::Status CorruptTensor(const std::filesystem::path& file, const std::string& tensor,
                           const std::string& what) {
  return absl::DataLossError(absl::StrCat(file.string(), ": tensor '", tensor, "': ", what));
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorInfo::ShapeString() const { return absl::StrCat("[", absl::StrJoin(shape, ", "), "]"); }

int64_t TensorStore::total_bytes() const {
  int64_t n = 0;
  for (const auto& [name, t] : tensors_) n += t.nbytes;
  return n;
}

const TensorInfo* TensorStore::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::Status TensorStore::AddFile(const std::filesystem::path& file,
                                  const std::vector<std::string>* expected) {
  const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat(file.string(), ": cannot open: ", std::strerror(errno)));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return Corrupt(file, "cannot stat");
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    return Corrupt(file, absl::StrCat("file is ", file_size, " bytes, too short for a safetensors header"));
  }
  auto mapping = std::make_shared<Mapping>();
  mapping->size = file_size;
  mapping->addr = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (mapping->addr == MAP_FAILED) return Corrupt(file, absl::StrCat("mmap failed: ", std::strerror(errno)));
  const auto* base = static_cast<const uint8_t*>(mapping->addr);

  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);  // little-endian on every supported host
  if (header_len > kMaxHeaderBytes || header_len > file_size - 8) {
    return Corrupt(file, absl::StrCat("header length ", header_len, " exceeds the file (", file_size,
                                      " bytes) or the ", kMaxHeaderBytes, "-byte limit"));
  }
  const std::string header(reinterpret_cast<const char*>(base + 8), header_len);
  json root = json::parse(header, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) return Corrupt(file, "header is not a JSON object");
  const uint64_t data_size = file_size - 8 - header_len;
  const uint8_t* data = base + 8 + header_len;
  std::shared_ptr<const void> keep(mapping, mapping->addr);

  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  std::vector<std::string> range_names;
  std::set<std::string> seen;
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string& name = it.key();
    const json& e = it.value();
    if (!e.is_object() || !e.contains("dtype") || !e["dtype"].is_string() || !e.contains("shape") ||
        !e["shape"].is_array() || !e.contains("data_offsets") || !e["data_offsets"].is_array() ||
        e["data_offsets"].size() != 2) {
      return CorruptTensor(file, name, "header entry needs dtype, shape and data_offsets [begin, end]");
    }
    TensorInfo t;
    t.name = name;
    t.file = file.filename().string();
    t.mapping = keep;
    absl::StatusOr<DType> dtype = ParseDType(e["dtype"].get<std::string>());
    if (!dtype.ok()) return CorruptTensor(file, name, std::string(dtype.status().message()));
    t.dtype = *dtype;
    uint64_t numel = 1;
    for (const json& d : e["shape"]) {
      if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0)) {
        return CorruptTensor(file, name, absl::StrCat("bad shape ", e["shape"].dump()));
      }
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > (1ull << 50) / dim) return CorruptTensor(file, name, "shape too large");
      numel *= dim;
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    const json& off = e["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      return CorruptTensor(file, name, absl::StrCat("bad data_offsets ", off.dump()));
    }
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end || end > data_size) {
      return CorruptTensor(file, name,
                           absl::StrCat("data_offsets [", begin, ", ", end, ") lie outside the data section of ",
                                        data_size, " bytes (file truncated?)"));
    }
    const uint64_t want = numel * static_cast<uint64_t>(DTypeSize(t.dtype));
    if (end - begin != want) {
      return CorruptTensor(file, name,
                           absl::StrCat("byte length ", end - begin, " != ", std::string(DTypeName(t.dtype)), " x ",
                                        t.ShapeString(), " = ", want));
    }
    t.data = data + begin;
    t.nbytes = static_cast<int64_t>(want);
    if (tensors_.contains(name) || !seen.insert(name).second) {
      return CorruptTensor(file, name, "appears more than once in the checkpoint");
    }
    if (want > 0) {
      ranges.emplace_back(begin, end);
      range_names.push_back(name);
    }
    tensors_.emplace(name, std::move(t));
  }
  // No two tensors may share bytes.
  std::vector<size_t> order(ranges.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ranges[a] < ranges[b]; });
  for (size_t i = 1; i < order.size(); ++i) {
    const auto& prev = ranges[order[i - 1]];
    const auto& cur = ranges[order[i]];
    if (cur.first < prev.second) {
      return CorruptTensor(file, range_names[order[i]],
                           absl::StrCat("data_offsets overlap tensor '", range_names[order[i - 1]], "'"));
    }
  }
  if (expected != nullptr) {
    for (const std::string& name : *expected) {
      if (!seen.contains(name)) {
        return Corrupt(file, absl::StrCat("tensor '", name,
                                          "' is listed for this shard in model.safetensors.index.json but missing"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TensorStore>> TensorStore::OpenFile(const std::filesystem::path& file) {
  auto store = std::unique_ptr<TensorStore>(new TensorStore());
  DMOE_RETURN_IF_ERROR(store->AddFile(file, nullptr));
  return store;
}

absl::StatusOr<std::unique_ptr<TensorStore>> TensorStore::Open(const std::filesystem::path& model_dir) {
  const std::filesystem::path index = model_dir / "model.safetensors.index.json";
  const std::filesystem::path single = model_dir / "model.safetensors";
  auto store = std::unique_ptr<TensorStore>(new TensorStore());
  if (std::filesystem::exists(index)) {
    std::ifstream in(index);
    std::stringstream ss;
    ss << in.rdbuf();
    json root = json::parse(ss.str(), nullptr, false);
    if (root.is_discarded() || !root.is_object() || !root.contains("weight_map") ||
        !root["weight_map"].is_object()) {
      return absl::DataLossError(absl::StrCat(index.string(), ": expected {\"weight_map\": {tensor: file}}"));
    }
    std::map<std::string, std::vector<std::string>> by_file;
    for (auto it = root["weight_map"].begin(); it != root["weight_map"].end(); ++it) {
      if (!it.value().is_string()) {
        return absl::DataLossError(absl::StrCat(index.string(), ": weight_map['", it.key(), "'] is not a file name"));
      }
      const std::string shard = it.value().get<std::string>();
      if (shard.find('/') != std::string::npos || shard == "..") {
        return absl::DataLossError(absl::StrCat(index.string(), ": shard name '", shard, "' is not a plain file name"));
      }
      by_file[shard].push_back(it.key());
    }
    for (const auto& [shard, names] : by_file) {
      DMOE_RETURN_IF_ERROR(store->AddFile(model_dir / shard, &names));
    }
    return store;
  }
  if (std::filesystem::exists(single)) {
    DMOE_RETURN_IF_ERROR(store->AddFile(single, nullptr));
    return store;
  }
  return absl::NotFoundError(absl::StrCat(model_dir.string(),
                                          ": no model.safetensors or model.safetensors.index.json"));
}

std::unique_ptr<TensorStore> TensorStore::FromTensors(std::vector<TensorInfo> tensors) {
  auto store = std::unique_ptr<TensorStore>(new TensorStore());
  for (TensorInfo& t : tensors) {
    std::string name = t.name;
    store->tensors_[name] = std::move(t);
  }
  return store;
}

}  // namespace dmoe
