// Collectives across data-parallel ranks. The interface is here, beside its in-process fake
// (threads acting as ranks); the MPI and NCCL backends live in comm/.
#pragma once

#include <torch/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace ddpm {

/// A collective failed or timed out; the message names the operation and the rank.
class CommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class ReduceOp { kSum, kAverage };

/// The completion of one asynchronous collective. Thread-safe.
class Work {
 public:
  Work(std::string what, int rank, std::chrono::milliseconds timeout);
  /// Blocks until the collective is done; rethrows its error, or throws CommError naming the
  /// operation and rank after the timeout.
  void Wait();
  /// Marks the collective done (error empty) or failed. Called by the backend.
  void Finish(std::exception_ptr error = nullptr);
  bool done() const;
  const std::string& what() const { return what_; }
  /// When the backend started and finished the collective (steady clock).
  std::chrono::steady_clock::time_point started() const;
  std::chrono::steady_clock::time_point finished() const;
  void MarkStarted();

 private:
  const std::string what_;
  const int rank_;
  const std::chrono::milliseconds timeout_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  bool done_ = false;
  std::exception_ptr error_;
  std::chrono::steady_clock::time_point started_{}, finished_{};
};

/// Collectives over a fixed group of ranks. Every rank must issue the same collectives in the
/// same order. Async calls may come from any thread, one at a time.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  /// A short name for logs: "mpi", "nccl", "local".
  virtual std::string backend() const = 0;

  /// Starts an in-place all-reduce of a contiguous tensor; what names it in errors.
  virtual std::shared_ptr<Work> AllReduceAsync(torch::Tensor tensor, ReduceOp op,
                                               std::string what) = 0;
  /// Copies root's tensor into every rank's (in place, contiguous).
  virtual void Broadcast(torch::Tensor tensor, int root, const std::string& what) = 0;
  /// Every rank's tensor (same shape everywhere), stacked along a new first dimension.
  virtual torch::Tensor AllGather(const torch::Tensor& tensor, const std::string& what) = 0;
  /// Returns once every rank has called it.
  virtual void Barrier(const std::string& what) = 0;
  /// Broadcast without a timeout, for ranks that idle until root has something to say; the MPI
  /// backend sleeps between polls instead of spinning a core.
  virtual void WaitForBroadcast(torch::Tensor tensor, int root, const std::string& what);

  /// The blocking all-reduce.
  void AllReduce(torch::Tensor tensor, ReduceOp op, const std::string& what);
  /// How long a collective may take before it is reported as stuck.
  std::chrono::milliseconds timeout() const { return timeout_; }
  void set_timeout(std::chrono::milliseconds timeout) { timeout_ = timeout; }

 protected:
  std::chrono::milliseconds timeout_{std::chrono::minutes(10)};
};

/// Threads acting as ranks in one process: the fake beside the interface, for tests. Create
/// one group, then give each thread its rank's communicator. Reductions add in rank order, so
/// results are deterministic.
class LocalGroup {
 public:
  explicit LocalGroup(int world_size);
  ~LocalGroup();
  LocalGroup(const LocalGroup&) = delete;
  LocalGroup& operator=(const LocalGroup&) = delete;
  /// The communicator of rank; use it from one thread.
  Communicator& rank(int rank);

  /// The rendezvous the ranks share (defined in the .cc).
  struct State;

 private:
  std::shared_ptr<State> state_;
  std::vector<std::unique_ptr<Communicator>> ranks_;
};

/// The communicator of a world of one: every collective is the identity.
class SoloCommunicator : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  std::string backend() const override { return "solo"; }
  std::shared_ptr<Work> AllReduceAsync(torch::Tensor tensor, ReduceOp op,
                                       std::string what) override;
  void Broadcast(torch::Tensor, int, const std::string&) override {}
  torch::Tensor AllGather(const torch::Tensor& tensor, const std::string&) override {
    return tensor.unsqueeze(0).clone();
  }
  void Barrier(const std::string&) override {}
};

}  // namespace ddpm
