// The Inception-v3 of FID: the network of TensorFlow's 2015-12-05 graph as pytorch-fid ports
// it (FIDInceptionA/C/E_1/E_2), whose pool3 features and logits FID and IS are defined on.
#pragma once

#include <torch/torch.h>

#include <string>

namespace ddpm {

/// What the network gives for a batch.
struct InceptionOutput {
  /// [N, 2048]: the pool3 features (global average pool of Mixed_7c).
  torch::Tensor pool3;
  /// [N, 1008]: the classifier's logits (fc of pool3).
  torch::Tensor logits;
  /// [N, 1008]: pool3 times the fc weights without the bias, the logits of the original TF
  /// Inception Score (openai/improved-gan; torch-fidelity's logits_unbiased).
  torch::Tensor logits_unbiased;
};

/// torchvision's Inception3 with FID's four changes: the average pools of the A, C and E
/// blocks exclude padding, the last E block pools with max, and the fc has 1008 classes.
/// Parameter and buffer names are those of pt_inception-2015-12-05-6726825d.pth.
class FidInceptionImpl : public torch::nn::Module {
 public:
  FidInceptionImpl();
  /// images: [N, 3, H, W] in [-1, 1], any size; resized bilinearly to 299 x 299 first.
  InceptionOutput forward(const torch::Tensor& images);

 private:
  torch::nn::Linear fc_{nullptr};
};
TORCH_MODULE(FidInception);

/// Where to get the weights, for error messages.
extern const char* const kInceptionWeightsHelp;

/// Loads the weights at path into a new network in eval mode on device: a state dict saved by
/// torch.save (PyTorch >= 1.6's zip format) with the standard file's names, or a TorchScript
/// module of the same network. Throws std::runtime_error naming the file and what is wrong
/// (missing: where to get it; the legacy pre-1.6 format: how to convert it).
FidInception LoadFidInception(const std::string& path, torch::Device device);

}  // namespace ddpm
