#include "trainer/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

namespace ddpm {
namespace {

namespace fs = std::filesystem;

// magic[8], version u32, reserved u32, payload size u64, payload xxh64 u64; little-endian.
constexpr std::size_t kHeaderBytes = 8 + 4 + 4 + 8 + 8;

void PutU32(std::vector<char>& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
void PutU64(std::vector<char>& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t GetLE(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(p[i]);
  return v;
}

std::string Errno(const std::string& what) { return what + ": " + std::strerror(errno); }

void FsyncPath(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags);
  if (fd < 0) throw CheckpointError(Errno(path + ": cannot open for fsync"));
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) throw CheckpointError(Errno(path + ": fsync failed"));
}

// Writes bytes to path and fsyncs it, calling hook as the bytes go out.
void WriteAndSync(const std::string& path, const std::vector<char>& bytes, const WriteHook& hook) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw CheckpointError(Errno(path + ": cannot create"));
  constexpr std::size_t kChunk = 1 << 20;
  std::size_t written = 0;
  while (written < bytes.size()) {
    const std::size_t n = std::min(kChunk, bytes.size() - written);
    const ssize_t got = ::write(fd, bytes.data() + written, n);
    if (got < 0) {
      if (errno == EINTR) continue;
      const std::string error =
          Errno(path + ": write failed at byte offset " + std::to_string(written));
      ::close(fd);
      throw CheckpointError(error);
    }
    written += static_cast<std::size_t>(got);
    if (hook) hook(written, bytes.size());
  }
  if (::fsync(fd) != 0) {
    const std::string error = Errno(path + ": fsync failed");
    ::close(fd);
    throw CheckpointError(error);
  }
  ::close(fd);
}

std::string StepFileName(int64_t step) {
  char name[48];
  std::snprintf(name, sizeof(name), "step_%09lld.ckpt", static_cast<long long>(step));
  return name;
}

}  // namespace

std::vector<char> PickleTensors(const std::map<std::string, torch::Tensor>& tensors) {
  c10::Dict<std::string, torch::Tensor> dict;
  for (const auto& [name, tensor] : tensors) dict.insert(name, tensor);
  return torch::pickle_save(dict);
}

std::map<std::string, torch::Tensor> UnpickleTensors(const std::vector<char>& bytes,
                                                     const std::string& origin) {
  torch::IValue value;
  try {
    value = torch::pickle_load(bytes);
  } catch (const c10::Error& e) {
    throw std::runtime_error(origin +
                             ": not a pickled dict of tensors: " + e.what_without_backtrace());
  }
  if (!value.isGenericDict()) throw std::runtime_error(origin + ": expected a dict of tensors");
  std::map<std::string, torch::Tensor> out;
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString() || !item.value().isTensor()) {
      throw std::runtime_error(origin + ": expected a dict of str -> tensor");
    }
    out[item.key().toStringRef()] = item.value().toTensor();
  }
  return out;
}

const torch::Tensor& RequireTensor(const std::map<std::string, torch::Tensor>& tensors,
                                   const std::string& name, const std::string& origin) {
  const auto it = tensors.find(name);
  if (it == tensors.end()) throw CheckpointError(origin + ": missing '" + name + "'");
  return it->second;
}

torch::Tensor Int64Tensor(int64_t value) { return torch::tensor(value, torch::kLong); }

void WriteCheckpointFile(const std::string& path,
                         const std::map<std::string, torch::Tensor>& tensors,
                         const WriteHook& hook) {
  const std::vector<char> payload = PickleTensors(tensors);
  std::vector<char> bytes;
  bytes.reserve(kHeaderBytes + payload.size());
  bytes.insert(bytes.end(), std::begin(kCheckpointMagic), std::end(kCheckpointMagic));
  PutU32(bytes, kCheckpointVersion);
  PutU32(bytes, 0);
  PutU64(bytes, payload.size());
  PutU64(bytes, XXH64(payload.data(), payload.size(), 0));
  bytes.insert(bytes.end(), payload.begin(), payload.end());

  const std::string tmp = path + ".tmp";
  try {
    WriteAndSync(tmp, bytes, hook);
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string error = Errno(path + ": cannot rename " + tmp + " into place");
    std::remove(tmp.c_str());
    throw CheckpointError(error);
  }
  FsyncPath(fs::path(path).parent_path().empty() ? "." : fs::path(path).parent_path().string(),
            O_RDONLY | O_DIRECTORY);
}

std::map<std::string, torch::Tensor> ReadCheckpointFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckpointError(path + ": cannot open checkpoint");
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)),
                                std::istreambuf_iterator<char>());
  if (bytes.size() < kHeaderBytes) {
    throw CheckpointError(path + ": truncated: " + std::to_string(bytes.size()) +
                          " bytes is shorter than the " + std::to_string(kHeaderBytes) +
                          "-byte header");
  }
  if (!std::equal(std::begin(kCheckpointMagic), std::end(kCheckpointMagic), bytes.begin())) {
    throw CheckpointError(path + ": not a ddpm-train checkpoint (bad magic at byte offset 0)");
  }
  const uint32_t version = static_cast<uint32_t>(GetLE(bytes.data() + 8, 4));
  if (version == 0 || version > kCheckpointVersion) {
    throw CheckpointError(path + ": checkpoint format version " + std::to_string(version) +
                          " is unknown to this build, which reads versions 1 to " +
                          std::to_string(kCheckpointVersion));
  }
  const uint64_t size = GetLE(bytes.data() + 16, 8);
  const uint64_t checksum = GetLE(bytes.data() + 24, 8);
  if (bytes.size() - kHeaderBytes != size) {
    throw CheckpointError(path + ": truncated or padded: the header declares " +
                          std::to_string(size) + " payload bytes from byte offset " +
                          std::to_string(kHeaderBytes) + ", the file has " +
                          std::to_string(bytes.size() - kHeaderBytes));
  }
  const std::vector<char> payload(bytes.begin() + kHeaderBytes, bytes.end());
  if (XXH64(payload.data(), payload.size(), 0) != checksum) {
    throw CheckpointError(path + ": checksum mismatch: the payload is corrupt");
  }
  try {
    return UnpickleTensors(payload, path);
  } catch (const std::runtime_error& e) {
    throw CheckpointError(e.what());
  }
}

CheckpointDir::CheckpointDir(std::string dir) : dir_(std::move(dir)) {}

std::string CheckpointDir::PathFor(int64_t step) const {
  return (fs::path(dir_) / StepFileName(step)).string();
}

std::vector<int64_t> CheckpointDir::Steps() const {
  std::vector<int64_t> steps;
  std::error_code error;
  if (!fs::is_directory(dir_, error)) return steps;
  for (const auto& entry : fs::directory_iterator(dir_)) {
    const std::string name = entry.path().filename().string();
    long long step = -1;
    char tail[8] = {0};
    if (std::sscanf(name.c_str(), "step_%lld.%7s", &step, tail) == 2 &&
        std::string(tail) == "ckpt" && name == StepFileName(step)) {
      steps.push_back(step);
    }
  }
  std::sort(steps.rbegin(), steps.rend());
  return steps;
}

std::string CheckpointDir::Save(int64_t step, const std::map<std::string, torch::Tensor>& tensors,
                                int keep, const WriteHook& hook) {
  std::error_code error;
  fs::create_directories(dir_, error);
  if (error) throw CheckpointError(dir_ + ": cannot create: " + error.message());
  const std::string path = PathFor(step);
  WriteCheckpointFile(path, tensors, hook);
  // `latest` names the newest committed file; written atomically like the checkpoint itself.
  const std::string latest = (fs::path(dir_) / "latest").string();
  const std::string name = StepFileName(step) + "\n";
  WriteAndSync(latest + ".tmp", std::vector<char>(name.begin(), name.end()), nullptr);
  if (std::rename((latest + ".tmp").c_str(), latest.c_str()) != 0) {
    throw CheckpointError(Errno(latest + ": cannot update"));
  }
  FsyncPath(dir_, O_RDONLY | O_DIRECTORY);
  const std::vector<int64_t> steps = Steps();
  for (std::size_t i = static_cast<std::size_t>(std::max(keep, 1)); i < steps.size(); ++i) {
    fs::remove(PathFor(steps[i]), error);
  }
  return path;
}

std::optional<CheckpointDir::Loaded> CheckpointDir::LoadLatestValid(
    const std::function<void(const std::string&)>& warn) const {
  std::vector<std::string> candidates;
  std::ifstream latest(fs::path(dir_) / "latest");
  std::string name;
  if (latest >> name) candidates.push_back((fs::path(dir_) / name).string());
  for (int64_t step : Steps()) {
    const std::string path = PathFor(step);
    if (std::find(candidates.begin(), candidates.end(), path) == candidates.end()) {
      candidates.push_back(path);
    }
  }
  for (const std::string& path : candidates) {
    try {
      return Loaded{path, ReadCheckpointFile(path)};
    } catch (const CheckpointError& e) {
      if (warn) warn(std::string("refusing checkpoint ") + e.what() + "; trying an older one");
    }
  }
  return std::nullopt;
}

}  // namespace ddpm
