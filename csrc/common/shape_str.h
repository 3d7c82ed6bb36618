#pragma once
#include <string>

#include <c10/util/ArrayRef.h>

namespace convmixer_kernels {

// "[a, b, c]": shapes for error messages, formatted here. Streaming an IntArrayRef into a
// TORCH_CHECK message crashed the process (segfault) on the H100 machine, from the
// nvcc-compiled dw_block.cu and from the g++-compiled gemm_blocks.cpp alike, while the same
// code ran on the CPU build machine; every message in csrc/ formats its shapes with this.
inline std::string shape_str(c10::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t d = 0; d < sizes.size(); ++d) s += (d ? ", " : "") + std::to_string(sizes[d]);
  return s + "]";
}

}  // namespace convmixer_kernels
