// The YAML config loader on arbitrary text: it either refuses with ConfigError (naming the key
// or line) or gives a config whose YAML form loads back to the same config.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "config/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  ddpm::Config config;
  try {
    config = ddpm::LoadConfigString(text, "fuzz.yaml");
  } catch (const ddpm::ConfigError&) {
    return 0;
  }
  // What loads must round-trip through ToYaml, and validation only refuses by name.
  const std::string yaml = config.ToYaml();
  if (ddpm::LoadConfigString(yaml, "round trip").ToYaml() != yaml) std::abort();
  try {
    config.Validate(1);
  } catch (const ddpm::ConfigError&) {
  }
  return 0;
}
