#include "trainer/tensor_io.h"

#include <cstdio>
#include <fstream>
#include <iterator>

#include "base/errors.h"
#include "base/file_io.h"

namespace ddpm {

std::vector<char> PickleTensors(const std::map<std::string, torch::Tensor>& tensors) {
  c10::Dict<std::string, torch::Tensor> dict;
  for (const auto& [name, tensor] : tensors) dict.insert(name, tensor);
  return torch::pickle_save(dict);
}

const torch::Tensor& RequireTensor(const std::map<std::string, torch::Tensor>& tensors,
                                   const std::string& name, const std::string& origin) {
  const auto it = tensors.find(name);
  if (it == tensors.end()) throw CheckpointError(origin + ": missing '" + name + "'");
  return it->second;
}

torch::Tensor Int64Tensor(int64_t value) { return torch::tensor(value, torch::kLong); }

torch::Tensor TextTensor(const std::string& text) {
  return torch::from_blob(const_cast<char*>(text.data()), {static_cast<int64_t>(text.size())},
                          torch::kUInt8)
      .clone();
}

std::string TensorText(const torch::Tensor& tensor) {
  const torch::Tensor bytes = tensor.to(torch::kCPU).contiguous();
  return {reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()),
          static_cast<std::size_t>(bytes.numel())};
}

std::map<std::string, torch::Tensor> StateDict(const torch::nn::Module& module) {
  std::map<std::string, torch::Tensor> out;
  // Copies, always: a parameter may be a view of a flat buffer, and pickling a view would
  // write the whole buffer.
  for (const auto& item : module.named_parameters()) {
    out[item.key()] = item.value().detach().to(torch::kCPU).clone();
  }
  for (const auto& item : module.named_buffers()) {
    out[item.key()] = item.value().detach().to(torch::kCPU).clone();
  }
  return out;
}

void SaveTensors(const std::map<std::string, torch::Tensor>& tensors, const std::string& path) {
  const std::vector<char> bytes = PickleTensors(tensors);
  WriteFileAtomically(path, std::string_view(bytes.data(), bytes.size()), Durability::kRenamed);
}

std::map<std::string, torch::Tensor> LoadTensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FileError(path + ": cannot open tensor file");
  return UnpickleTensors(
      std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>()),
      path);
}

void LoadStateDict(torch::nn::Module& module, const std::map<std::string, torch::Tensor>& tensors,
                   const std::string& origin) {
  torch::NoGradGuard no_grad;
  std::size_t expected = 0;
  auto copy = [&](const std::string& name, torch::Tensor& target) {
    const auto it = tensors.find(name);
    if (it == tensors.end()) throw WeightsError(origin + ": missing tensor '" + name + "'");
    if (it->second.sizes() != target.sizes()) {
      throw WeightsError(origin + ": tensor '" + name + "' has shape " +
                         c10::str(it->second.sizes()) + ", the model expects " +
                         c10::str(target.sizes()));
    }
    target.copy_(it->second);
    ++expected;
  };
  for (auto& item : module.named_parameters()) copy(item.key(), item.value());
  for (auto& item : module.named_buffers()) copy(item.key(), item.value());
  if (expected != tensors.size()) {
    for (const auto& [name, tensor] : tensors) {
      if (!module.named_parameters().contains(name) && !module.named_buffers().contains(name)) {
        throw WeightsError(origin + ": unexpected tensor '" + name + "'");
      }
    }
  }
}

}  // namespace ddpm
