// Gradient all-reduce in buckets, as PyTorch DDP does it: parameters grouped into contiguous
// slices of the flat gradient, in reverse registration order (roughly the order backward
// produces them), each bucket all-reduced as soon as its last gradient is accumulated.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "trainer/communicator.h"
#include "trainer/trainer.h"

namespace ddpm {

/// PyTorch DDP's default bucket size.
constexpr double kDefaultBucketMb = 25.0;

/// One bucket: the flat-gradient elements [begin, end) and the parameter slots inside it.
struct Bucket {
  int64_t begin = 0;
  int64_t end = 0;
  std::vector<int> slots;
};

/// Groups slots (in registration order, consecutive in the flat buffer) into buckets of at least
/// bucket_bytes, walking them in reverse. A parameter larger than a bucket gets one of its own.
std::vector<Bucket> PlanBuckets(const std::vector<FlatParameters::Slot>& slots,
                                int64_t element_bytes, int64_t bucket_bytes);

/// A Trainer's handle to the ranks: averages its flat gradient over gradients' ranks, one bucket
/// at a time during backward, and runs the step's small all-reduces on control (the same
/// communicator on the CPU; NCCL and MPI on a GPU).
class GradientBuckets : public DataParallel {
 public:
  /// Hooks every parameter of module, whose gradients must live in params' flat buffer.
  GradientBuckets(torch::nn::Module& module, const FlatParameters& params, Communicator& gradients,
                  Communicator& control, double bucket_mb);
  ~GradientBuckets() override;

  int world_size() const override { return comm_.world_size(); }
  void AllReduce(torch::Tensor& tensor, ReduceOp op, const std::string& what) override;

  void BeginBackward(bool sync) override;
  /// Launches the buckets no hook launched (parameters without a gradient this step), waits for
  /// every bucket, and divides by the world size.
  void FinishBackward() override;

  const std::vector<Bucket>& buckets() const { return buckets_; }
  CommStats last_stats() const override { return last_stats_; }

 private:
  /// Called by autograd (any thread) once slot's gradient is accumulated.
  void OnGradientReady(int slot);
  /// Launches every ready bucket from next_launch_ on, in bucket order. Needs mutex_.
  void LaunchReadyBuckets();
  void Launch(std::size_t bucket);

  torch::Tensor grad_;
  Communicator& comm_;
  Communicator& control_;
  const std::vector<FlatParameters::Slot> slots_;
  std::vector<Bucket> buckets_;
  std::vector<int> bucket_of_slot_;
  // Keeps each parameter's gradient accumulator, and with it our hook, alive.
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators_;

  std::mutex mutex_;
  bool sync_ = false;
  int64_t step_ = 0;
  std::vector<uint8_t> slot_ready_;
  std::vector<int> pending_;
  std::size_t next_launch_ = 0;
  std::vector<std::shared_ptr<Work>> works_;
  CommStats last_stats_;
};

/// Makes a trainer's GradientBuckets over gradients and control: what a multi-process job puts
/// in DistributedContext::make_data_parallel.
std::function<std::unique_ptr<DataParallel>(Trainer&)> GradientBucketsFor(Communicator& gradients,
                                                                          Communicator& control,
                                                                          double bucket_mb);

}  // namespace ddpm
