// The one message every library-call check (MPI, NCCL, CUDA, SQLite) throws with.
#pragma once

#include <string>

namespace ddpm {

/// "<who>: <call> failed at <file>:<line>: <reason>": who is the rank ("rank 3") or the
/// resource ("registry runs/registry.db"), reason the library's own error string.
std::string CheckFailureMessage(const std::string& who, const char* call, const char* file,
                                int line, const std::string& reason);

}  // namespace ddpm
