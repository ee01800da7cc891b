// One line per event, with the component named:
//   2026-11-24 05:10:00.123 I [core] loaded 4 layers (6.2 MiB)
#ifndef DMOE_CORE_LOG_H_
#define DMOE_CORE_LOG_H_

#include <sstream>
#include <string_view>

namespace dmoe {

enum class LogLevel { kInfo, kWarning, kError };

// Minimum level printed (default kInfo; DMOE_LOG_LEVEL=warning|error raises it).
bool LogEnabled(LogLevel level);
void WriteLogLine(LogLevel level, std::string_view component, const std::string& message);

class LogMessage {
 public:
  LogMessage(LogLevel level, std::string_view component) : level_(level), component_(component) {}
  ~LogMessage() { WriteLogLine(level_, component_, stream_.str()); }
  std::ostringstream& stream() { return stream_; }

 private:
  LogLevel level_;
  std::string_view component_;
  std::ostringstream stream_;
};

}  // namespace dmoe

#define DMOE_LOG(level, component)                                  \
  if (!::dmoe::LogEnabled(::dmoe::LogLevel::level)) {               \
  } else                                                            \
    ::dmoe::LogMessage(::dmoe::LogLevel::level, component).stream()

#endif  // DMOE_CORE_LOG_H_
