#include "core/log.h"

#include <sys/time.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <mutex>
#include <string>

namespace dmoe {

bool LogEnabled(LogLevel level) {
  static const LogLevel min_level = [] {
    const char* env = std::getenv("DMOE_LOG_LEVEL");
    if (env == nullptr) return LogLevel::kInfo;
    const std::string v(env);
    if (v == "warning") return LogLevel::kWarning;
    if (v == "error") return LogLevel::kError;
    return LogLevel::kInfo;
  }();
  return level >= min_level;
}

void WriteLogLine(LogLevel level, std::string_view component, const std::string& message) {
  static std::mutex mu;
  timeval tv;
  gettimeofday(&tv, nullptr);
  std::tm tm;
  gmtime_r(&tv.tv_sec, &tm);
  char ts[32];
  std::strftime(ts, sizeof ts, "%Y-%m-%d %H:%M:%S", &tm);
  const char tag = level == LogLevel::kInfo ? 'I' : level == LogLevel::kWarning ? 'W' : 'E';
  std::string line = message;
  for (char& c : line) {
    if (c == '\n') c = ' ';  // keep one line per event
  }
  std::lock_guard<std::mutex> lock(mu);
  std::fprintf(stderr, "%s.%03d %c [%.*s] %s\n", ts, static_cast<int>(tv.tv_usec / 1000), tag,
               static_cast<int>(component.size()), component.data(), line.c_str());
}

}  // namespace dmoe
