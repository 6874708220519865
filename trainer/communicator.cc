#include "trainer/communicator.h"

#include <torch/torch.h>

#include <cstdio>

#include "base/text.h"

namespace ddpm {
namespace {

std::string SecondsText(std::chrono::milliseconds timeout) {
  return FormatSeconds(timeout.count() / 1000.0);
}

}  // namespace

Work::Work(std::string what, int rank, std::chrono::milliseconds timeout)
    : what_(std::move(what)), rank_(rank), timeout_(timeout) {}

void Work::Wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!changed_.wait_for(lock, timeout_, [&] { return done_; })) {
    throw CommError("rank " + std::to_string(rank_) + ": " + what_ + " did not complete within " +
                    SecondsText(timeout_) +
                    " (dist.timeout_seconds); a peer rank is stuck or gone");
  }
  if (error_) std::rethrow_exception(error_);
}

void Work::Finish(std::exception_ptr error) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    done_ = true;
    error_ = std::move(error);
    finished_ = std::chrono::steady_clock::now();
    if (started_ == std::chrono::steady_clock::time_point{}) started_ = finished_;
  }
  changed_.notify_all();
}

void Work::MarkStarted() {
  std::lock_guard<std::mutex> lock(mutex_);
  started_ = std::chrono::steady_clock::now();
}

bool Work::done() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return done_;
}

std::chrono::steady_clock::time_point Work::started() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return started_;
}

std::chrono::steady_clock::time_point Work::finished() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return finished_;
}

void Communicator::AllReduce(torch::Tensor tensor, ReduceOp op, const std::string& what) {
  AllReduceAsync(std::move(tensor), op, what)->Wait();
}

std::shared_ptr<Work> SoloCommunicator::AllReduceAsync(torch::Tensor, ReduceOp, std::string what) {
  auto work = std::make_shared<Work>(std::move(what), 0, timeout_);
  work->Finish();
  return work;
}

// The rendezvous of a LocalGroup: each collective is a generation; every rank deposits its
// tensor, the last one to arrive combines them, and all leave with the result.
struct LocalGroup::State {
  explicit State(int world) : world_size(world), inputs(world) {}
  const int world_size;
  std::mutex mutex;
  std::condition_variable changed;
  int64_t generation = 0;
  int arrived = 0;
  std::vector<torch::Tensor> inputs;
  torch::Tensor result;
  std::string what;

  // Runs one collective for rank: combine(inputs) is computed once, by the last arrival.
  torch::Tensor Exchange(int rank, const torch::Tensor& input, const std::string& name,
                         std::chrono::milliseconds timeout,
                         const std::function<torch::Tensor(std::vector<torch::Tensor>&)>& combine) {
    std::unique_lock<std::mutex> lock(mutex);
    const int64_t my_generation = generation;
    if (arrived == 0) what = name;
    if (what != name) {
      throw CommError("rank " + std::to_string(rank) + ": called " + name +
                      " while the other ranks are in " + what);
    }
    inputs[rank] = input;
    if (++arrived == world_size) {
      torch::NoGradGuard no_grad;
      result = combine(inputs);
      arrived = 0;
      ++generation;
      changed.notify_all();
    } else if (!changed.wait_for(lock, timeout, [&] { return generation != my_generation; })) {
      throw CommError("rank " + std::to_string(rank) + ": " + name + " did not complete within " +
                      SecondsText(timeout) + "; a peer rank is stuck");
    }
    return result;
  }
};

namespace {

class LocalCommunicator : public Communicator {
 public:
  LocalCommunicator(std::shared_ptr<LocalGroup::State> state, int rank)
      : state_(std::move(state)), rank_(rank) {}
  int rank() const override { return rank_; }
  int world_size() const override { return state_->world_size; }
  std::string backend() const override { return "local"; }

  std::shared_ptr<Work> AllReduceAsync(torch::Tensor tensor, ReduceOp op,
                                       std::string what) override {
    auto work = std::make_shared<Work>(what, rank_, timeout_);
    work->MarkStarted();
    const int world = state_->world_size;
    const torch::Tensor sum =
        state_->Exchange(rank_, tensor, what, timeout_, [&](std::vector<torch::Tensor>& inputs) {
          torch::Tensor total = inputs[0].clone();
          for (int r = 1; r < world; ++r) total.add_(inputs[r]);
          if (op == ReduceOp::kAverage) total.div_(world);
          return total;
        });
    // Every rank must have read the inputs before any overwrites its own.
    state_->Exchange(rank_, torch::Tensor(), what + " (done)", timeout_,
                     [](std::vector<torch::Tensor>&) { return torch::Tensor(); });
    {
      torch::NoGradGuard no_grad;
      tensor.copy_(sum);
    }
    work->Finish();
    return work;
  }

  void Broadcast(torch::Tensor tensor, int root, const std::string& what) override {
    const torch::Tensor value = state_->Exchange(
        rank_, tensor, what, timeout_,
        [root](std::vector<torch::Tensor>& inputs) { return inputs[root].clone(); });
    state_->Exchange(rank_, torch::Tensor(), what + " (done)", timeout_,
                     [](std::vector<torch::Tensor>&) { return torch::Tensor(); });
    torch::NoGradGuard no_grad;
    tensor.copy_(value);
  }

  torch::Tensor AllGather(const torch::Tensor& tensor, const std::string& what) override {
    return state_->Exchange(rank_, tensor, what, timeout_, [](std::vector<torch::Tensor>& inputs) {
      return torch::stack(inputs);
    });
  }

  void Barrier(const std::string& what) override {
    state_->Exchange(rank_, torch::Tensor(), what, timeout_,
                     [](std::vector<torch::Tensor>&) { return torch::Tensor(); });
  }

 private:
  std::shared_ptr<LocalGroup::State> state_;
  const int rank_;
};

}  // namespace

LocalGroup::LocalGroup(int world_size) : state_(std::make_shared<State>(world_size)) {
  for (int r = 0; r < world_size; ++r) {
    ranks_.push_back(std::make_unique<LocalCommunicator>(state_, r));
  }
}

LocalGroup::~LocalGroup() = default;

Communicator& LocalGroup::rank(int rank) { return *ranks_.at(rank); }

void Communicator::WaitForBroadcast(torch::Tensor tensor, int root, const std::string& what) {
  const std::chrono::milliseconds timeout = timeout_;
  timeout_ = std::chrono::hours(24 * 365);
  try {
    Broadcast(tensor, root, what);
  } catch (...) {
    timeout_ = timeout;
    throw;
  }
  timeout_ = timeout;
}

}  // namespace ddpm
