#include "proto/rpc.h"

#include <google/protobuf/util/json_util.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "proto/raw_call.h"

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

}  // namespace ddpm
