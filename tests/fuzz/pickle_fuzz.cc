// torch.save files (ema_weights.pt, ddpm_export's file, the Inception weights) from arbitrary
// bytes, read by our own unpickler: a zip archive ("PK" first) goes through the whole reader;
// anything else is taken as its data.pkl alone, with every storage record it names supplied
// at the size it asks for, so that the fuzzer spends its time in the pickle interpreter rather
// than on zip checksums. Either the tensors load or std::runtime_error names the input.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "trainer/tensor_io.h"
#include "trainer/unpickler.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  try {
    std::map<std::string, torch::Tensor> tensors;
    if (input.substr(0, 2) == "PK") {
      tensors = ddpm::UnpickleTensors(std::vector<char>(input.begin(), input.end()), "fuzz.pt");
    } else {
      tensors = ddpm::UnpickleTensorDict(
          input,
          [](const std::string&, uint64_t nbytes) -> std::optional<std::vector<char>> {
            if (nbytes > (uint64_t{1} << 16)) return std::nullopt;
            std::vector<char> record(nbytes);
            for (std::size_t i = 0; i < record.size(); ++i) record[i] = static_cast<char>(i & 1);
            return record;
          },
          "fuzz.pkl");
    }
    for (const auto& [name, tensor] : tensors) {
      if (!tensor.defined()) std::abort();
      tensor.sum();
    }
  } catch (const std::runtime_error&) {
    // A refusal that names the input: what every malformed file must get.
  }
  return 0;
}
