// SHA-256 (OpenSSL's libcrypto) of bytes as they come, and of a whole file.
#pragma once

#include <cstddef>
#include <string>

namespace ddpm {

/// A running SHA-256.
class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void Update(const void* data, size_t size);
  void Update(const std::string& bytes) { Update(bytes.data(), bytes.size()); }
  /// The digest of everything so far, as 64 lowercase hex digits; ends the hash.
  std::string HexDigest();

 private:
  void* context_;
};

/// The hex SHA-256 of a file's bytes; throws std::runtime_error naming the file if unreadable.
std::string Sha256File(const std::string& path);

}  // namespace ddpm
