// The errors every layer shares: a file that cannot be read or written, and a file whose
// contents do not read as its format. Each layer's own errors (ConfigError, CheckpointError,
// CommError, RegistryError...) sit beside what they describe; all derive from
// std::runtime_error, and every message names its culprit (the file, the line, the key).
#pragma once

#include <cerrno>
#include <stdexcept>
#include <string>

namespace ddpm {

/// A file or directory that could not be opened, created, written, synced or renamed. The
/// message names the path and the system's reason.
class FileError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A file whose contents do not read as its format (a header, a line, an array's shape). The
/// message names the file and where in it.
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// "what: <strerror(error)>", the one way an errno is put into a message.
std::string ErrnoMessage(const std::string& what, int error = errno);

}  // namespace ddpm
