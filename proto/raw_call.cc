#include "proto/raw_call.h"

#include <chrono>
#include <vector>

namespace ddpm {
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

}  // namespace

std::string BytesField(int number, const std::string& bytes) {
  return Varint(static_cast<uint64_t>(number) << 3 | 2) + Varint(bytes.size()) + bytes;
}

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

std::string HealthRequest(const std::string& service) {
  return service.empty() ? std::string() : BytesField(1, service);
}

std::string HealthStatusName(const std::string& response) {
  uint64_t status = 0;
  ForEachField(response, [&](int number, int type, uint64_t value, const std::string&) {
    if (number == 1 && type == 0) status = value;
  });
  static const char* const kNames[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
  return status < 4 ? kNames[status] : "UNKNOWN";
}

RawStream::RawStream(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                     double timeout_seconds)
    : generic_(channel) {
  if (timeout_seconds > 0) {
    context_.set_deadline(std::chrono::system_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000)));
  }
  call_ = generic_.PrepareCall(&context_, method, &queue_);
  call_->StartCall(Tag());
  ok_ = Wait();
}

RawStream::~RawStream() {
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

bool RawStream::Write(const std::string& bytes) {
  if (!ok_) return false;
  call_->Write(ToBuffer(bytes), Tag());
  return ok_ = Wait();
}

bool RawStream::WritesDone() {
  if (!ok_) return false;
  call_->WritesDone(Tag());
  return ok_ = Wait();
}

bool RawStream::Read(std::string& bytes) {
  grpc::ByteBuffer buffer;
  call_->Read(&buffer, Tag());
  if (!Wait()) return false;
  bytes = FromBuffer(buffer);
  return true;
}

grpc::Status RawStream::Finish() {
  call_->Finish(&status_, Tag());
  Wait();
  finished_ = true;
  return status_;
}

bool RawStream::Wait() {
  void* tag = nullptr;
  bool ok = false;
  return queue_.Next(&tag, &ok) && ok;
}

}  // namespace ddpm
