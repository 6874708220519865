// What every gRPC client and the coordinator share: tokens, channels and readable errors.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace google::protobuf {
class Message;
}  // namespace google::protobuf

namespace ddpm {

/// A message as Protobuf's JSON mapping with the .proto's field names, on one line: what
/// ddpmctl --json prints and the console's /api/v1/ serves.
std::string ToJson(const google::protobuf::Message& message);

/// A token, certificate or address could not be read or is malformed; the message names it.
class RpcSetupError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The bearer token from file if given, else from the environment variable env; throws
/// RpcSetupError naming both when neither has one. Tokens never come from flags, which `ps`
/// shows.
std::string ReadToken(const std::string& file, const char* env);

/// Whether a presented token equals the expected one (never when expected is empty), in time
/// independent of where they differ. The gRPC services and the console compare tokens so.
bool SameToken(const std::string& given, const std::string& expected);

/// The whole text of a file; throws RpcSetupError naming it.
std::string ReadTextFile(const std::string& path, const std::string& what);

/// How a client reaches the coordinator.
struct ChannelOptions {
  /// HOST:PORT.
  std::string address = "127.0.0.1:7070";
  /// PEM file of the CA that signed the coordinator's certificate; empty: plaintext.
  std::string tls_ca;
  /// PEM client certificate and its key, for a coordinator that requires mutual TLS of worker
  /// groups (its --tls-client-ca signed the certificate); both or neither.
  std::string tls_cert;
  std::string tls_key;
  /// The largest message the client accepts, in bytes.
  int max_message_bytes = 16 << 20;
};

/// A channel to the coordinator, over TLS when options.tls_ca is set.
std::shared_ptr<grpc::Channel> MakeChannel(const ChannelOptions& options);

/// A client of Service (e.g. v1::Control) over a new channel to the coordinator.
template <typename Service>
auto MakeClient(const std::shared_ptr<grpc::Channel>& channel) {
  return Service::NewStub(channel);
}
template <typename Service>
auto MakeClient(const ChannelOptions& options) {
  return MakeClient<Service>(MakeChannel(options));
}

/// A client context that carries the bearer token and, if timeout is positive, a deadline.
std::unique_ptr<grpc::ClientContext> MakeContext(
    const std::string& token, std::chrono::milliseconds timeout = std::chrono::milliseconds(0));

/// One line: "<rpc>: <CODE>: <message>", e.g. "StartRun: INVALID_ARGUMENT: config: ...".
std::string DescribeStatus(const std::string& rpc, const grpc::Status& status);

/// The name of a gRPC status code, e.g. "NOT_FOUND".
const char* StatusCodeName(grpc::StatusCode code);

/// The status grpc.health.v1.Health/Check gives service ("" the server as a whole):
/// "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNKNOWN". Plain bytes over gRPC's generic
/// call API, without code generated from health.proto: any client may probe so. Throws
/// RpcSetupError with the call's status when the call fails.
std::string CheckHealth(const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
                        double timeout_seconds);

}  // namespace ddpm
