#include "comm/nccl_communicator.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <nccl.h>
#include <torch/torch.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "base/check.h"

namespace ddpm {
namespace {

// Throws CommError naming the call, where it was made, the rank and the library's own reason.
void CheckNccl(ncclResult_t code, const char* call, const char* file, int line, int rank) {
  if (code == ncclSuccess) return;
  throw CommError(CheckFailureMessage("rank " + std::to_string(rank), call, file, line,
                                      ncclGetErrorString(code)));
}

void CheckCuda(cudaError_t code, const char* call, const char* file, int line, int rank) {
  if (code == cudaSuccess) return;
  throw CommError(CheckFailureMessage("rank " + std::to_string(rank), call, file, line,
                                      cudaGetErrorString(code)));
}

#define DDPM_NCCL_CHECK(call) CheckNccl((call), #call, __FILE__, __LINE__, rank_)
#define DDPM_CUDA_CHECK(call) CheckCuda((call), #call, __FILE__, __LINE__, rank_)

ncclDataType_t NcclType(const torch::Tensor& tensor, const std::string& what) {
  switch (tensor.scalar_type()) {
    case torch::kFloat32:
      return ncclFloat32;
    case torch::kFloat64:
      return ncclFloat64;
    case torch::kFloat16:
      return ncclFloat16;
    case torch::kBFloat16:
      return ncclBfloat16;
    case torch::kInt64:
      return ncclInt64;
    case torch::kUInt8:
      return ncclUint8;
    default:
      throw CommError(what + ": the NCCL backend does not handle " +
                      std::string(c10::toString(tensor.scalar_type())) + " tensors");
  }
}

class NcclCommunicator : public Communicator {
 public:
  NcclCommunicator(const MpiPlacement& placement, Communicator& bootstrap)
      : rank_(placement.rank),
        world_(placement.world_size),
        device_(torch::kCUDA, static_cast<c10::DeviceIndex>(placement.local_rank)),
        guard_(device_),
        stream_(c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device_.index())) {
    ncclUniqueId id;
    if (rank_ == 0) DDPM_NCCL_CHECK(ncclGetUniqueId(&id));
    torch::Tensor bytes = torch::from_blob(&id, {static_cast<int64_t>(sizeof(id))}, torch::kUInt8);
    bootstrap.Broadcast(bytes, 0, "broadcast of the ncclUniqueId");
    DDPM_NCCL_CHECK(ncclCommInitRank(&comm_, world_, id, rank_));
    watcher_ = std::thread([this] { Watch(); });
  }

  ~NcclCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    changed_.notify_all();
    watcher_.join();
    if (aborted_) {
      ncclCommAbort(comm_);
    } else {
      ncclCommDestroy(comm_);
    }
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  std::string backend() const override { return "nccl"; }

  std::shared_ptr<Work> AllReduceAsync(torch::Tensor tensor, ReduceOp op,
                                       std::string what) override {
    return Enqueue(tensor, what, [&](cudaStream_t stream) {
      DDPM_NCCL_CHECK(ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(),
                                    static_cast<size_t>(tensor.numel()), NcclType(tensor, what),
                                    op == ReduceOp::kAverage ? ncclAvg : ncclSum, comm_, stream));
    });
  }

  void Broadcast(torch::Tensor tensor, int root, const std::string& what) override {
    Enqueue(tensor, what, [&](cudaStream_t stream) {
      DDPM_NCCL_CHECK(ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(),
                                    static_cast<size_t>(tensor.numel()), NcclType(tensor, what),
                                    root, comm_, stream));
    })->Wait();
  }

  torch::Tensor AllGather(const torch::Tensor& tensor, const std::string& what) override {
    const torch::Tensor input = tensor.to(device_).contiguous();
    std::vector<int64_t> shape = {world_};
    shape.insert(shape.end(), input.sizes().begin(), input.sizes().end());
    torch::Tensor output = torch::empty(shape, input.options());
    Enqueue(output, what, [&](cudaStream_t stream) {
      c10::cuda::CUDACachingAllocator::recordStream(input.storage().data_ptr(),
                                                    c10::cuda::CUDAStream(stream_));
      DDPM_NCCL_CHECK(ncclAllGather(input.data_ptr(), output.data_ptr(),
                                    static_cast<size_t>(input.numel()), NcclType(input, what),
                                    comm_, stream));
    })->Wait();
    return output.to(tensor.device());
  }

  void Barrier(const std::string& what) override {
    torch::Tensor one = torch::ones({1}, torch::TensorOptions().device(device_));
    AllReduceAsync(one, ReduceOp::kSum, what)->Wait();
  }

 private:
  // Orders the collective after the compute stream's work so far, launches it on the
  // communication stream, and hands its completion to the watcher thread.
  std::shared_ptr<Work> Enqueue(const torch::Tensor& tensor, const std::string& what,
                                const std::function<void(cudaStream_t)>& launch) {
    if (!tensor.is_cuda() || !tensor.is_contiguous()) {
      throw CommError(what + ": the NCCL backend needs a contiguous CUDA tensor, got one on " +
                      tensor.device().str());
    }
    c10::cuda::CUDAGuard device_guard(device_);
    auto work = std::make_shared<Work>(what, rank_, timeout_);
    at::cuda::CUDAEvent ready;
    ready.record(c10::cuda::getCurrentCUDAStream(device_.index()));
    ready.block(stream_);
    c10::cuda::CUDACachingAllocator::recordStream(tensor.storage().data_ptr(), stream_);
    work->MarkStarted();
    launch(stream_.stream());
    auto done = std::make_shared<at::cuda::CUDAEvent>();
    done->record(stream_);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      pending_.emplace_back(work, done);
    }
    changed_.notify_all();
    return work;
  }

  // Finishes each work once its event has passed; on a timeout fails the work with a CommError
  // and marks the communicator aborted (the destructor then calls ncclCommAbort).
  void Watch() {
    DDPM_CUDA_CHECK(cudaSetDevice(device_.index()));
    while (true) {
      std::pair<std::shared_ptr<Work>, std::shared_ptr<at::cuda::CUDAEvent>> item;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [&] { return stop_ || !pending_.empty(); });
        if (pending_.empty()) return;
        item = pending_.front();
        pending_.pop_front();
      }
      const auto deadline = std::chrono::steady_clock::now() + timeout_;
      while (!item.second->query()) {
        if (std::chrono::steady_clock::now() > deadline) {
          aborted_ = true;
          item.first->Finish(std::make_exception_ptr(
              CommError("rank " + std::to_string(rank_) + ": " + item.first->what() +
                        " did not complete within dist.timeout_seconds; aborting NCCL")));
          break;
        }
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
      if (!item.first->done()) item.first->Finish();
    }
  }

  const int rank_;
  const int world_;
  const torch::Device device_;
  c10::cuda::CUDAGuard guard_;
  c10::cuda::CUDAStream stream_;
  ncclComm_t comm_ = nullptr;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::pair<std::shared_ptr<Work>, std::shared_ptr<at::cuda::CUDAEvent>>> pending_;
  bool stop_ = false;
  std::atomic<bool> aborted_{false};
  std::thread watcher_;
};

}  // namespace

std::unique_ptr<Communicator> MakeNcclCommunicator(const MpiPlacement& placement,
                                                   Communicator& bootstrap) {
  return std::make_unique<NcclCommunicator>(placement, bootstrap);
}

}  // namespace ddpm
