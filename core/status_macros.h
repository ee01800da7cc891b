// Early-return helpers for absl::Status / absl::StatusOr.
#ifndef DMOE_CORE_STATUS_MACROS_H_
#define DMOE_CORE_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define DMOE_CONCAT_INNER_(a, b) a##b
#define DMOE_CONCAT_(a, b) DMOE_CONCAT_INNER_(a, b)

#define DMOE_RETURN_IF_ERROR(expr)                 \
  do {                                             \
    ::absl::Status dmoe_status_ = (expr);          \
    if (!dmoe_status_.ok()) return dmoe_status_;   \
  } while (0)

#define DMOE_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                \
  if (!tmp.ok()) return tmp.status();               \
  lhs = std::move(tmp).value()

// DMOE_ASSIGN_OR_RETURN(auto x, MakeX());
#define DMOE_ASSIGN_OR_RETURN(lhs, expr) \
  DMOE_ASSIGN_OR_RETURN_IMPL_(DMOE_CONCAT_(dmoe_statusor_, __LINE__), lhs, expr)

#endif  // DMOE_CORE_STATUS_MACROS_H_
