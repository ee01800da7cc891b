// Fuzzes the safetensors header parser: any file bytes either open or fail
// with a Status, and every tensor of a file that opens lies inside the
// file's data section with dtype x shape = its byte length.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "core/safetensors.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // The parser maps a file: give it one in memory.
  const int fd = memfd_create("dmoe_fuzz.safetensors", MFD_CLOEXEC);
  FUZZ_CHECK(fd >= 0);
  size_t written = 0;
  while (written < size) {
    const ssize_t n = ::write(fd, data + written, size - written);
    FUZZ_CHECK(n > 0);
    written += static_cast<size_t>(n);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  auto store = dmoe::TensorStore::OpenFile(path);
  if (store.ok()) {
    FUZZ_CHECK(size >= 8);
    uint64_t header_len = 0;
    std::memcpy(&header_len, data, 8);
    int64_t total = 0;
    for (const auto& [name, t] : (*store)->tensors()) {
      FUZZ_CHECK(name == t.name);
      FUZZ_CHECK(t.nbytes >= 0);
      FUZZ_CHECK(t.numel() * static_cast<int64_t>(dmoe::DTypeSize(t.dtype)) == t.nbytes);
      const auto* base = static_cast<const uint8_t*>(t.mapping.get());
      FUZZ_CHECK(t.data >= base + 8 + header_len);
      FUZZ_CHECK(t.data + t.nbytes <= base + size);
      // Touch the first and last byte: both must be readable.
      if (t.nbytes > 0) {
        FUZZ_CHECK(t.data[0] == data[t.data - base]);
        FUZZ_CHECK(t.data[t.nbytes - 1] == data[t.data - base + t.nbytes - 1]);
      }
      (void)t.ShapeString();
      total += t.nbytes;
    }
    FUZZ_CHECK(total == (*store)->total_bytes());
    FUZZ_CHECK(static_cast<uint64_t>(total) <= size - 8 - header_len);  // no two tensors share bytes
  } else {
    FUZZ_CHECK(!store.status().message().empty());
  }
  ::close(fd);
  return 0;
}
