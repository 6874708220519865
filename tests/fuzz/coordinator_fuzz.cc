// The coordinator core's request handling (no gRPC): a request message decoded from the fuzz
// input (its first byte chooses the RPC, StartEval among them, the rest is the message as it comes
// off the wire), handled by a core that has one registered group training one run. Every request is
// handled or refused with CoordinatorError; afterwards the core still answers and its run keeps its
// invariants.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "coordinator/clock.h"
#include "coordinator/core.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

constexpr char kConfig[] =
    "model: {ch: 16, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [8], image_size: 16, "
    "norm_groups: 8}\ntrain: {steps: 100, batch_size: 8, checkpoint_every: 10}\n";

template <typename Message>
bool Decode(const uint8_t* data, std::size_t size, Message& message) {
  return message.ParseFromArray(data, static_cast<int>(size));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  namespace v1 = ddpm::v1;
  const std::string dir = ddpm::fuzz::ScratchDir() + "/coordinator";
  std::filesystem::remove_all(dir);
  ddpm::CoordinatorOptions options;
  options.data_dir = dir;
  options.heartbeat_interval_seconds = 1;
  options.heartbeat_timeout_seconds = 10;
  ddpm::FakeClock clock;
  ddpm::Coordinator core(options, clock);
  v1::RegisterRequest group;
  group.set_group_id("g");
  group.set_world_size(2);
  core.Register(group);
  v1::StartRunRequest start;
  start.set_name("r");
  start.set_config_yaml(kConfig);
  const std::string run_id = core.StartRun(start).id();

  const uint8_t* body = data + 1;
  const std::size_t length = size - 1;
  try {
    switch (data[0] % 8) {
      case 0: {
        v1::StartRunRequest request;
        if (Decode(body, length, request)) core.StartRun(request);
        break;
      }
      case 1: {
        v1::RegisterRequest request;
        if (Decode(body, length, request)) core.Register(request);
        break;
      }
      case 2: {
        v1::HeartbeatRequest request;
        if (Decode(body, length, request)) core.Heartbeat(request);
        break;
      }
      case 3: {
        v1::ReportCheckpointRequest request;
        if (Decode(body, length, request)) core.ReportCheckpoint(request);
        break;
      }
      case 4: {
        v1::ReportEvalRequest request;
        if (Decode(body, length, request)) core.ReportEval(request);
        break;
      }
      case 5: {
        v1::ReportRunEndRequest request;
        if (Decode(body, length, request)) core.ReportRunEnd(request);
        break;
      }
      case 6: {
        v1::LeaveRequest request;
        if (Decode(body, length, request)) core.Leave(request);
        break;
      }
      default: {
        // The first byte's next bit splits the last choice, so older corpus files keep theirs.
        if ((data[0] / 8) % 2 == 1) {
          v1::StartEvalRequest request;
          if (Decode(body, length, request)) core.StartEval(request);
        } else {
          v1::StopRunRequest request;
          if (Decode(body, length, request)) core.StopRun(request.run(), request.immediate());
        }
        break;
      }
    }
  } catch (const ddpm::CoordinatorError&) {
  }
  // The core still answers, and the run it had is there with a consistent record.
  clock.Advance(1);
  core.Tick();
  const v1::Run run = core.GetRun(run_id);
  if (run.id() != run_id || run.total_steps() != 100) std::abort();
  if (run.metrics().step() < 0 || run.restarts() > run.max_restarts()) std::abort();
  core.ListRuns(v1::RUN_STATE_UNSPECIFIED);
  return 0;
}
