#include "eval/inception.h"

#include <torch/script.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <stdexcept>

#include "base/errors.h"
#include "config/config.h"
#include "trainer/tensor_io.h"

namespace ddpm {
namespace {

namespace nn = torch::nn;

// conv (no bias) + batch norm (eps 0.001) + ReLU, named conv and bn as in the weights file.
class BasicConv2dImpl : public nn::Module {
 public:
  BasicConv2dImpl(int in, int out, torch::ExpandingArray<2> kernel,
                  torch::ExpandingArray<2> stride = 1, torch::ExpandingArray<2> padding = 0) {
    conv_ = register_module(
        "conv",
        nn::Conv2d(nn::Conv2dOptions(in, out, kernel).stride(stride).padding(padding).bias(false)));
    bn_ = register_module("bn", nn::BatchNorm2d(nn::BatchNorm2dOptions(out).eps(0.001)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::relu(bn_->forward(conv_->forward(x)));
  }

 private:
  nn::Conv2d conv_{nullptr};
  nn::BatchNorm2d bn_{nullptr};
};
TORCH_MODULE(BasicConv2d);

// 3x3, stride 1, padding 1 average pool that divides by the pixels inside the image only.
torch::Tensor AvgPoolNoPad(const torch::Tensor& x) {
  return torch::avg_pool2d(x, 3, 1, 1, /*ceil_mode=*/false, /*count_include_pad=*/false);
}

// A block: a named set of BasicConv2d branches.
class BlockBase : public nn::Module {
 protected:
  BasicConv2d Add(const std::string& name, int in, int out, torch::ExpandingArray<2> kernel,
                  torch::ExpandingArray<2> stride = 1, torch::ExpandingArray<2> padding = 0) {
    return register_module(name, BasicConv2d(in, out, kernel, stride, padding));
  }
};

// FIDInceptionA: torchvision's InceptionA with the pool excluding padding.
class InceptionAImpl : public BlockBase {
 public:
  InceptionAImpl(int in, int pool_features) {
    b1_ = Add("branch1x1", in, 64, 1);
    b5_1_ = Add("branch5x5_1", in, 48, 1);
    b5_2_ = Add("branch5x5_2", 48, 64, 5, 1, 2);
    d_1_ = Add("branch3x3dbl_1", in, 64, 1);
    d_2_ = Add("branch3x3dbl_2", 64, 96, 3, 1, 1);
    d_3_ = Add("branch3x3dbl_3", 96, 96, 3, 1, 1);
    pool_ = Add("branch_pool", in, pool_features, 1);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::cat({b1_(x), b5_2_(b5_1_(x)), d_3_(d_2_(d_1_(x))), pool_(AvgPoolNoPad(x))}, 1);
  }

 private:
  BasicConv2d b1_{nullptr}, b5_1_{nullptr}, b5_2_{nullptr}, d_1_{nullptr}, d_2_{nullptr},
      d_3_{nullptr}, pool_{nullptr};
};
TORCH_MODULE(InceptionA);

// torchvision's InceptionB (unchanged by FID).
class InceptionBImpl : public BlockBase {
 public:
  explicit InceptionBImpl(int in) {
    b3_ = Add("branch3x3", in, 384, 3, 2);
    d_1_ = Add("branch3x3dbl_1", in, 64, 1);
    d_2_ = Add("branch3x3dbl_2", 64, 96, 3, 1, 1);
    d_3_ = Add("branch3x3dbl_3", 96, 96, 3, 2);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::cat({b3_(x), d_3_(d_2_(d_1_(x))), torch::max_pool2d(x, 3, 2)}, 1);
  }

 private:
  BasicConv2d b3_{nullptr}, d_1_{nullptr}, d_2_{nullptr}, d_3_{nullptr};
};
TORCH_MODULE(InceptionB);

// FIDInceptionC: torchvision's InceptionC with the pool excluding padding.
class InceptionCImpl : public BlockBase {
 public:
  InceptionCImpl(int in, int c7) {
    b1_ = Add("branch1x1", in, 192, 1);
    b7_1_ = Add("branch7x7_1", in, c7, 1);
    b7_2_ = Add("branch7x7_2", c7, c7, {1, 7}, 1, {0, 3});
    b7_3_ = Add("branch7x7_3", c7, 192, {7, 1}, 1, {3, 0});
    d_1_ = Add("branch7x7dbl_1", in, c7, 1);
    d_2_ = Add("branch7x7dbl_2", c7, c7, {7, 1}, 1, {3, 0});
    d_3_ = Add("branch7x7dbl_3", c7, c7, {1, 7}, 1, {0, 3});
    d_4_ = Add("branch7x7dbl_4", c7, c7, {7, 1}, 1, {3, 0});
    d_5_ = Add("branch7x7dbl_5", c7, 192, {1, 7}, 1, {0, 3});
    pool_ = Add("branch_pool", in, 192, 1);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::cat(
        {b1_(x), b7_3_(b7_2_(b7_1_(x))), d_5_(d_4_(d_3_(d_2_(d_1_(x))))), pool_(AvgPoolNoPad(x))},
        1);
  }

 private:
  BasicConv2d b1_{nullptr}, b7_1_{nullptr}, b7_2_{nullptr}, b7_3_{nullptr}, d_1_{nullptr},
      d_2_{nullptr}, d_3_{nullptr}, d_4_{nullptr}, d_5_{nullptr}, pool_{nullptr};
};
TORCH_MODULE(InceptionC);

// torchvision's InceptionD (unchanged by FID).
class InceptionDImpl : public BlockBase {
 public:
  explicit InceptionDImpl(int in) {
    b3_1_ = Add("branch3x3_1", in, 192, 1);
    b3_2_ = Add("branch3x3_2", 192, 320, 3, 2);
    b7_1_ = Add("branch7x7x3_1", in, 192, 1);
    b7_2_ = Add("branch7x7x3_2", 192, 192, {1, 7}, 1, {0, 3});
    b7_3_ = Add("branch7x7x3_3", 192, 192, {7, 1}, 1, {3, 0});
    b7_4_ = Add("branch7x7x3_4", 192, 192, 3, 2);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::cat({b3_2_(b3_1_(x)), b7_4_(b7_3_(b7_2_(b7_1_(x)))), torch::max_pool2d(x, 3, 2)},
                      1);
  }

 private:
  BasicConv2d b3_1_{nullptr}, b3_2_{nullptr}, b7_1_{nullptr}, b7_2_{nullptr}, b7_3_{nullptr},
      b7_4_{nullptr};
};
TORCH_MODULE(InceptionD);

// FIDInceptionE_1 (average pool excluding padding) and FIDInceptionE_2 (max pool).
class InceptionEImpl : public BlockBase {
 public:
  InceptionEImpl(int in, bool max_pool) : max_pool_(max_pool) {
    b1_ = Add("branch1x1", in, 320, 1);
    b3_1_ = Add("branch3x3_1", in, 384, 1);
    b3_2a_ = Add("branch3x3_2a", 384, 384, {1, 3}, 1, {0, 1});
    b3_2b_ = Add("branch3x3_2b", 384, 384, {3, 1}, 1, {1, 0});
    d_1_ = Add("branch3x3dbl_1", in, 448, 1);
    d_2_ = Add("branch3x3dbl_2", 448, 384, 3, 1, 1);
    d_3a_ = Add("branch3x3dbl_3a", 384, 384, {1, 3}, 1, {0, 1});
    d_3b_ = Add("branch3x3dbl_3b", 384, 384, {3, 1}, 1, {1, 0});
    pool_ = Add("branch_pool", in, 192, 1);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const torch::Tensor b3 = b3_1_(x);
    const torch::Tensor d = d_2_(d_1_(x));
    const torch::Tensor pooled = max_pool_ ? torch::max_pool2d(x, 3, 1, 1) : AvgPoolNoPad(x);
    return torch::cat({b1_(x), b3_2a_(b3), b3_2b_(b3), d_3a_(d), d_3b_(d), pool_(pooled)}, 1);
  }

 private:
  bool max_pool_;
  BasicConv2d b1_{nullptr}, b3_1_{nullptr}, b3_2a_{nullptr}, b3_2b_{nullptr}, d_1_{nullptr},
      d_2_{nullptr}, d_3a_{nullptr}, d_3b_{nullptr}, pool_{nullptr};
};
TORCH_MODULE(InceptionE);

// The named parameters and buffers of a TorchScript module, as a state dict.
std::map<std::string, torch::Tensor> ScriptStateDict(const torch::jit::Module& module) {
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& item : module.named_parameters(/*recurse=*/true))
    tensors[item.name] = item.value;
  for (const auto& item : module.named_buffers(/*recurse=*/true)) tensors[item.name] = item.value;
  return tensors;
}

}  // namespace

FidInceptionImpl::FidInceptionImpl() {
  // Registered under the file's own names (Conv2d_1a_3x3.conv.weight, Mixed_5b.branch1x1...):
  // each module directly on this one, so that the names carry no Sequential index.
  register_module("Conv2d_1a_3x3", BasicConv2d(3, 32, 3, 2));
  register_module("Conv2d_2a_3x3", BasicConv2d(32, 32, 3));
  register_module("Conv2d_2b_3x3", BasicConv2d(32, 64, 3, 1, 1));
  register_module("Conv2d_3b_1x1", BasicConv2d(64, 80, 1));
  register_module("Conv2d_4a_3x3", BasicConv2d(80, 192, 3));
  register_module("Mixed_5b", InceptionA(192, 32));
  register_module("Mixed_5c", InceptionA(256, 64));
  register_module("Mixed_5d", InceptionA(288, 64));
  register_module("Mixed_6a", InceptionB(288));
  register_module("Mixed_6b", InceptionC(768, 128));
  register_module("Mixed_6c", InceptionC(768, 160));
  register_module("Mixed_6d", InceptionC(768, 160));
  register_module("Mixed_6e", InceptionC(768, 192));
  register_module("Mixed_7a", InceptionD(768));
  register_module("Mixed_7b", InceptionE(1280, /*max_pool=*/false));
  register_module("Mixed_7c", InceptionE(2048, /*max_pool=*/true));
  fc_ = register_module("fc", nn::Linear(2048, 1008));
}

InceptionOutput FidInceptionImpl::forward(const torch::Tensor& images) {
  auto child = [this](const char* name) { return named_children()[name]; };
  auto conv = [&](const char* name, const torch::Tensor& x) {
    return child(name)->as<BasicConv2dImpl>()->forward(x);
  };
  torch::Tensor x =
      torch::nn::functional::interpolate(images, torch::nn::functional::InterpolateFuncOptions()
                                                     .size(std::vector<int64_t>{299, 299})
                                                     .mode(torch::kBilinear)
                                                     .align_corners(false));
  x = conv("Conv2d_2b_3x3", conv("Conv2d_2a_3x3", conv("Conv2d_1a_3x3", x)));
  x = torch::max_pool2d(x, 3, 2);
  x = torch::max_pool2d(conv("Conv2d_4a_3x3", conv("Conv2d_3b_1x1", x)), 3, 2);
  for (const char* name : {"Mixed_5b", "Mixed_5c", "Mixed_5d"})
    x = child(name)->as<InceptionAImpl>()->forward(x);
  x = child("Mixed_6a")->as<InceptionBImpl>()->forward(x);
  for (const char* name : {"Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"}) {
    x = child(name)->as<InceptionCImpl>()->forward(x);
  }
  x = child("Mixed_7a")->as<InceptionDImpl>()->forward(x);
  x = child("Mixed_7b")->as<InceptionEImpl>()->forward(x);
  x = child("Mixed_7c")->as<InceptionEImpl>()->forward(x);
  InceptionOutput out;
  out.pool3 = torch::adaptive_avg_pool2d(x, {1, 1}).flatten(1);
  out.logits = fc_->forward(out.pool3);
  out.logits_unbiased = torch::matmul(out.pool3, fc_->weight.t());
  return out;
}

const char* const kInceptionWeightsHelp =
    "download pt_inception-2015-12-05-6726825d.pth from "
    "https://github.com/mseitzer/pytorch-fid/releases/tag/fid_weights, re-save it once in "
    "PyTorch's current format (python3 -c \"import torch; torch.save(torch.load('IN'), "
    "'OUT')\"), and give OUT as eval.inception_weights (ddpm_fid: --inception)";

FidInception LoadFidInception(const std::string& path, torch::Device device) {
  if (path.empty())
    throw ConfigError(std::string("no Inception weights given: ") + kInceptionWeightsHelp);
  if (!std::filesystem::is_regular_file(path)) {
    throw FileError(path + ": no such Inception weights file; " + kInceptionWeightsHelp);
  }
  std::ifstream file(path, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)),
                                std::istreambuf_iterator<char>());
  std::map<std::string, torch::Tensor> tensors;
  const bool zip = bytes.size() >= 4 && bytes[0] == 'P' && bytes[1] == 'K';
  if (!zip) {
    throw FormatError(path +
                      ": not a zip archive; it is in PyTorch's legacy (pre-1.6) "
                      "format, which ddpm-train does not read. " +
                      kInceptionWeightsHelp);
  }
  try {
    tensors = UnpickleTensors(bytes, path);
  } catch (const std::exception& as_state_dict) {
    try {
      tensors = ScriptStateDict(torch::jit::load(path, torch::kCPU));
    } catch (const c10::Error& as_script) {
      throw FormatError(path + ": neither a state dict (" + as_state_dict.what() +
                        ") nor a TorchScript module (" + as_script.what_without_backtrace() + ")");
    }
  }
  // pytorch-fid's file has no num_batches_tracked buffers (a re-saved torchvision model may):
  // the network's own, which eval mode never reads, stand in for them.
  auto batch_counter = [](const std::string& name) {
    const std::string suffix = "num_batches_tracked";
    return name.size() >= suffix.size() &&
           name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  FidInception model;
  std::map<std::string, torch::Tensor> own;
  for (const auto& [name, tensor] : tensors) {
    if (!batch_counter(name)) own[name] = tensor.to(torch::kFloat32);
  }
  for (const auto& item : model->named_buffers()) {
    if (batch_counter(item.key())) own[item.key()] = item.value().clone();
  }
  LoadStateDict(*model, own, path);
  model->eval();
  model->to(device);
  return model;
}

}  // namespace ddpm
