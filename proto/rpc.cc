#include "proto/rpc.h"

#include <google/protobuf/util/json_util.h>
#include <grpcpp/generic/generic_stub.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace ddpm {

bool SameToken(const std::string& given, const std::string& expected) {
  if (expected.empty()) return false;
  unsigned char difference = given.size() == expected.size() ? 0 : 1;
  for (size_t i = 0; i < given.size(); ++i) {
    difference |= static_cast<unsigned char>(given[i] ^ expected[i % expected.size()]);
  }
  return difference == 0;
}

std::string ToJson(const google::protobuf::Message& message) {
  std::string json;
  google::protobuf::util::JsonPrintOptions print;
  print.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(message, &json, print);
  return json;
}

std::string ReadTextFile(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw RpcSetupError(what + " " + path + ": cannot be read");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw RpcSetupError(what + " " + path + ": read failed");
  return text.str();
}

namespace {

std::string Trim(const std::string& text) {
  const auto first = text.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) return "";
  return text.substr(first, text.find_last_not_of(" \t\r\n") - first + 1);
}

}  // namespace

std::string ReadToken(const std::string& file, const char* env) {
  if (!file.empty()) {
    std::string token = Trim(ReadTextFile(file, "token file"));
    if (token.empty()) throw RpcSetupError("token file " + file + " is empty");
    if (token.find_first_of(" \t\r\n") != std::string::npos) {
      throw RpcSetupError("token file " + file + " holds more than one word");
    }
    return token;
  }
  if (const char* value = std::getenv(env); value != nullptr && *value != '\0') {
    return Trim(value);
  }
  throw RpcSetupError(std::string("no token: pass a token file, or set ") + env);
}

std::shared_ptr<grpc::Channel> MakeChannel(const ChannelOptions& options) {
  if (options.address.find(':') == std::string::npos) {
    throw RpcSetupError("coordinator address '" + options.address + "' is not HOST:PORT");
  }
  if (options.tls_cert.empty() != options.tls_key.empty()) {
    throw RpcSetupError("a TLS client certificate needs both --tls-cert and --tls-key");
  }
  if (!options.tls_cert.empty() && options.tls_ca.empty()) {
    throw RpcSetupError("a TLS client certificate (--tls-cert) needs TLS: give --tls-ca too");
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (options.tls_ca.empty()) {
    credentials = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = ReadTextFile(options.tls_ca, "TLS CA certificate");
    if (!options.tls_cert.empty()) {
      ssl.pem_cert_chain = ReadTextFile(options.tls_cert, "TLS client certificate");
      ssl.pem_private_key = ReadTextFile(options.tls_key, "TLS client key");
    }
    credentials = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(options.max_message_bytes);
  arguments.SetMaxSendMessageSize(options.max_message_bytes);
  // Reconnect quickly after a coordinator restart.
  arguments.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  arguments.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  return grpc::CreateCustomChannel(options.address, credentials, arguments);
}

std::unique_ptr<grpc::ClientContext> MakeContext(const std::string& token,
                                                 std::chrono::milliseconds timeout) {
  auto context = std::make_unique<grpc::ClientContext>();
  context->AddMetadata("authorization", "Bearer " + token);
  if (timeout.count() > 0) context->set_deadline(std::chrono::system_clock::now() + timeout);
  return context;
}

const char* StatusCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "UNKNOWN";
  }
}

std::string DescribeStatus(const std::string& rpc, const grpc::Status& status) {
  std::string message = status.error_message();
  for (char& c : message) {
    if (c == '\n') c = ' ';
  }
  return rpc + ": " + StatusCodeName(status.error_code()) + ": " + message;
}

namespace {

// Protobuf's wire format by hand, for the two small standard services a probe speaks.
std::string Varint(uint64_t value) {
  std::string out;
  while (value >= 0x80) {
    out.push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<char>(value));
  return out;
}

// A length-delimited field (wire type 2).
std::string BytesField(int number, const std::string& bytes) {
  return Varint(static_cast<uint64_t>(number) << 3 | 2) + Varint(bytes.size()) + bytes;
}

// Calls visit(number, wire_type, varint, bytes) for each field of message; false when it does
// not parse.
bool ForEachField(const std::string& message,
                  const std::function<void(int, int, uint64_t, const std::string&)>& visit) {
  std::size_t at = 0;
  auto read_varint = [&](uint64_t& value) {
    value = 0;
    for (int shift = 0; shift < 64 && at < message.size(); shift += 7) {
      const auto byte = static_cast<uint8_t>(message[at++]);
      value |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if ((byte & 0x80) == 0) return true;
    }
    return false;
  };
  while (at < message.size()) {
    uint64_t key = 0, value = 0;
    if (!read_varint(key)) return false;
    const int number = static_cast<int>(key >> 3), type = static_cast<int>(key & 7);
    if (type == 0) {
      if (!read_varint(value)) return false;
      visit(number, type, value, "");
    } else if (type == 2) {
      if (!read_varint(value) || value > message.size() - at) return false;
      visit(number, type, 0, message.substr(at, value));
      at += value;
    } else if (type == 1 || type == 5) {
      at += type == 1 ? 8 : 4;
    } else {
      return false;
    }
  }
  return at == message.size();
}

grpc::ByteBuffer ToBuffer(const std::string& bytes) {
  grpc::Slice slice(bytes);
  return {&slice, 1};
}

std::string FromBuffer(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  for (const grpc::Slice& slice : slices) {
    out.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return out;
}

std::string HealthStatusName(const std::string& response) {
  uint64_t status = 0;
  ForEachField(response, [&](int number, int type, uint64_t value, const std::string&) {
    if (number == 1 && type == 0) status = value;
  });
  static const char* const kNames[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
  return status < 4 ? kNames[status] : "UNKNOWN";
}

// A streaming call through gRPC's generic (untyped) API, driven step by step on its own
// completion queue: each operation waits for its completion.
class RawStream {
 public:
  RawStream(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
            double timeout_seconds)
      : generic_(channel) {
    if (timeout_seconds > 0) {
      context_.set_deadline(
          std::chrono::system_clock::now() +
          std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000)));
    }
    call_ = generic_.PrepareCall(&context_, method, &queue_);
    call_->StartCall(Tag());
    ok_ = Wait();
  }
  ~RawStream() {
    context_.TryCancel();
    if (!finished_) {
      call_->Finish(&status_, Tag());
      Wait();
    }
    queue_.Shutdown();
    void* tag = nullptr;
    bool ok = false;
    while (queue_.Next(&tag, &ok)) {
    }
  }
  bool Write(const std::string& bytes) {
    if (!ok_) return false;
    call_->Write(ToBuffer(bytes), Tag());
    return ok_ = Wait();
  }
  bool WritesDone() {
    if (!ok_) return false;
    call_->WritesDone(Tag());
    return ok_ = Wait();
  }
  bool Read(std::string& bytes) {
    grpc::ByteBuffer buffer;
    call_->Read(&buffer, Tag());
    if (!Wait()) return false;
    bytes = FromBuffer(buffer);
    return true;
  }
  grpc::Status Finish() {
    call_->Finish(&status_, Tag());
    Wait();
    finished_ = true;
    return status_;
  }

 private:
  void* Tag() { return this; }
  bool Wait() {
    void* tag = nullptr;
    bool ok = false;
    return queue_.Next(&tag, &ok) && ok;
  }

  grpc::GenericStub generic_;
  grpc::ClientContext context_;
  grpc::CompletionQueue queue_;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call_;
  grpc::Status status_;
  bool ok_ = true;
  bool finished_ = false;
};

std::string HealthRequest(const std::string& service) {
  return service.empty() ? std::string() : BytesField(1, service);
}

}  // namespace

std::string CheckHealth(const std::shared_ptr<grpc::Channel>& channel, const std::string& service,
                        double timeout_seconds) {
  RawStream call(channel, "/grpc.health.v1.Health/Check", timeout_seconds);
  std::string response;
  const bool sent = call.Write(HealthRequest(service)) && call.WritesDone();
  const bool read = sent && call.Read(response);
  const grpc::Status status = call.Finish();
  // The health service answers NOT_FOUND for a service it does not know.
  if (status.error_code() == grpc::StatusCode::NOT_FOUND) return "SERVICE_UNKNOWN";
  if (!status.ok()) throw RpcSetupError(DescribeStatus("grpc.health.v1.Health/Check", status));
  if (!read) throw RpcSetupError("grpc.health.v1.Health/Check: no response");
  return HealthStatusName(response);
}

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
