#include "base/file_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>

namespace ddpm {

std::string ErrnoMessage(const std::string& what, int error) {
  return what + ": " + std::strerror(error);
}

namespace {

// Writes all of bytes to fd; returns 0 or the errno of the failure (EIO for a write that stops
// short without one).
int WriteAll(int fd, std::string_view bytes) {
  std::size_t written = 0;
  while (written < bytes.size()) {
    const ssize_t got = ::write(fd, bytes.data() + written, bytes.size() - written);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return errno;
    if (got == 0) return EIO;
    written += static_cast<std::size_t>(got);
  }
  return 0;
}

}  // namespace

void WriteFileAtomically(const std::string& path, std::string_view bytes, Durability durability,
                         const std::string& temporary) {
  const std::string tmp = temporary.empty() ? path + ".tmp" : temporary;
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw FileError(ErrnoMessage(path + ": cannot create " + tmp));
  int error = WriteAll(fd, bytes);
  if (error == 0 && durability != Durability::kRenamed && ::fsync(fd) != 0) error = errno;
  ::close(fd);
  if (error != 0) {
    std::remove(tmp.c_str());
    throw FileError(ErrnoMessage(path + ": cannot write", error));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    error = errno;
    std::remove(tmp.c_str());
    throw FileError(ErrnoMessage(path + ": cannot rename " + tmp + " into place", error));
  }
  if (durability == Durability::kSyncedWithDirectory) {
    SyncDirectory(std::filesystem::path(path).parent_path().empty()
                      ? std::string(".")
                      : std::filesystem::path(path).parent_path().string());
  }
}

void SyncDirectory(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw FileError(ErrnoMessage(path + ": cannot open for fsync"));
  const int rc = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  if (rc != 0) throw FileError(ErrnoMessage(path + ": fsync failed", error));
}

void MakeDirectories(const std::string& path) {
  std::error_code error;
  std::filesystem::create_directories(path, error);
  if (error) throw FileError(path + ": cannot create directory: " + error.message());
}

}  // namespace ddpm
