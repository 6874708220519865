// A worker group in service mode: rank 0 registers it with the coordinator and receives run
// assignments, every rank trains the runs it is given and heartbeats, and the group returns to
// idle between runs without restarting mpirun. Torch-free header.
#pragma once

#include <functional>
#include <string>

#include "run/run.h"

namespace ddpm {

class Communicator;
class RankLink;
class RankRecorder;
struct WorkerOptions;

/// Builds the distributed context a run's config needs (its device and gradient backend).
using ContextFactory = std::function<DistributedContext(const Config&)>;

/// Serves the coordinator at options.coordinator until SIGINT or SIGTERM, or until it refuses
/// the group; comm carries the group's control messages. Returns the process exit code. A run
/// that fails with an error is reported and rethrown (the caller ends the job); a failed
/// collective (a peer gone) is reported as the group lost, so that the run is placed again.
/// recorder holds this rank's measurements (and names its device) for the heartbeats; with a
/// link, rank 0 sends one heartbeat for the group, else every rank sends its own. Every rank
/// watches its peers on the same host (PeerWatchdog): one that dies is reported at once, by
/// name, and the job ends.
int ServeGroup(const WorkerOptions& options, Communicator& comm, const ContextFactory& context_for,
               RankRecorder& recorder, RankLink* link = nullptr);

}  // namespace ddpm
