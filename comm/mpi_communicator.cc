#include "comm/mpi_communicator.h"

#include <mpi.h>
#include <torch/torch.h>

#include <cstdlib>

#include "base/check.h"

namespace ddpm {
namespace {

int WorldRank() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) return -1;
  int rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

// Throws CommError naming the MPI call, where it was made, the rank and MPI's own reason.
void CheckMpi(int code, const char* call, const char* file, int line) {
  if (code == MPI_SUCCESS) return;
  char reason[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, reason, &length) != MPI_SUCCESS) length = 0;
  throw CommError(CheckFailureMessage("rank " + std::to_string(WorldRank()), call, file, line,
                                      std::string(reason, length)));
}

#define DDPM_MPI_CHECK(call) ::ddpm::CheckMpi((call), #call, __FILE__, __LINE__)

MPI_Datatype MpiType(const torch::Tensor& tensor, const std::string& what) {
  switch (tensor.scalar_type()) {
    case torch::kFloat32:
      return MPI_FLOAT;
    case torch::kFloat64:
      return MPI_DOUBLE;
    case torch::kInt64:
      return MPI_INT64_T;
    case torch::kUInt8:
      return MPI_UINT8_T;
    default:
      throw CommError(what + ": the MPI backend does not handle " +
                      std::string(c10::toString(tensor.scalar_type())) + " tensors");
  }
}

void CheckCpuContiguous(const torch::Tensor& tensor, const std::string& what) {
  if (!tensor.device().is_cpu() || !tensor.is_contiguous()) {
    throw CommError(what + ": the MPI backend needs a contiguous CPU tensor, got one on " +
                    tensor.device().str() + (tensor.is_contiguous() ? "" : " (not contiguous)"));
  }
}

int Count(const torch::Tensor& tensor, const std::string& what) {
  if (tensor.numel() > std::numeric_limits<int>::max()) {
    throw CommError(what + ": " + std::to_string(tensor.numel()) +
                    " elements are more than one MPI call takes; use smaller buckets");
  }
  return static_cast<int>(tensor.numel());
}

}  // namespace

bool LaunchedByMpi() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"}) {
    if (std::getenv(name) != nullptr) return true;
  }
  return false;
}

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int provided = MPI_THREAD_SINGLE;
  DDPM_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided));
  if (provided < MPI_THREAD_SERIALIZED) {
    MPI_Finalize();
    throw CommError(
        "MPI provides thread level " + std::to_string(provided) +
        ", below MPI_THREAD_SERIALIZED; ddpm_worker calls MPI from its communication thread. "
        "Use an MPI built with thread support (Open MPI is)");
  }
  placement_.thread_multiple = provided >= MPI_THREAD_MULTIPLE;
  DDPM_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &placement_.rank));
  DDPM_MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &placement_.world_size));
  MPI_Comm local = MPI_COMM_NULL;
  DDPM_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, placement_.rank,
                                     MPI_INFO_NULL, &local));
  DDPM_MPI_CHECK(MPI_Comm_rank(local, &placement_.local_rank));
  DDPM_MPI_CHECK(MPI_Comm_size(local, &placement_.local_size));
  DDPM_MPI_CHECK(MPI_Comm_free(&local));
  // Errors come back as codes, which DDPM_MPI_CHECK turns into messages, not as aborts.
  DDPM_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
}

MpiRuntime::~MpiRuntime() { MPI_Finalize(); }

void MpiRuntime::Abort(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);
}

MpiCommunicator::MpiCommunicator(const MpiPlacement& placement) : placement_(placement) {
  thread_ = std::thread([this] { Run(); });
}

MpiCommunicator::~MpiCommunicator() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  changed_.notify_all();
  thread_.join();
}

void MpiCommunicator::Run() {
  while (true) {
    std::pair<std::shared_ptr<Work>, std::function<void()>> task;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      changed_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task.first->MarkStarted();
    try {
      task.second();
      task.first->Finish();
    } catch (...) {
      task.first->Finish(std::current_exception());
    }
  }
}

std::shared_ptr<Work> MpiCommunicator::Submit(std::string what, std::function<void()> body,
                                              std::chrono::milliseconds timeout) {
  auto work = std::make_shared<Work>(std::move(what), placement_.rank,
                                     timeout.count() > 0 ? timeout : timeout_);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.emplace_back(work, std::move(body));
  }
  changed_.notify_all();
  return work;
}

std::shared_ptr<Work> MpiCommunicator::AllReduceAsync(torch::Tensor tensor, ReduceOp op,
                                                      std::string what) {
  CheckCpuContiguous(tensor, what);
  const MPI_Datatype type = MpiType(tensor, what);
  const int count = Count(tensor, what);
  const int world = placement_.world_size;
  return Submit(what, [tensor, type, count, op, world]() mutable {
    DDPM_MPI_CHECK(
        MPI_Allreduce(MPI_IN_PLACE, tensor.data_ptr(), count, type, MPI_SUM, MPI_COMM_WORLD));
    if (op == ReduceOp::kAverage) {
      torch::NoGradGuard no_grad;
      tensor.div_(world);
    }
  });
}

void MpiCommunicator::Broadcast(torch::Tensor tensor, int root, const std::string& what) {
  CheckCpuContiguous(tensor, what);
  const MPI_Datatype type = MpiType(tensor, what);
  const int count = Count(tensor, what);
  Submit(what, [tensor, type, count, root]() mutable {
    DDPM_MPI_CHECK(MPI_Bcast(tensor.data_ptr(), count, type, root, MPI_COMM_WORLD));
  })->Wait();
}

torch::Tensor MpiCommunicator::AllGather(const torch::Tensor& tensor, const std::string& what) {
  const torch::Tensor input = tensor.contiguous();
  CheckCpuContiguous(input, what);
  const MPI_Datatype type = MpiType(input, what);
  const int count = Count(input, what);
  std::vector<int64_t> shape = {placement_.world_size};
  shape.insert(shape.end(), input.sizes().begin(), input.sizes().end());
  torch::Tensor output = torch::empty(shape, input.options());
  Submit(what, [input, output, type, count]() mutable {
    DDPM_MPI_CHECK(MPI_Allgather(input.data_ptr(), count, type, output.data_ptr(), count, type,
                                 MPI_COMM_WORLD));
  })->Wait();
  return output;
}

void MpiCommunicator::WaitForBroadcast(torch::Tensor tensor, int root, const std::string& what) {
  CheckCpuContiguous(tensor, what);
  const MPI_Datatype type = MpiType(tensor, what);
  const int count = Count(tensor, what);
  Submit(
      what,
      [tensor, type, count, root]() mutable {
        MPI_Request request = MPI_REQUEST_NULL;
        DDPM_MPI_CHECK(MPI_Ibcast(tensor.data_ptr(), count, type, root, MPI_COMM_WORLD, &request));
        int done = 0;
        while (true) {
          DDPM_MPI_CHECK(MPI_Test(&request, &done, MPI_STATUS_IGNORE));
          if (done) return;
          std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
      },
      std::chrono::hours(24 * 365))
      ->Wait();
}

void MpiCommunicator::Barrier(const std::string& what) {
  Submit(what, [] { DDPM_MPI_CHECK(MPI_Barrier(MPI_COMM_WORLD)); })->Wait();
}

struct MpiMailbox::State {
  MPI_Comm comm = MPI_COMM_NULL;
  std::mutex mutex;
  // The message in flight (ranks above 0) and its bytes, kept until it has left.
  MPI_Request pending = MPI_REQUEST_NULL;
  std::string sending;
};

namespace {
constexpr int kMailboxTag = 7;
}  // namespace

MpiMailbox::MpiMailbox(const MpiPlacement& placement) : state_(std::make_unique<State>()) {
  if (!placement.thread_multiple) {
    throw CommError("rank " + std::to_string(placement.rank) +
                    ": MPI does not provide MPI_THREAD_MULTIPLE, which the group's report "
                    "mailbox needs");
  }
  DDPM_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &state_->comm));
}

MpiMailbox::~MpiMailbox() {
  if (state_->pending == MPI_REQUEST_NULL) return;
  MPI_Request_free(&state_->pending);
  // The send may still read its bytes after the request is freed: they stay to the process's
  // end (one small message at most).
  static_cast<void>(state_.release());  // NOLINT(bugprone-unused-return-value)
}

bool MpiMailbox::Post(const std::string& message) {
  std::lock_guard<std::mutex> lock(state_->mutex);
  if (state_->pending != MPI_REQUEST_NULL) {
    int done = 0;
    DDPM_MPI_CHECK(MPI_Test(&state_->pending, &done, MPI_STATUS_IGNORE));
    if (!done) return false;
  }
  if (message.size() > static_cast<size_t>(std::numeric_limits<int>::max())) {
    throw CommError("a report of " + std::to_string(message.size()) + " bytes is too large");
  }
  state_->sending = message;
  DDPM_MPI_CHECK(MPI_Isend(state_->sending.data(), static_cast<int>(state_->sending.size()),
                           MPI_BYTE, 0, kMailboxTag, state_->comm, &state_->pending));
  return true;
}

std::vector<std::pair<int, std::string>> MpiMailbox::Collect() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  std::vector<std::pair<int, std::string>> messages;
  while (true) {
    int found = 0;
    MPI_Message handle = MPI_MESSAGE_NULL;
    MPI_Status status;
    DDPM_MPI_CHECK(
        MPI_Improbe(MPI_ANY_SOURCE, kMailboxTag, state_->comm, &found, &handle, &status));
    if (!found) return messages;
    int count = 0;
    DDPM_MPI_CHECK(MPI_Get_count(&status, MPI_BYTE, &count));
    std::string bytes(static_cast<size_t>(count), '\0');
    DDPM_MPI_CHECK(MPI_Mrecv(bytes.data(), count, MPI_BYTE, &handle, MPI_STATUS_IGNORE));
    messages.emplace_back(status.MPI_SOURCE, std::move(bytes));
  }
}

}  // namespace ddpm
