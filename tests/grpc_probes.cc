#include "tests/grpc_probes.h"

#include "proto/raw_call.h"
#include "proto/rpc.h"

namespace ddpm {

std::string WatchHealth(const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
                        double timeout_seconds,
                        const std::function<bool(const std::string&)>& on_status) {
  RawStream call(channel, "/grpc.health.v1.Health/Watch", timeout_seconds);
  if (!call.Write(HealthRequest(service)) || !call.WritesDone()) {
    const grpc::Status status = call.Finish();
    throw RpcSetupError(DescribeStatus("grpc.health.v1.Health/Watch", status));
  }
  std::string response, last;
  while (call.Read(response)) {
    last = HealthStatusName(response);
    if (!on_status(last)) break;
  }
  return last;
}

std::vector<std::string> ReflectedServices(const std::shared_ptr<grpc::Channel>& channel,
                                           double timeout_seconds) {
  const std::string method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
  RawStream call(channel, method, timeout_seconds);
  std::string response;
  // ServerReflectionRequest { list_services = 7 }.
  const bool read = call.Write(BytesField(7, "*")) && call.WritesDone() && call.Read(response);
  const grpc::Status status = call.Finish();
  if (!status.ok()) throw RpcSetupError(DescribeStatus("ServerReflectionInfo", status));
  if (!read) throw RpcSetupError("ServerReflectionInfo: no response");
  // ServerReflectionResponse { list_services_response = 6 { repeated service = 1 { name = 1 } } }.
  std::vector<std::string> services;
  ForEachField(response, [&](int number, int type, uint64_t, const std::string& list) {
    if (number != 6 || type != 2) return;
    ForEachField(list, [&](int n, int t, uint64_t, const std::string& entry) {
      if (n != 1 || t != 2) return;
      ForEachField(entry, [&](int k, int w, uint64_t, const std::string& name) {
        if (k == 1 && w == 2) services.push_back(name);
      });
    });
  });
  return services;
}

}  // namespace ddpm
