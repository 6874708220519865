// The CPU's one-pass optimizer update over flat float buffers: gradient scaling (the clip),
// Adam and the EMA. Torch-free, so that it compiles with the flags that let it vectorize.
#pragma once

#include <cstdint>

namespace ddpm {

/// The constants of one fused update, all as the op-by-op path rounds them to float.
struct FusedAdamConstants {
  float grad_scale;    ///< clip coefficient (1: no clipping)
  float beta1, beta2;  ///< Adam's betas
  float one_minus_beta1, one_minus_beta2;
  float step_size;  ///< -lr / bias_correction1
  float sqrt_bias_correction2;
  float eps;
  float decay, one_minus_decay;  ///< the EMA's; ignored without an average
};

/// Updates elements [begin, end): m and v take the scaled gradient, param Adam's step, and
/// average (when not null) moves towards the new param. Elements apart from each other: safe
/// to call from several threads on disjoint ranges.
void FusedAdamUpdate(int64_t begin, int64_t end, float* param, const float* grad, float* m,
                     float* v, float* average, const FusedAdamConstants& c);

}  // namespace ddpm
