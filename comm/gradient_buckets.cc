#include "comm/gradient_buckets.h"

#include <torch/csrc/autograd/utils/lambda_post_hook.h>

#include <algorithm>
#include <stdexcept>

namespace ddpm {

std::vector<Bucket> PlanBuckets(const std::vector<FlatParameters::Slot>& slots,
                                int64_t element_bytes, int64_t bucket_bytes) {
  std::vector<Bucket> buckets;
  Bucket current;
  for (int i = static_cast<int>(slots.size()) - 1; i >= 0; --i) {
    const FlatParameters::Slot& slot = slots[i];
    if (current.slots.empty()) current.end = slot.offset + slot.numel;
    if (!current.slots.empty() && current.begin != slot.offset + slot.numel) {
      throw std::invalid_argument("PlanBuckets: parameter '" + slot.name +
                                  "' is not adjacent to the next one in the flat buffer");
    }
    current.begin = slot.offset;
    current.slots.push_back(i);
    if ((current.end - current.begin) * element_bytes >= bucket_bytes) {
      buckets.push_back(std::move(current));
      current = Bucket{};
    }
  }
  if (!current.slots.empty()) buckets.push_back(std::move(current));
  return buckets;
}

GradientBuckets::GradientBuckets(torch::nn::Module& module, const FlatParameters& params,
                                 Communicator& gradients, Communicator& control, double bucket_mb)
    : grad_(params.grad()), comm_(gradients), control_(control), slots_(params.slots()) {
  TORCH_CHECK(grad_.defined(), "GradientBuckets: the flat parameters have no gradient buffer");
  buckets_ = PlanBuckets(slots_, static_cast<int64_t>(grad_.element_size()),
                         static_cast<int64_t>(bucket_mb * (1 << 20)));
  bucket_of_slot_.assign(slots_.size(), -1);
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    for (int slot : buckets_[b].slots) bucket_of_slot_[slot] = static_cast<int>(b);
  }
  slot_ready_.assign(slots_.size(), 0);
  pending_.assign(buckets_.size(), 0);

  const auto named = module.named_parameters();
  TORCH_CHECK(named.size() == slots_.size(), "GradientBuckets: the module has ", named.size(),
              " parameters, the flat buffer ", slots_.size());
  for (std::size_t i = 0; i < named.size(); ++i) {
    TORCH_CHECK(named[i].key() == slots_[i].name, "GradientBuckets: parameter ", i, " is '",
                named[i].key(), "' in the module but '", slots_[i].name, "' in the flat buffer");
    std::shared_ptr<torch::autograd::Node> accumulator =
        torch::autograd::impl::grad_accumulator(named[i].value());
    const int slot = static_cast<int>(i);
    accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [this, slot](const torch::autograd::variable_list& outputs,
                     const torch::autograd::variable_list&) {
          OnGradientReady(slot);
          return outputs;
        }));
    accumulators_.push_back(std::move(accumulator));
  }
}

// No waiting here: after a failed step the all-reduces may never finish (a peer is gone), and
// each one holds its own reference to the gradient memory it works on.
GradientBuckets::~GradientBuckets() = default;

void GradientBuckets::BeginBackward(bool sync) {
  std::lock_guard<std::mutex> lock(mutex_);
  sync_ = sync;
  if (!sync) return;
  std::fill(slot_ready_.begin(), slot_ready_.end(), 0);
  for (std::size_t b = 0; b < buckets_.size(); ++b) {
    pending_[b] = static_cast<int>(buckets_[b].slots.size());
  }
  next_launch_ = 0;
  works_.assign(buckets_.size(), nullptr);
}

void GradientBuckets::OnGradientReady(int slot) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!sync_) return;
  if (slot_ready_[slot] != 0) {
    throw std::logic_error("gradient of '" + slots_[slot].name +
                           "' was produced twice in one backward; a parameter used twice needs "
                           "its gradient complete before its bucket is all-reduced");
  }
  slot_ready_[slot] = 1;
  --pending_[bucket_of_slot_[slot]];
  LaunchReadyBuckets();
}

void GradientBuckets::LaunchReadyBuckets() {
  // In bucket order on every rank, so that the collectives match across ranks.
  while (next_launch_ < buckets_.size() && pending_[next_launch_] == 0) Launch(next_launch_++);
}

void GradientBuckets::Launch(std::size_t bucket) {
  const Bucket& b = buckets_[bucket];
  works_[bucket] = comm_.AllReduceAsync(grad_.narrow(0, b.begin, b.end - b.begin), ReduceOp::kSum,
                                        "all-reduce of gradient bucket " + std::to_string(bucket) +
                                            "/" + std::to_string(buckets_.size()) + " (step " +
                                            std::to_string(step_ + 1) + ")");
}

void GradientBuckets::FinishBackward() {
  const auto backward_end = std::chrono::steady_clock::now();
  std::vector<std::shared_ptr<Work>> works;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(sync_, "GradientBuckets: FinishBackward without a synchronising backward");
    // Parameters that got no gradient this step leave their buckets pending: send them as they
    // are (zeros, or what earlier micro-batches accumulated).
    while (next_launch_ < buckets_.size()) Launch(next_launch_++);
    works = works_;
    sync_ = false;
  }
  using Clock = std::chrono::steady_clock;
  Clock::time_point last_end = backward_end;
  double busy = 0, hidden = 0;
  for (const auto& work : works) {
    work->Wait();
    const Clock::time_point start = work->started(), end = work->finished();
    last_end = std::max(last_end, end);
    busy += std::chrono::duration<double>(end - start).count();
    if (start < backward_end) {
      hidden += std::chrono::duration<double>(std::min(end, backward_end) - start).count();
    }
  }
  {
    torch::NoGradGuard no_grad;
    grad_.div_(comm_.world_size());
  }
  ++step_;
  last_stats_.allreduce_seconds = busy;
  last_stats_.overlap_fraction = busy > 0 ? hidden / busy : 0;
  last_stats_.exposed_seconds = std::chrono::duration<double>(last_end - backward_end).count();
}

void GradientBuckets::AllReduce(torch::Tensor& tensor, ReduceOp op, const std::string& what) {
  control_.AllReduce(tensor, op, what);
}

std::function<std::unique_ptr<DataParallel>(Trainer&)> GradientBucketsFor(Communicator& gradients,
                                                                          Communicator& control,
                                                                          double bucket_mb) {
  return [&gradients, &control, bucket_mb](Trainer& trainer) -> std::unique_ptr<DataParallel> {
    return std::make_unique<GradientBuckets>(*trainer.model(), trainer.parameters(), gradients,
                                             control, bucket_mb);
  };
}

}  // namespace ddpm
