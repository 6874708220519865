// Named tensors in files and in memory: the pickled dict of tensors that Python's torch.load
// and torch.save read and write, a module's state dict, text carried as a tensor, and the
// lookups that name what is missing.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace ddpm {

/// A checkpoint that cannot be read or written: the message names the file and what is wrong.
class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Weights that do not fit the model they are loaded into: a missing or unexpected tensor, a
/// shape, a class count. The message names the file and the tensor.
class WeightsError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A dict of named tensors as pickle bytes that Python's torch.load reads.
std::vector<char> PickleTensors(const std::map<std::string, torch::Tensor>& tensors);
/// The dict of named tensors in pickle bytes (from PickleTensors or Python's torch.save), read
/// by our own interpreter (unpickler.h); throws std::runtime_error naming origin if the bytes
/// are not one.
std::map<std::string, torch::Tensor> UnpickleTensors(const std::vector<char>& bytes,
                                                     const std::string& origin);

/// tensors[name], or CheckpointError naming origin and the missing name.
const torch::Tensor& RequireTensor(const std::map<std::string, torch::Tensor>& tensors,
                                   const std::string& name, const std::string& origin);
/// A 0-d int64 tensor, for counters and cursors in a checkpoint.
torch::Tensor Int64Tensor(int64_t value);

/// Text as a 1-D uint8 tensor (a config inside a checkpoint), and back.
torch::Tensor TextTensor(const std::string& text);
std::string TensorText(const torch::Tensor& tensor);

/// The named parameters and buffers of module, detached on the CPU.
std::map<std::string, torch::Tensor> StateDict(const torch::nn::Module& module);
/// Writes named tensors as a pickled dict that Python reads with torch.load.
void SaveTensors(const std::map<std::string, torch::Tensor>& tensors, const std::string& path);
/// Reads a dict of tensors written by SaveTensors or by Python's torch.save.
std::map<std::string, torch::Tensor> LoadTensors(const std::string& path);
/// Copies tensors into module's parameters and buffers; names and shapes must match exactly.
void LoadStateDict(torch::nn::Module& module, const std::map<std::string, torch::Tensor>& tensors,
                   const std::string& origin);

}  // namespace ddpm
