// Element types of tensors, shared by every backend (CPU and, later, CUDA).
//
// bf16 is stored as its raw 16 bits (the upper half of an IEEE float32), so host code, SIMD
// intrinsics and device code agree on the layout without a library type.
#pragma once

#include <cstdint>
#include <cstring>

namespace lima {

/** Element type of a buffer or of one op's inputs. */
enum class DType : int { F32 = 0, BF16 = 1 };

/** Raw bfloat16 bits. */
using bf16 = uint16_t;

inline int64_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }
inline const char* dtype_name(DType t) { return t == DType::F32 ? "fp32" : "bf16"; }

// Round to nearest even, as torch.Tensor.to(torch.bfloat16) does; NaN stays a (quiet) NaN instead
// of rounding into infinity, infinities stay infinities.
inline bf16 f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<bf16>(u >> 16);
}

inline float bf16_to_f32(bf16 h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace lima
