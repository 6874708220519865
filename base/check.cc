#include "base/check.h"

namespace ddpm {

std::string CheckFailureMessage(const std::string& who, const char* call, const char* file,
                                int line, const std::string& reason) {
  return who + ": " + call + " failed at " + file + ":" + std::to_string(line) + ": " + reason;
}

}  // namespace ddpm
