// Counts the floating-point operations that convolutions and matrix products perform: the
// work that model-FLOP utilization (MFU) divides by. Torch-free header.
#pragma once

#include <functional>

namespace ddpm {

/// Runs work on this thread and returns the FLOPs (a multiply-add counts as 2) of the
/// convolutions and matrix products it called: aten::convolution, mm, addmm, bmm, baddbmm.
/// Elementwise ops, norms and softmax are not counted, as MFU conventionally leaves them out.
/// Run work without autocast: autocast dispatches each op twice.
double CountFlops(const std::function<void()>& work);

}  // namespace ddpm
