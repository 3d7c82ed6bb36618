#pragma once
#include <ATen/ATen.h>

namespace convmixer_kernels {

inline void check_axpb_input(const at::Tensor& x, c10::DeviceType device) {
  TORCH_CHECK(x.device().type() == device, "_axpb: x must be a ", c10::DeviceTypeName(device),
              " tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "_axpb: x must be float32, got ", x.scalar_type());
}

}  // namespace convmixer_kernels
