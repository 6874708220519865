// A gRPC call driven by hand through the generic (untyped) API, and protobuf's wire format
// written and read by hand: for the small standard services (health, reflection) any client
// may probe without code generated from their .proto files.
#pragma once

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace ddpm {

/// A length-delimited field (wire type 2): number's key, the length, the bytes.
std::string BytesField(int number, const std::string& bytes);
/// Calls visit(number, wire_type, varint, bytes) for each varint or length-delimited field of
/// message (fixed-width fields are skipped); false when it does not parse.
bool ForEachField(const std::string& message,
                  const std::function<void(int, int, uint64_t, const std::string&)>& visit);
/// grpc.health.v1.HealthCheckRequest for service ("" the server as a whole).
std::string HealthRequest(const std::string& service);
/// The status a grpc.health.v1.HealthCheckResponse holds: "SERVING", "NOT_SERVING",
/// "SERVICE_UNKNOWN" or "UNKNOWN".
std::string HealthStatusName(const std::string& response);

/// A streaming call of method on channel, each operation waiting for its own completion on
/// the call's completion queue. Not thread-safe: one thread drives it.
class RawStream {
 public:
  RawStream(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
            double timeout_seconds);
  ~RawStream();
  RawStream(const RawStream&) = delete;
  RawStream& operator=(const RawStream&) = delete;

  /// Sends one message; false once the call has failed.
  bool Write(const std::string& bytes);
  /// Half-closes the call; false once the call has failed.
  bool WritesDone();
  /// Reads the next message; false at the stream's end or on failure.
  bool Read(std::string& bytes);
  /// The call's final status.
  grpc::Status Finish();

 private:
  void* Tag() { return this; }
  bool Wait();

  grpc::GenericStub generic_;
  grpc::ClientContext context_;
  grpc::CompletionQueue queue_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call_;
  grpc::Status status_;
  bool ok_ = true;
  bool finished_ = false;
};

}  // namespace ddpm
