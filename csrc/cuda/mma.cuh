// How 64 values of K of packed INT4 turn into tensor-core MMAs.
//
// Both GEMM kernels gather, per thread, the register words of an m16n8k64 s4
// fragment: for A four words (rows groupID and groupID+8, two words of 8
// nibbles each), for B two words (column groupID). Since K is a sum, the
// kernels may place any K value in any MMA k-slot as long as A and B use the
// same placement; the words hold 8 consecutive K values each, in the packed
// layout's nibble order (element 2j in the low nibble of byte j), which is
// also the s4 MMA's register order. An MMA policy turns those words into MMAs:
//
//  * Int4Mma (sm_80/86/89): the words are s4 fragments as they are.
//  * Int8Mma (sm_90; Hopper has no INT4 tensor cores and emulates the s4
//    MMA): each word splits into two words of four int8 values, the even
//    elements `(w << 4) & 0xF0F0F0F0` and the odd ones `w & 0xF0F0F0F0`,
//    i.e. 16 * value in every byte -- two logic ops, no sign extension. The
//    even words of A and B feed one m16n8k32 s8 MMA and the odd words a
//    second one, so both operands keep the same K placement and the int32
//    accumulator holds exactly 256 * P (see kMaxInt8MmaGroupLen).
#pragma once

#include "cuda/primitives.cuh"

namespace apex4::cuda {

struct Int4Mma {
  static constexpr int kSteps = 1;           // MMAs per 64 values of K
  static constexpr float kInvAccScale = 1.0f;  // P = accumulator * kInvAccScale
  struct A {
    uint32_t r[kSteps][4];
  };
  struct B {
    uint32_t r[kSteps][2];
  };
  static __device__ __forceinline__ A a_operand(const uint32_t (&w)[4]) {
    return A{{{w[0], w[1], w[2], w[3]}}};
  }
  static __device__ __forceinline__ B b_operand(uint32_t w0, uint32_t w1) {
    return B{{{w0, w1}}};
  }
  static __device__ __forceinline__ void mma(int (&c)[4], const A& a, const B& b, int step) {
    mma_s4_k64(c, a.r[step], b.r[step]);
  }
};

struct Int8Mma {
  static constexpr int kSteps = 2;
  static constexpr float kInvAccScale = 1.0f / 256.0f;
  struct A {
    uint32_t r[kSteps][4];
  };
  struct B {
    uint32_t r[kSteps][2];
  };
  static __device__ __forceinline__ uint32_t even_x16(uint32_t w) { return (w << 4) & 0xF0F0F0F0u; }
  static __device__ __forceinline__ uint32_t odd_x16(uint32_t w) { return w & 0xF0F0F0F0u; }
  static __device__ __forceinline__ A a_operand(const uint32_t (&w)[4]) {
    A a;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      a.r[0][i] = even_x16(w[i]);
      a.r[1][i] = odd_x16(w[i]);
    }
    return a;
  }
  static __device__ __forceinline__ B b_operand(uint32_t w0, uint32_t w1) {
    return B{{{even_x16(w0), even_x16(w1)}, {odd_x16(w0), odd_x16(w1)}}};
  }
  static __device__ __forceinline__ void mma(int (&c)[4], const A& a, const B& b, int step) {
    mma_s8_k32(c, a.r[step], b.r[step]);
  }
};

}  // namespace apex4::cuda
