// The LibTorch headers every torch translation unit shares; precompiled once per build.
#pragma once
#include <torch/torch.h>
