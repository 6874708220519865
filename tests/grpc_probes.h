// Probes of the coordinator's standard services that only the tests make: watching
// grpc.health.v1 and listing services by reflection (ddpmctl needs only CheckHealth).
#pragma once

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace ddpm {

/// grpc.health.v1.Health/Watch of service: on_status sees each status the server sends until it
/// returns false or the stream ends; returns the last status seen.
std::string WatchHealth(const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
                        double timeout_seconds,
                        const std::function<bool(const std::string&)>& on_status);
/// The services the server's reflection (grpc.reflection.v1alpha.ServerReflection) lists.
std::vector<std::string> ReflectedServices(const std::shared_ptr<grpc::Channel>& channel,
                                           double timeout_seconds);

}  // namespace ddpm
