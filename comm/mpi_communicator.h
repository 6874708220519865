// MPI for the life of a worker process, and the Communicator over it for CPU tensors. One
// communication thread owns every MPI call after initialisation: Open MPI progresses
// non-blocking collectives only inside MPI calls, so a thread that sits in them is what makes
// all-reduce overlap with backward (Horovod's background thread is the model).
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "trainer/communicator.h"

namespace ddpm {

/// Where this process sits in an MPI job.
struct MpiPlacement {
  int rank = 0;
  int world_size = 1;
  /// Rank among the processes on this node (MPI_Comm_split_type, MPI_COMM_TYPE_SHARED).
  int local_rank = 0;
  int local_size = 1;
  /// Whether MPI lets several threads call it at once (MPI_THREAD_MULTIPLE), as MpiMailbox
  /// needs.
  bool thread_multiple = false;
};

/// True when a launcher (mpirun, srun with PMI) started this process.
bool LaunchedByMpi();

/// MPI_Init_thread at construction (asking for MPI_THREAD_MULTIPLE, needing at least
/// MPI_THREAD_SERIALIZED) and MPI_Finalize at destruction. One per process.
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
  const MpiPlacement& placement() const { return placement_; }
  /// Ends the whole job: every rank exits with code. For a rank that failed.
  [[noreturn]] static void Abort(int code);

 private:
  MpiPlacement placement_;
};

/// Collectives over MPI_COMM_WORLD on CPU tensors (float32, float64, int64, uint8).
class MpiCommunicator : public Communicator {
 public:
  explicit MpiCommunicator(const MpiPlacement& placement);
  ~MpiCommunicator() override;
  int rank() const override { return placement_.rank; }
  int world_size() const override { return placement_.world_size; }
  std::string backend() const override { return "mpi"; }

  /// Queues the all-reduce on the communication thread. Safe to call from autograd threads.
  std::shared_ptr<Work> AllReduceAsync(torch::Tensor tensor, ReduceOp op,
                                       std::string what) override;
  void Broadcast(torch::Tensor tensor, int root, const std::string& what) override;
  torch::Tensor AllGather(const torch::Tensor& tensor, const std::string& what) override;
  void Barrier(const std::string& what) override;
  /// MPI_Ibcast, tested every few milliseconds with sleeps between: an idle rank uses no core.
  void WaitForBroadcast(torch::Tensor tensor, int root, const std::string& what) override;

 private:
  /// Runs body on the communication thread; the returned work finishes when it has, and
  /// reports itself stuck after timeout (0: the communicator's).
  std::shared_ptr<Work> Submit(std::string what, std::function<void()> body,
                               std::chrono::milliseconds timeout = std::chrono::milliseconds(0));
  void Run();

  const MpiPlacement placement_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::pair<std::shared_ptr<Work>, std::function<void()>>> queue_;
  bool stop_ = false;
  std::thread thread_;
};

/// Messages from every rank to rank 0 on a communicator of their own (a duplicate of the
/// world's), beside the collectives and never waiting on them: a group's reports for its one
/// heartbeat. Its calls come from a thread other than the communication thread, so it needs
/// MPI_THREAD_MULTIPLE (MpiPlacement::thread_multiple). Every rank constructs it at once
/// (MPI_Comm_dup is collective), while no collective is in flight. Thread-safe.
class MpiMailbox {
 public:
  explicit MpiMailbox(const MpiPlacement& placement);
  /// Lets a send still in flight finish on its own; the communicator goes with MPI_Finalize
  /// (freeing it is collective, and a dead peer would never join).
  ~MpiMailbox();
  MpiMailbox(const MpiMailbox&) = delete;
  MpiMailbox& operator=(const MpiMailbox&) = delete;
  /// Ranks above 0: sends message to rank 0 without waiting; false, and message dropped, while
  /// the previous one has not been delivered.
  bool Post(const std::string& message);
  /// Rank 0: every message that has arrived, as (sender's rank, bytes), without waiting.
  std::vector<std::pair<int, std::string>> Collect();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace ddpm
