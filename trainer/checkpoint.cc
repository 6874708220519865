#include "trainer/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>

#include "base/file_io.h"
#include "trainer/checkpoint_keys.h"

namespace ddpm {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// magic[8], version u32, rank u32, world u32, reserved u32, step u64; little-endian.
constexpr int64_t kShardHeaderBytes = 32;
// Replicated tensors start at multiples of this in the logical byte space, and rank ranges are
// cut at multiples of kCut, so no element is ever split between shards.
constexpr int64_t kAlign = 64;
constexpr int64_t kCut = 8;

// Writes size bytes to path and fsyncs it, calling hook as the bytes go out.
void WriteAndSync(const std::string& path, const char* data, std::size_t size,
                  const WriteHook& hook = nullptr) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw FileError(ErrnoMessage(path + ": cannot create"));
  constexpr std::size_t kChunk = 4 << 20;
  std::size_t written = 0;
  while (written < size) {
    const std::size_t n = std::min(kChunk, size - written);
    const ssize_t got = ::write(fd, data + written, n);
    if (got < 0) {
      if (errno == EINTR) continue;
      const std::string error =
          ErrnoMessage(path + ": write failed at byte offset " + std::to_string(written));
      ::close(fd);
      ::unlink(path.c_str());  // a partial file would only hold on to the space
      throw FileError(error);
    }
    written += static_cast<std::size_t>(got);
    if (hook) {
      try {
        hook(written, size);
      } catch (...) {
        ::close(fd);
        ::unlink(path.c_str());
        throw;
      }
    }
  }
  if (::fsync(fd) != 0) {
    const std::string error = ErrnoMessage(path + ": fsync failed");
    ::close(fd);
    ::unlink(path.c_str());
    throw FileError(error);
  }
  ::close(fd);
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckpointError(path + ": missing or unreadable");
  return {(std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()};
}

std::string ShardName(int rank, int world) {
  char name[64];
  std::snprintf(name, sizeof(name), "shard-%05d-of-%05d", rank, world);
  return name;
}

std::string Hex(uint64_t value) {
  char text[17];
  std::snprintf(text, sizeof(text), "%016llx", static_cast<unsigned long long>(value));
  return text;
}

const std::map<std::string, torch::ScalarType>& DtypesByName() {
  static const std::map<std::string, torch::ScalarType> dtypes = {
      {"float32", torch::kFloat32},   {"float64", torch::kFloat64}, {"float16", torch::kFloat16},
      {"bfloat16", torch::kBFloat16}, {"int64", torch::kInt64},     {"int32", torch::kInt32},
      {"uint8", torch::kUInt8},       {"bool", torch::kBool}};
  return dtypes;
}

std::string DtypeName(torch::ScalarType type, const std::string& tensor) {
  for (const auto& [name, t] : DtypesByName()) {
    if (t == type) return name;
  }
  throw CheckpointError("checkpoint: tensor '" + tensor + "' has dtype " +
                        std::string(c10::toString(type)) + ", which checkpoints do not store");
}

int64_t Align(int64_t value, int64_t to) { return (value + to - 1) / to * to; }

// Where each replicated tensor sits in the logical byte space all ranks share.
struct Placement {
  std::string name;
  int64_t start = 0;
  int64_t bytes = 0;
};

std::vector<Placement> Layout(const std::map<std::string, torch::Tensor>& replicated,
                              int64_t* total) {
  std::vector<Placement> out;
  int64_t at = 0;
  for (const auto& [name, tensor] : replicated) {
    at = Align(at, kAlign);
    const int64_t bytes = tensor.numel() * static_cast<int64_t>(tensor.element_size());
    out.push_back({name, at, bytes});
    at += bytes;
  }
  *total = at;
  return out;
}

// The part of place that lies in the logical range [first, last); empty when lo >= hi.
std::pair<int64_t, int64_t> Overlap(const Placement& place, int64_t first, int64_t last) {
  return {std::max(place.start, first), std::min(place.start + place.bytes, last)};
}

// Rank's byte range [first, second) of a logical space of total bytes.
std::pair<int64_t, int64_t> RangeOf(int64_t total, int rank, int world) {
  auto cut = [&](int r) {
    if (r >= world) return total;
    const long double exact = static_cast<long double>(total) * r / world;
    return static_cast<int64_t>(exact) / kCut * kCut;
  };
  return {cut(rank), cut(rank + 1)};
}

// The bytes of a contiguous CPU copy of tensor.
torch::Tensor ByteView(const torch::Tensor& tensor) {
  return tensor.detach().contiguous().reshape({-1}).view(torch::kUInt8);
}

Json ShapeJson(const torch::Tensor& tensor) {
  Json shape = Json::array();
  for (int64_t d : tensor.sizes()) shape.push_back(d);
  return shape;
}

}  // namespace

std::string StepName(int64_t step) {
  char name[48];
  std::snprintf(name, sizeof(name), "step_%09lld", static_cast<long long>(step));
  return name;
}

Config ConfigFromCheckpoint(const std::map<std::string, torch::Tensor>& tensors,
                            const std::string& origin) {
  return LoadConfigString(TensorText(RequireTensor(tensors, checkpoint_keys::kConfig, origin)),
                          origin + " (its config)");
}

// ---- Reading ----------------------------------------------------------------------------

std::map<std::string, torch::Tensor> ReadCheckpoint(const std::string& step_dir) {
  const fs::path dir(step_dir);
  if (!fs::is_directory(dir)) throw CheckpointError(step_dir + ": no such checkpoint directory");
  if (!fs::exists(dir / "COMMITTED")) {
    throw CheckpointError((dir / "COMMITTED").string() +
                          ": missing; the checkpoint was never committed (a torn write)");
  }
  const std::string manifest_path = (dir / "manifest.json").string();
  Json manifest;
  try {
    manifest = Json::parse(ReadText(manifest_path));
  } catch (const Json::exception& e) {
    throw CheckpointError(manifest_path + ": not valid JSON: " + e.what());
  }
  try {
    const int version = manifest.at("version").get<int>();
    if (version != static_cast<int>(kCheckpointVersion)) {
      throw CheckpointError(manifest_path + ": checkpoint format version " +
                            std::to_string(version) + " is unknown to this build, which reads " +
                            std::to_string(kCheckpointVersion));
    }
    // Every shard: present, the recorded size, the recorded xxHash64. Each is read once; the
    // tensors are then cut from memory.
    std::vector<std::string> shard_paths;
    std::vector<std::string> shards;
    for (const Json& shard : manifest.at("shards")) {
      const std::string path = (dir / shard.at("file").get<std::string>()).string();
      std::ifstream in(path, std::ios::binary);
      if (!in) throw CheckpointError(path + ": missing shard");
      std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      const int64_t expected = shard.at("bytes").get<int64_t>();
      if (static_cast<int64_t>(bytes.size()) != expected) {
        throw CheckpointError(path + ": truncated or padded: " + std::to_string(bytes.size()) +
                              " bytes, the manifest records " + std::to_string(expected));
      }
      if (Hex(XXH64(bytes.data(), bytes.size(), 0)) != shard.at("xxh64").get<std::string>()) {
        throw CheckpointError(path + ": checksum mismatch: the shard is corrupt");
      }
      shard_paths.push_back(path);
      shards.push_back(std::move(bytes));
    }
    auto read_bytes = [&](int shard, int64_t offset, int64_t bytes, uint8_t* out) {
      if (shard < 0 || shard >= static_cast<int>(shards.size())) {
        throw CheckpointError(manifest_path + ": refers to shard " + std::to_string(shard) +
                              " of " + std::to_string(shards.size()));
      }
      if (offset < 0 || bytes < 0 || offset + bytes > static_cast<int64_t>(shards[shard].size())) {
        throw CheckpointError(shard_paths[shard] + ": cannot read " + std::to_string(bytes) +
                              " bytes at byte offset " + std::to_string(offset));
      }
      std::memcpy(out, shards[shard].data() + offset, static_cast<std::size_t>(bytes));
    };
    int64_t shard_bytes = 0;
    for (const std::string& shard : shards) shard_bytes += static_cast<int64_t>(shard.size());
    auto make = [&](const Json& entry) {
      const std::string name = entry.at("name").get<std::string>();
      const std::string dtype = entry.at("dtype").get<std::string>();
      const auto it = DtypesByName().find(dtype);
      if (it == DtypesByName().end()) {
        throw CheckpointError(manifest_path + ": tensor '" + name + "' has unknown dtype " + dtype);
      }
      // A shape the shards cannot hold is refused before anything is allocated for it.
      const std::vector<int64_t> shape = entry.at("shape").get<std::vector<int64_t>>();
      int64_t bytes = c10::elementSize(it->second);
      for (const int64_t size : shape) {
        if (size < 0 || (size > 0 && bytes > shard_bytes / size)) {
          throw CheckpointError(manifest_path + ": tensor '" + name + "' has shape " +
                                Json(shape).dump() + ", more than the shards' " +
                                std::to_string(shard_bytes) + " bytes hold");
        }
        bytes *= size;
      }
      return torch::empty(shape, it->second);
    };
    std::map<std::string, torch::Tensor> out;
    for (const Json& entry : manifest.at("tensors")) {
      torch::Tensor tensor = make(entry);
      torch::Tensor bytes = ByteView(tensor);
      int64_t filled = 0;
      for (const Json& piece : entry.at("pieces")) {
        const int64_t begin = piece.at("begin").get<int64_t>();
        const int64_t count = piece.at("bytes").get<int64_t>();
        if (begin < 0 || count < 0 || begin + count > bytes.numel()) {
          throw CheckpointError(manifest_path + ": a piece of '" +
                                entry.at("name").get<std::string>() + "' lies outside it");
        }
        read_bytes(piece.at("shard").get<int>(), piece.at("offset").get<int64_t>(), count,
                   bytes.data_ptr<uint8_t>() + begin);
        filled += count;
      }
      if (filled != bytes.numel()) {
        throw CheckpointError(
            manifest_path + ": the pieces of '" + entry.at("name").get<std::string>() + "' cover " +
            std::to_string(filled) + " of its " + std::to_string(bytes.numel()) + " bytes");
      }
      out[entry.at("name").get<std::string>()] = tensor;
    }
    for (const Json& rank : manifest.at("ranks")) {
      const int r = rank.at("rank").get<int>();
      for (const Json& entry : rank.at("tensors")) {
        torch::Tensor tensor = make(entry);
        torch::Tensor bytes = ByteView(tensor);
        if (entry.at("bytes").get<int64_t>() != bytes.numel()) {
          throw CheckpointError(manifest_path + ": rank " + std::to_string(r) + "'s '" +
                                entry.at("name").get<std::string>() + "' has the wrong size");
        }
        read_bytes(r, entry.at("offset").get<int64_t>(), bytes.numel(), bytes.data_ptr<uint8_t>());
        out[entry.at("name").get<std::string>() + "/" + std::to_string(r)] = tensor;
      }
    }
    out[checkpoint_keys::kWorldSize] = Int64Tensor(manifest.at("world_size").get<int64_t>());
    return out;
  } catch (const Json::exception& e) {
    throw CheckpointError(manifest_path + ": malformed manifest: " + e.what());
  }
}

CheckpointDir::CheckpointDir(std::string dir) : dir_(std::move(dir)) {}

std::string CheckpointDir::PathFor(int64_t step) const {
  return (fs::path(dir_) / StepName(step)).string();
}

std::vector<int64_t> CheckpointDir::Steps() const {
  std::vector<int64_t> steps;
  std::error_code error;
  if (!fs::is_directory(dir_, error)) return steps;
  for (const auto& entry : fs::directory_iterator(dir_)) {
    const std::string name = entry.path().filename().string();
    long long step = -1;
    if (entry.is_directory() && std::sscanf(name.c_str(), "step_%lld", &step) == 1 &&
        name == StepName(step)) {
      steps.push_back(step);
    }
  }
  std::sort(steps.rbegin(), steps.rend());
  return steps;
}

void CheckpointDir::RemoveTemporaries() const {
  std::error_code error;
  if (!fs::is_directory(dir_, error)) return;
  for (const auto& entry : fs::directory_iterator(dir_)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("step_", 0) == 0 && name.size() > 4 &&
        name.compare(name.size() - 4, 4, ".tmp") == 0) {
      fs::remove_all(entry.path(), error);
    }
  }
}

int CheckpointDir::RemoveAfter(int64_t step) const {
  int removed = 0;
  std::error_code error;
  for (int64_t later : Steps()) {
    if (later <= step) continue;
    fs::remove(fs::path(PathFor(later)) / "COMMITTED", error);
    fs::remove_all(PathFor(later), error);
    ++removed;
  }
  return removed;
}

std::optional<CheckpointDir::Loaded> CheckpointDir::LoadLatestValid(
    const std::function<void(const std::string&)>& warn,
    const std::function<std::string(const std::string& path)>& refuse) const {
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
    if (refuse) {
      const std::string why = refuse(path);
      if (!why.empty()) {
        if (warn) warn("skipping checkpoint " + path + ": " + why);
        continue;
      }
    }
    try {
      return Loaded{path, ReadCheckpoint(path)};
    } catch (const CheckpointError& e) {
      if (warn) warn(std::string("refusing checkpoint ") + e.what() + "; trying an older one");
    }
  }
  return std::nullopt;
}

int CheckpointAttempt(const std::string& step_dir) {
  try {
    const Json manifest = Json::parse(ReadText((fs::path(step_dir) / "manifest.json").string()));
    return manifest.value("attempt", 0);
  } catch (const std::exception&) {
    return 0;  // ReadCheckpoint names what is wrong with it
  }
}

std::optional<BestCheckpoint> ReadBestCheckpoint(const std::string& dir) {
  const fs::path path = fs::path(dir) / "best";
  if (!fs::exists(path)) return std::nullopt;
  std::istringstream text(ReadText(path.string()));
  std::string name, metric, score;
  long long step = -1;
  BestCheckpoint best;
  if (!(text >> name >> metric >> score) || std::sscanf(name.c_str(), "step_%lld", &step) != 1 ||
      name != StepName(step)) {
    throw CheckpointError(path.string() +
                          ": does not read as a best pointer (\"step_XXXXXXXXX\" and \"METRIC "
                          "SCORE\" lines)");
  }
  try {
    std::size_t used = 0;
    best.score = std::stod(score, &used);
    if (used != score.size()) throw std::invalid_argument(score);
  } catch (const std::exception&) {
    throw CheckpointError(path.string() + ": the score '" + score + "' is not a number");
  }
  best.step = step;
  best.metric = metric;
  return best;
}

void WriteBestCheckpoint(const std::string& dir, const BestCheckpoint& best) {
  char score[64];
  std::snprintf(score, sizeof(score), "%.17g", best.score);
  WriteFileAtomically((fs::path(dir) / "best").string(),
                      StepName(best.step) + "\n" + best.metric + " " + score + "\n");
  SyncDirectory(dir);
}

CheckpointDir::Loaded LoadCheckpointAt(const std::string& path,
                                       const std::function<void(const std::string&)>& warn) {
  const fs::path at(path);
  if (at.filename() == "best" && !fs::is_directory(at)) {
    // RUN/best or RUN/checkpoints/best: the checkpoint eval.select kept.
    const fs::path parent = at.parent_path().empty() ? fs::path(".") : at.parent_path();
    const std::string folder = fs::is_directory(parent / "checkpoints")
                                   ? (parent / "checkpoints").string()
                                   : parent.string();
    const std::optional<BestCheckpoint> best = ReadBestCheckpoint(folder);
    if (!best) {
      throw CheckpointError(path + ": " + folder +
                            " has no best checkpoint (the run's eval.select is none, or it has "
                            "not evaluated yet)");
    }
    const std::string step_dir = (fs::path(folder) / StepName(best->step)).string();
    return {step_dir, ReadCheckpoint(step_dir)};
  }
  if (fs::exists(at / "manifest.json") || fs::exists(at / "COMMITTED")) {
    return {path, ReadCheckpoint(path)};
  }
  const std::string folder =
      fs::is_directory(at / "checkpoints") ? (at / "checkpoints").string() : path;
  if (!fs::is_directory(folder)) {
    throw CheckpointError(path + ": no such checkpoint, checkpoints folder or run directory");
  }
  std::optional<CheckpointDir::Loaded> loaded = CheckpointDir(folder).LoadLatestValid(warn);
  if (!loaded) throw CheckpointError(folder + ": holds no checkpoint that can be read");
  return *loaded;
}

// ---- Writing ----------------------------------------------------------------------------

struct CheckpointWriter::Job {
  int64_t step = 0;
  std::string tmp_dir;
  std::string final_dir;
  int64_t shard_bytes = 0;
  uint64_t config_hash = 0;
  // The manifest's tensor table: every replicated tensor and its place in the logical space.
  std::vector<Placement> layout;
  int64_t total = 0;
  Json replicated_meta = Json::object();  // name -> {dtype, shape}
  Json own = Json::array();               // this rank's own tensors
  Json data_cursor = Json::object();
  Clock::time_point started;
  // How far the commit got: the folder renamed into place, `latest` moved to it.
  bool renamed = false;
  bool published = false;
};

CheckpointWriter::CheckpointWriter(std::string dir, int rank, int world_size, int keep,
                                   double timeout_seconds, WriteHook hook)
    : dir_(std::move(dir)),
      rank_(rank),
      world_(world_size),
      keep_(keep),
      timeout_seconds_(timeout_seconds),
      hook_(std::move(hook)) {
  thread_ = std::thread([this] { Run(); });
}

CheckpointWriter::~CheckpointWriter() {
  {
    std::unique_lock<std::mutex> lock(mutex_);
    changed_.wait(lock, [&] { return !busy_; });
    stop_ = true;
  }
  changed_.notify_all();
  thread_.join();
}

std::string CheckpointWriter::Wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [&] { return !busy_; });
  if (error_) {
    std::exception_ptr error = error_;
    error_ = nullptr;
    std::rethrow_exception(error);
  }
  return committed_;
}

CheckpointTimes CheckpointWriter::times() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return times_;
}

void CheckpointWriter::Save(int64_t step, const std::map<std::string, torch::Tensor>& replicated,
                            const std::map<std::string, torch::Tensor>& own) {
  const auto start = Clock::now();
  Wait();  // Never two at once; the host buffer is reused.
  auto job = std::make_unique<Job>();
  job->step = step;
  job->final_dir = (fs::path(dir_) / StepName(step)).string();
  job->tmp_dir = job->final_dir + ".tmp";
  job->layout = Layout(replicated, &job->total);
  // Named variables, not a structured binding: the lambda below captures them (C++17).
  const std::pair<int64_t, int64_t> range = RangeOf(job->total, rank_, world_);
  const int64_t first = range.first;
  const int64_t last = range.second;

  // The shard image: header, this rank's range of the logical space, then its own tensors.
  int64_t size = kShardHeaderBytes + (last - first);
  std::vector<std::pair<int64_t, const torch::Tensor*>> own_at;
  for (const auto& [name, tensor] : own) {
    size = Align(size, kCut);
    own_at.emplace_back(size, &tensor);
    const int64_t bytes = tensor.numel() * static_cast<int64_t>(tensor.element_size());
    job->own.push_back({{"name", name},
                        {"dtype", DtypeName(tensor.scalar_type(), name)},
                        {"shape", ShapeJson(tensor)},
                        {"offset", size},
                        {"bytes", bytes}});
    size += bytes;
  }
  job->shard_bytes = size;
  bool on_gpu = false;
  for (const auto& [name, tensor] : replicated) on_gpu = on_gpu || tensor.is_cuda();
  if (!host_.defined() || host_.numel() < size) {
    host_ = torch::empty({size}, torch::kUInt8);
    if (on_gpu) host_ = host_.pin_memory();
  }
  uint8_t* base = host_.data_ptr<uint8_t>();
  std::memset(base, 0, kShardHeaderBytes);
  std::memcpy(base, kShardMagic, sizeof(kShardMagic));
  const uint32_t header[4] = {kCheckpointVersion, static_cast<uint32_t>(rank_),
                              static_cast<uint32_t>(world_), 0};
  std::memcpy(base + 8, header, sizeof(header));
  const uint64_t step_bytes = static_cast<uint64_t>(step);
  std::memcpy(base + 24, &step_bytes, sizeof(step_bytes));

  int64_t filled = first;  // logical position up to which the shard is written
  auto zero_to = [&](int64_t logical) {
    if (logical > filled) {
      std::memset(base + kShardHeaderBytes + (filled - first), 0, logical - filled);
      filled = logical;
    }
  };
  std::size_t index = 0;
  for (const auto& [name, tensor] : replicated) {
    const Placement& place = job->layout[index++];
    job->replicated_meta[name] = {{"dtype", DtypeName(tensor.scalar_type(), name)},
                                  {"shape", ShapeJson(tensor)}};
    const auto [lo, hi] = Overlap(place, first, last);
    if (lo >= hi) continue;
    zero_to(lo);
    host_.narrow(0, kShardHeaderBytes + (lo - first), hi - lo)
        .copy_(ByteView(tensor).narrow(0, lo - place.start, hi - lo));
    filled = hi;
  }
  zero_to(last);
  // The rank's own tensors, after the range; their padding is zero, so equal states give equal
  // shard bytes (and checksums).
  const int64_t own_start = kShardHeaderBytes + (last - first);
  std::memset(base + own_start, 0, size - own_start);
  for (const auto& [offset, tensor] : own_at) {
    const torch::Tensor bytes = ByteView(*tensor).to(torch::kCPU);
    std::memcpy(base + offset, bytes.data_ptr<uint8_t>(), bytes.numel());
  }
  if (const auto it = replicated.find(checkpoint_keys::kConfig); it != replicated.end()) {
    const torch::Tensor bytes = ByteView(it->second).to(torch::kCPU);
    job->config_hash = XXH64(bytes.data_ptr<uint8_t>(), bytes.numel(), 0);
  }
  for (const auto& [key, name] : {std::pair{checkpoint_keys::kDataEpoch, "epoch"},
                                  std::pair{checkpoint_keys::kDataOffset, "offset"}}) {
    if (const auto it = replicated.find(key); it != replicated.end()) {
      job->data_cursor[name] = it->second.item<int64_t>();
    }
  }
  job->started = Clock::now();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    times_.stall_seconds = std::chrono::duration<double>(Clock::now() - start).count();
    job_ = std::move(job);
    busy_ = true;
  }
  changed_.notify_all();
}

void CheckpointWriter::Run() {
  while (true) {
    std::unique_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      changed_.wait(lock, [&] { return stop_ || job_ != nullptr; });
      if (!job_) return;
      job = std::move(job_);
    }
    std::exception_ptr error;
    std::string committed;
    try {
      Write(*job);
      if (rank_ == 0) {
        Commit(*job);
        committed = job->final_dir;
      }
    } catch (const std::exception& e) {
      error = std::current_exception();
      Abandon(*job, e.what());
    } catch (...) {
      error = std::current_exception();
      Abandon(*job, "unknown error");
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      times_.write_seconds = std::chrono::duration<double>(Clock::now() - job->started).count();
      error_ = error;
      if (!committed.empty()) committed_ = committed;
    }
    // Before the writer counts as idle, so that a Wait() also waits for the report.
    if (!committed.empty() && on_commit_) {
      try {
        on_commit_(job->step, committed);
      } catch (...) {
        // A report that fails must not fail the checkpoint, which is safely on disk.
      }
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      busy_ = false;
    }
    changed_.notify_all();
  }
}

void CheckpointWriter::Abandon(const Job& job, const std::string& why) {
  std::error_code error;
  if (rank_ != 0) {
    // Tell rank 0 at once rather than let it wait dist.timeout_seconds for this shard (on a full
    // disk this small file may not fit either; rank 0 then times out).
    const std::string failed =
        (fs::path(job.tmp_dir) / (ShardName(rank_, world_) + ".failed")).string();
    try {
      WriteAndSync(failed, why.data(), why.size());
    } catch (const std::exception&) {
    }
    return;
  }
  // Rank 0: nothing of this step stays. A folder that was already renamed into place loses its
  // COMMITTED marker first, so that no reader takes it while it goes.
  fs::remove_all(job.tmp_dir, error);
  if (job.renamed && !job.published) {
    fs::remove(fs::path(job.final_dir) / "COMMITTED", error);
    fs::remove_all(job.final_dir, error);
  }
}

void CheckpointWriter::Write(Job& job) {
  std::error_code error;
  fs::create_directories(job.tmp_dir, error);
  if (error) throw CheckpointError(job.tmp_dir + ": cannot create: " + error.message());
  const std::string shard = (fs::path(job.tmp_dir) / ShardName(rank_, world_)).string();
  const char* data = reinterpret_cast<const char*>(host_.data_ptr<uint8_t>());
  WriteAndSync(shard, data, static_cast<std::size_t>(job.shard_bytes), hook_);
  // The shard's receipt for rank 0, which appears whole (rename) only after the shard is synced.
  const Json done = {{"rank", rank_},
                     {"bytes", job.shard_bytes},
                     {"xxh64", Hex(XXH64(data, static_cast<std::size_t>(job.shard_bytes), 0))},
                     {"tensors", job.own}};
  WriteFileAtomically(shard + ".done", done.dump());
}

void CheckpointWriter::Commit(Job& job) {
  // Wait for every rank's receipt: the barrier after which the checkpoint is complete.
  const fs::path tmp(job.tmp_dir);
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_seconds_);
  std::vector<Json> receipts(world_);
  for (int r = 0; r < world_; ++r) {
    const fs::path receipt = tmp / (ShardName(r, world_) + ".done");
    const fs::path failed = tmp / (ShardName(r, world_) + ".failed");
    while (!fs::exists(receipt)) {
      if (fs::exists(failed)) {
        throw CheckpointError("rank " + std::to_string(r) + " could not write its shard of step " +
                              std::to_string(job.step) + ": " + ReadText(failed.string()));
      }
      if (Clock::now() > deadline) {
        throw CheckpointError(receipt.string() + ": rank " + std::to_string(r) +
                              "'s shard of step " + std::to_string(job.step) +
                              " did not arrive within dist.timeout_seconds");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    try {
      receipts[r] = Json::parse(ReadText(receipt.string()));
    } catch (const Json::exception& e) {
      throw CheckpointError(receipt.string() + ": not valid JSON: " + e.what());
    }
  }

  Json manifest = {{"format", "ddpm-train sharded checkpoint"},
                   {"version", kCheckpointVersion},
                   {"step", job.step},
                   {"world_size", world_},
                   {"attempt", attempt_},
                   {"config_hash", Hex(job.config_hash)},
                   {"data_cursor", job.data_cursor}};
  Json shards = Json::array(), ranks = Json::array();
  for (int r = 0; r < world_; ++r) {
    shards.push_back({{"file", ShardName(r, world_)},
                      {"rank", r},
                      {"bytes", receipts[r].at("bytes")},
                      {"xxh64", receipts[r].at("xxh64")}});
    ranks.push_back({{"rank", r}, {"tensors", receipts[r].at("tensors")}});
  }
  Json tensors = Json::array();
  for (const Placement& place : job.layout) {
    Json pieces = Json::array();
    for (int r = 0; r < world_; ++r) {
      const auto [first, last] = RangeOf(job.total, r, world_);
      const auto [lo, hi] = Overlap(place, first, last);
      if (lo >= hi) continue;
      pieces.push_back({{"shard", r},
                        {"offset", kShardHeaderBytes + (lo - first)},
                        {"begin", lo - place.start},
                        {"bytes", hi - lo}});
    }
    const Json& meta = job.replicated_meta.at(place.name);
    tensors.push_back({{"name", place.name},
                       {"dtype", meta.at("dtype")},
                       {"shape", meta.at("shape")},
                       {"pieces", pieces}});
  }
  manifest["shards"] = shards;
  manifest["tensors"] = tensors;
  manifest["ranks"] = ranks;
  const std::string text = manifest.dump(1);
  WriteAndSync((tmp / "manifest.json").string(), text.data(), text.size());
  for (int r = 0; r < world_; ++r) fs::remove(tmp / (ShardName(r, world_) + ".done"));
  SyncDirectory(job.tmp_dir);

  // COMMITTED goes in before the folder is renamed into place, so that a process killed at any
  // moment leaves either step_X.tmp (never read, removed at the next start) or a whole step_X.
  const std::string stamp = std::to_string(job.step) + "\n";
  WriteAndSync((tmp / "COMMITTED").string(), stamp.data(), stamp.size());
  SyncDirectory(job.tmp_dir);

  // Publish: rename the folder, then move `latest`; a superseded attempt stops before each.
  if (check_fence_) check_fence_("the checkpoint of step " + std::to_string(job.step));
  std::error_code error;
  fs::remove_all(job.final_dir, error);
  if (std::rename(job.tmp_dir.c_str(), job.final_dir.c_str()) != 0) {
    throw FileError(ErrnoMessage(job.final_dir + ": cannot rename " + job.tmp_dir + " into place"));
  }
  job.renamed = true;
  SyncDirectory(dir_);
  if (check_fence_) check_fence_("`latest` (step " + std::to_string(job.step) + ")");
  WriteFileAtomically((fs::path(dir_) / "latest").string(), StepName(job.step) + "\n");
  job.published = true;
  SyncDirectory(dir_);

  // Keep the newest keep_, any checkpoint marked with a KEEP file, and the one `best` names
  // (moved only between commits, by the thread that waits for them).
  CheckpointDir folder(dir_);
  const std::vector<int64_t> steps = folder.Steps();
  std::optional<BestCheckpoint> best;
  if (keep_ > 0 && steps.size() > static_cast<std::size_t>(keep_)) {
    try {
      best = ReadBestCheckpoint(dir_);
    } catch (const CheckpointError&) {
      // Unreadable: nothing is spared by it (the run reports it when it reads it).
    }
  }
  for (std::size_t i = static_cast<std::size_t>(keep_); keep_ > 0 && i < steps.size(); ++i) {
    const std::string path = folder.PathFor(steps[i]);
    if (fs::exists(fs::path(path) / "KEEP")) continue;
    if (best && best->step == steps[i]) continue;
    // COMMITTED first: a deletion cut short leaves a folder no reader takes for a checkpoint.
    fs::remove(fs::path(path) / "COMMITTED", error);
    fs::remove_all(path, error);
  }
  // A rank that was still writing when an earlier checkpoint was abandoned may have left its
  // step_X.tmp behind.
  for (const auto& entry : fs::directory_iterator(dir_, error)) {
    long long step = -1;
    const std::string name = entry.path().filename().string();
    if (std::sscanf(name.c_str(), "step_%lld.tmp", &step) == 1 && name == StepName(step) + ".tmp" &&
        step < job.step) {
      fs::remove_all(entry.path(), error);
    }
  }
}

std::string SaveCheckpoint(const std::string& dir, int64_t step,
                           const std::map<std::string, torch::Tensor>& tensors, int keep) {
  CheckpointWriter writer(dir, 0, 1, keep, 600);
  writer.Save(step, tensors, {});
  return writer.Wait();
}

}  // namespace ddpm
