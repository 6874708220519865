#include "trainer/fused_adam.h"

#include <algorithm>
#include <cmath>

namespace ddpm {
namespace {

// Restrict-qualified and branch-free, so that the compiler vectorizes it (this file builds with
// -fno-math-errno, which sqrt needs for that); compiled for AVX2 and for any x86-64, chosen at
// load time.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx2", "default")))
#endif
void UpdateBlock(int64_t begin, int64_t end, float* __restrict param,
                 const float* __restrict grad, float* __restrict m, float* __restrict v,
                 float* __restrict average, FusedAdamConstants c) {
  // The same float operations, in the same order, as the op-by-op path (clip's mul_, Adam's
  // mul_/add_/addcmul_/sqrt/div_/add_/addcdiv_, the EMA's mul_/add_).
  for (int64_t i = begin; i < end; ++i) {
    const float g = grad[i] * c.grad_scale;
    const float m_i = m[i] * c.beta1 + c.one_minus_beta1 * g;
    const float v_i = v[i] * c.beta2 + c.one_minus_beta2 * g * g;
    m[i] = m_i;
    v[i] = v_i;
    const float denom = std::sqrt(v_i) / c.sqrt_bias_correction2 + c.eps;
    param[i] = param[i] + c.step_size * m_i / denom;
  }
  if (average == nullptr) return;
  for (int64_t i = begin; i < end; ++i) {
    average[i] = average[i] * c.decay + c.one_minus_decay * param[i];
  }
}

}  // namespace

void FusedAdamUpdate(int64_t begin, int64_t end, float* param, const float* grad, float* m,
                     float* v, float* average, const FusedAdamConstants& c) {
  // Blocks that stay in L1, so that the EMA's loop re-reads the new weights from cache.
  constexpr int64_t kBlock = 1024;
  for (int64_t first = begin; first < end; first += kBlock) {
    UpdateBlock(first, std::min(end, first + kBlock), param, grad, m, v, average, c);
  }
}

}  // namespace ddpm
