// How a run's state is written for people: the one naming the coordinator's logs and reasons
// and ddpmctl's output share. Protobuf only, no gRPC.
#pragma once

#include <string>

#include "ddpm/v1/run.pb.h"

namespace ddpm {

/// "RUNNING", "COMPLETED", ...: the state's name in run.proto.
inline std::string StateName(v1::RunState state) { return v1::RunState_Name(state); }

}  // namespace ddpm
