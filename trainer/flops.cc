#include "trainer/flops.h"

#include <ATen/record_function.h>
#include <torch/torch.h>

#include <cstring>
#include <vector>

namespace ddpm {
namespace {

thread_local double counted_flops = 0;

std::vector<int64_t> Sizes(const c10::IValue& value) {
  return value.isTensor() ? value.toTensor().sizes().vec() : std::vector<int64_t>{};
}

double Product(const std::vector<int64_t>& sizes, std::size_t from) {
  double product = 1;
  for (std::size_t i = from; i < sizes.size(); ++i) product *= static_cast<double>(sizes[i]);
  return product;
}

// aten::convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding,
// groups): 2 * N * C_out * prod(output spatial) * (C_in / groups) * prod(kernel).
double ConvolutionFlops(c10::ArrayRef<const c10::IValue> inputs) {
  if (inputs.size() < 9) return 0;
  const std::vector<int64_t> input = Sizes(inputs[0]), weight = Sizes(inputs[1]);
  if (input.size() < 3 || weight.size() != input.size()) return 0;
  const auto stride = inputs[3].toIntVector(), padding = inputs[4].toIntVector(),
             dilation = inputs[5].toIntVector();
  const bool transposed = inputs[6].toBool();
  const auto output_padding = inputs[7].toIntVector();
  double output_spatial = 1;
  for (std::size_t d = 0; d + 2 < input.size(); ++d) {
    const int64_t in = input[d + 2], k = weight[d + 2];
    const int64_t s = stride[stride.size() == 1 ? 0 : d], p = padding[padding.size() == 1 ? 0 : d],
                  dl = dilation[dilation.size() == 1 ? 0 : d];
    const int64_t out = transposed ? (in - 1) * s - 2 * p + dl * (k - 1) + output_padding[d] + 1
                                   : (in + 2 * p - dl * (k - 1) - 1) / s + 1;
    output_spatial *= static_cast<double>(out);
  }
  // weight is [C_out, C_in / groups, k...] (transposed: [C_in, C_out / groups, k...]); either
  // way each output element takes C_in / groups * prod(k) multiply-adds, and there are
  // N * C_out * output_spatial of them.
  const double groups = static_cast<double>(inputs[8].toInt());
  const double out_channels = transposed ? weight[1] * groups : weight[0];
  const double in_per_group = transposed ? weight[0] / groups : weight[1];
  return 2.0 * input[0] * out_channels * output_spatial * in_per_group * Product(weight, 2);
}

std::unique_ptr<at::ObserverContext> CountOp(const at::RecordFunction& fn) {
  const char* name = fn.name();
  const auto inputs = fn.inputs();
  if (std::strcmp(name, "aten::convolution") == 0) {
    counted_flops += ConvolutionFlops(inputs);
  } else if (std::strcmp(name, "aten::mm") == 0 && inputs.size() >= 2) {
    const auto a = Sizes(inputs[0]), b = Sizes(inputs[1]);
    if (a.size() == 2 && b.size() == 2) counted_flops += 2.0 * a[0] * a[1] * b[1];
  } else if (std::strcmp(name, "aten::addmm") == 0 && inputs.size() >= 3) {
    const auto a = Sizes(inputs[1]), b = Sizes(inputs[2]);
    if (a.size() == 2 && b.size() == 2) counted_flops += 2.0 * a[0] * a[1] * b[1];
  } else if ((std::strcmp(name, "aten::bmm") == 0 && inputs.size() >= 2) ||
             (std::strcmp(name, "aten::baddbmm") == 0 && inputs.size() >= 3)) {
    const std::size_t first = std::strcmp(name, "aten::bmm") == 0 ? 0 : 1;
    const auto a = Sizes(inputs[first]), b = Sizes(inputs[first + 1]);
    if (a.size() == 3 && b.size() == 3) counted_flops += 2.0 * a[0] * a[1] * a[2] * b[2];
  }
  return nullptr;
}

}  // namespace

double CountFlops(const std::function<void()>& work) {
  counted_flops = 0;
  const at::CallbackHandle handle = at::addThreadLocalCallback(
      at::RecordFunctionCallback(&CountOp).needsInputs(true).scopes({at::RecordScope::FUNCTION}));
  try {
    work();
  } catch (...) {
    at::removeCallback(handle);
    throw;
  }
  at::removeCallback(handle);
  return counted_flops;
}

}  // namespace ddpm
