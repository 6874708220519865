// The pickled dict of tensors (ema_weights.pt, ddpm_export's file, Python's torch.save) from
// arbitrary bytes: it unpickles to tensors or is refused with std::runtime_error naming it.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "trainer/tensor_io.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  const std::vector<char> bytes(data, data + size);
  try {
    const std::map<std::string, torch::Tensor> tensors = ddpm::UnpickleTensors(bytes, "fuzz.pt");
    for (const auto& [name, tensor] : tensors) {
      if (!tensor.defined()) std::abort();
      tensor.sum();
    }
  } catch (const std::exception&) {
    // c10::Error (LibTorch's unpickler) and std::runtime_error (ours) both derive from it.
  }
  return 0;
}
