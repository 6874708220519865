// Anchor translation unit for the shared LibTorch precompiled header (cmake/torch_pch.h).
#include "cmake/torch_pch.h"
