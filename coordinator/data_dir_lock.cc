#include "coordinator/data_dir_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <sstream>

#include "base/errors.h"
#include "base/text.h"

namespace ddpm {
namespace {

// "pid P on host H since T" from the file's lines, or what of it could be read.
std::string Holder(int fd) {
  char buffer[512] = {};
  const ssize_t size = pread(fd, buffer, sizeof(buffer) - 1, 0);
  std::istringstream lines(std::string(buffer, size > 0 ? static_cast<size_t>(size) : 0));
  std::string line, pid = "?", host = "?", since = "?";
  while (std::getline(lines, line)) {
    const size_t space = line.find(' ');
    if (space == std::string::npos) continue;
    const std::string key = line.substr(0, space), value = line.substr(space + 1);
    if (key == "pid") pid = value;
    if (key == "host") host = value;
    if (key == "since") since = value;
  }
  return "pid " + pid + " on host " + host + " since " + since;
}

}  // namespace

DataDirLock::DataDirLock(const std::string& data_dir) : path_(data_dir + "/LOCK") {
  fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    throw FileError(ErrnoMessage("cannot open the data directory's lock " + path_));
  }
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int error = errno;
    const std::string holder = error == EWOULDBLOCK ? Holder(fd_) : "";
    ::close(fd_);
    fd_ = -1;
    if (error == EWOULDBLOCK) {
      throw DataDirInUse("data dir " + data_dir + " is in use by " + holder + " (" + path_ +
                         "); stop that coordinator first, or give another --data-dir");
    }
    throw FileError(ErrnoMessage("cannot lock " + path_, error));
  }
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  const std::string since = FormatUtc(static_cast<int64_t>(std::time(nullptr)) * 1000);
  const std::string text =
      "pid " + std::to_string(::getpid()) + "\nhost " + host + "\nsince " + since + "\n";
  // Written in place under the lock: a reader that finds it held reads the holder's lines.
  if (::ftruncate(fd_, 0) != 0 ||
      ::pwrite(fd_, text.data(), text.size(), 0) != static_cast<ssize_t>(text.size())) {
    const std::string message = ErrnoMessage("cannot write " + path_);
    ::close(fd_);
    fd_ = -1;
    throw FileError(message);
  }
  ::fsync(fd_);
}

DataDirLock::~DataDirLock() {
  if (fd_ >= 0) ::close(fd_);
}

}  // namespace ddpm
