// The element code of the CPU activations (activation.cpp; accuracy and method there): one
// float32 element at a time, branch-free and force-inlined so that GCC vectorises the
// loops over it. Building blocks (FMA, bit-level select, double-float sums, exp of a
// double-float argument), GELU, tanh-GELU, ReLU.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "activation.h"

namespace convmixer_kernels {
namespace cpu {
namespace {  // internal to activation.cpp, the only file that includes this

// The element functions must be inlined into the simd loops (a call would stop GCC from
// vectorising them): force it rather than depend on the inliner's size heuristics.
#if defined(__GNUC__)
#define CMK_INLINE inline __attribute__((always_inline))
#else
#define CMK_INLINE inline
#endif

// ---------------------------------------------------------------------------------------
// Scalar building blocks (inlined into the simd loops below).

// a * b + c with one rounding. With -mfma this is one vfmadd; without FMA hardware the
// double-precision form below is exact for the error-free steps (the product of two floats
// is exact in double) and differs from a true FMA only by rare double roundings elsewhere.
CMK_INLINE float fmadd(float a, float b, float c) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return static_cast<float>(static_cast<double>(a) * static_cast<double>(b) + static_cast<double>(c));
#endif
}

CMK_INLINE uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

CMK_INLINE float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// c ? x : y as a bitwise blend. Plain ?: between floats is not used in the element code:
// GCC (which by default keeps -ftrapping-math) turns it into branches and sinks the
// arithmetic of each arm into them, and then will not if-convert (vectorise) the loop.
CMK_INLINE float select(bool c, float x, float y) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return float_of((bits_of(x) & m) | (bits_of(y) & ~m));
}

// |x| with the sign of y (x >= 0 or x with y's sign already; fixes the sign of zeros).
CMK_INLINE float with_sign_of(float x, float y) {
  return float_of(bits_of(x) | (bits_of(y) & 0x80000000u));
}

// NaN-preserving min / max against a constant (x is returned when it is NaN).
CMK_INLINE float min_keep_nan(float x, float hi) { return select(x > hi, hi, x); }
CMK_INLINE float max_keep_nan(float x, float lo) { return select(x < lo, lo, x); }

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Double-float helpers: a value carried as hi + lo (|lo| <= ulp(hi) or so).
struct DF {
  float hi, lo;
};

// hi + lo = a + b exactly (Knuth's two-sum, no condition on |a|, |b|).
CMK_INLINE DF two_sum(float a, float b) {
  const float s = a + b;
  const float bv = s - a;
  return {s, (a - (s - bv)) + (b - bv)};
}

// hi + lo = a + b exactly when |a| >= |b| (or a == 0).
CMK_INLINE DF fast_two_sum(float a, float b) {
  const float s = a + b;
  return {s, (a - s) + b};
}

// exp(xh + xl) = ((ph + pl) * s1) * s2 with ph + pl in [0.70, 1.42] (to ~2^-30 relative)
// and s1 = 2^k1, s2 = 2^k2 normal floats, k1 + k2 = k: results down in the subnormals
// are rounded once (by the last multiplication), and overflow gives inf.
struct ExpParts {
  float ph, pl, s1, s2;
  // exp(..) rounded to float
  CMK_INLINE float value() const { return (ph * s1) * s2; }
};

constexpr float kLog2e = 0x1.715476p+0f;
constexpr float kLn2Hi = 0x1.62e43p-1f;    // float(ln 2): 21 significant bits
constexpr float kLn2Lo = -0x1.05c61p-29f;  // float(ln 2 - kLn2Hi)
constexpr float kRoundMagic = 0x1.8p23f;   // x + kRoundMagic - kRoundMagic = rint(x), |x| < 2^22

// Minimax Q on [-0.35, 0.35]: exp(r) = 1 + r + r^2 Q(r), relative error 1.1e-10.
constexpr float kExpQ0 = 0x1p-1f, kExpQ1 = 0x1.555554p-3f, kExpQ2 = 0x1.5554e4p-5f,
                kExpQ3 = 0x1.11130cp-7f, kExpQ4 = 0x1.6d5278p-10f, kExpQ5 = 0x1.9e08ecp-13f;

// exp(xh + xl) for a double-float argument, |xl| <= ulp(xh), for any xh: beyond
// [-160, 100] the result is 0 or inf anyway, so xh is clamped there (and xl dropped); the
// clamp keeps NaN, and NaN gives ph = NaN.
CMK_INLINE ExpParts exp_parts(float xh, float xl) {
  const float xc = min_keep_nan(max_keep_nan(xh, -160.f), 100.f);
  const float kmag = fmadd(xc, kLog2e, kRoundMagic);
  const float kf = kmag - kRoundMagic;                                          // k = rint(x / ln 2)
  const int32_t k = static_cast<int32_t>(bits_of(kmag) - bits_of(kRoundMagic));  // k as an integer
  // x - k ln2 = rh + rl. The FMA is exact: the result is a multiple of 2^-24 (of ulp(xc)
  // and of kLn2Hi's last bit) below 1/2 in magnitude. rl is tiny.
  const float rh = fmadd(-kf, kLn2Hi, xc);
  const float rl = fmadd(-kf, kLn2Lo, select(xc == xh, xl, 0.f));
  float q = kExpQ5;
  q = fmadd(q, rh, kExpQ4);
  q = fmadd(q, rh, kExpQ3);
  q = fmadd(q, rh, kExpQ2);
  q = fmadd(q, rh, kExpQ1);
  q = fmadd(q, rh, kExpQ0);
  // exp(rh + rl) = 1 + rh + [rh^2 Q(rh) + rl exp(rh)], summed as 1 + rh (exact two-sum) + tail
  const float rh2 = rh * rh;
  const float expm1_rh = fmadd(rh2, q, rh);
  const float tail = fmadd(rh2, q, fmadd(rl, expm1_rh, rl));
  const DF one_rh = fast_two_sum(1.f, rh);
  const DF p = fast_two_sum(one_rh.hi, one_rh.lo + tail);
  ExpParts e;
  e.ph = p.hi;
  e.pl = p.lo;
  const int32_t k1 = k >> 1;  // arithmetic shift; k1, k2 in [-116, 72] for xc in [-160, 100]
  const int32_t k2 = k - k1;
  e.s1 = float_of(static_cast<uint32_t>(k1 + 127) << 23);
  e.s2 = float_of(static_cast<uint32_t>(k2 + 127) << 23);
  return e;
}

// ---------------------------------------------------------------------------------------
// GELU (exact, erf): a = z Phi(z), d = Phi(z) + z phi(z), phi(z) = c exp(-z^2/2). One float32
// evaluation, two branch-free regions (both computed, one selected per element), at
// least as accurate as PyTorch's own float32 GELU everywhere (activation.cpp):
//
// s = |z| <= 1: Phi(z) = 1/2 + z P(z^2) and d = 1/2 + z D(z^2), P and D degree-5
//   polynomials (minimax, relative error 2.8e-8: c's rounding to float32); a = z Phi(z).
// s > 1: Phi(-s) = R(t) exp(-s^2/2) with R(s) = Phi(-s) exp(s^2/2) (smooth, R(1) = 0.29,
//   ~ c / s for large s) a degree-8 polynomial in t = 1 / (1 + s/4) (relative error
//   1.6e-8 on s in [1, 16]); a = -s Phi(-s) (z < 0), z - s Phi(-s) (z > 0),
//   d = X (z < 0), 1 - X (z > 0) with X = (R - c s) exp(-s^2/2).
// exp(-s^2/2) = ep 2^k: k = rint(-s^2 / (2 ln 2)), r = -s^2/2 - k float(ln 2) (one exact FMA),
// ep a degree-6 polynomial in r (relative error 3.2e-9); 2^k is applied as 2^(k+64) then
// 2^-64 so that results in the subnormals are rounded once. The argument is s^2 rounded to
// float and ln 2 is not carried beyond float: the relative error of exp(-s^2/2) grows as
// about s^2/2 half-ulps (that of Phi(-s), so of a and d for z << 0: up to 70 ulps near
// z = -13, where they are about 1e-37; absolute error below 5e-9 for every z <= -3).
// Carrying both (three more operations) would keep it at a few ulps; it is not done because
// torch's float32 GELU is far less accurate there (it cancels to 0 below z ~ -5.5), and the
// bar is torch's.
// Beyond |z| = 16, exp(-z^2/2) is 0 in float32: s is clamped there (keeps NaN).

constexpr float kCHi = 0x1.988454p-2f;  // c = 1/sqrt(2 pi), rounded to float
constexpr float kGeluSplit = 1.f;
// exp(r) = 1 + r + r^2 (kGeluE2 + ...), |r| <= ln2 / 2
constexpr float kGeluE2 = 0x1.fffffcp-2f, kGeluE3 = 0x1.555492p-3f, kGeluE4 = 0x1.5558bep-5f,
                kGeluE5 = 0x1.1239e8p-7f, kGeluE6 = 0x1.6a3feap-10f;
// P(u) = erf(s / sqrt 2) / (2 s), D(u) = P(u) + c exp(-u/2), u = s^2 in [0, 1]
constexpr float kGeluP0 = 0x1.988454p-2f, kGeluP1 = -0x1.10587p-4f, kGeluP2 = 0x1.46d908p-7f,
                kGeluP3 = -0x1.37bfd2p-10f, kGeluP4 = 0x1.e8123ap-14f, kGeluP5 = -0x1.23c0f6p-17f;
constexpr float kGeluD0 = 0x1.988454p-1f, kGeluD1 = -0x1.105846p-2f, kGeluD2 = 0x1.ea372ep-5f,
                kGeluD3 = -0x1.36fe04p-7f, kGeluD4 = 0x1.291204p-10f, kGeluD5 = -0x1.7c3606p-14f;
// R = sum kGeluR_k t^k, t = 1 / (1 + s/4), s in [1, 16]
constexpr float kGeluR0 = 0x1.c78f9p-19f, kGeluR1 = 0x1.98400ap-4f, kGeluR2 = 0x1.9a7c5ap-4f,
                kGeluR3 = 0x1.78d124p-4f, kGeluR4 = 0x1.4b9018p-4f, kGeluR5 = 0x1.4472bep-4f,
                kGeluR6 = -0x1.0f0e98p-7f, kGeluR7 = 0x1.9cab4cp-4f, kGeluR8 = -0x1.6cf51cp-5f;

template <bool kDeriv>
CMK_INLINE void gelu_one(float z, float& a, float& d) {
  const float s = min_keep_nan(std::fabs(z), 16.f);
  const bool neg = z < 0.f;
  const bool is_inf = std::fabs(z) == kInf;
  const bool is_nan = z != z;
  const bool small = s <= kGeluSplit;  // false for NaN
  const float ss = s * s;

  // --- s <= 1
  float P = kGeluP5;
  P = fmadd(P, ss, kGeluP4);
  P = fmadd(P, ss, kGeluP3);
  P = fmadd(P, ss, kGeluP2);
  P = fmadd(P, ss, kGeluP1);
  P = fmadd(P, ss, kGeluP0);
  const float a_small = z * fmadd(z, P, 0.5f);  // z's sign, -0 included

  // --- s > 1: exp(xh) = ep 2^k with xh = -ss/2 (s^2 rounded: see above)
  const float xh = -0.5f * ss;
  const float kmag = fmadd(xh, kLog2e, kRoundMagic);
  const float kf = kmag - kRoundMagic;  // k = rint(xh / ln 2), in [-185, 0]
  // 2^(k+64) (a normal float for every k here; NaN z: any value, the result is replaced)
  const float scale = float_of((bits_of(kmag) - bits_of(kRoundMagic) + 191u) << 23);
  const float r = fmadd(-kf, kLn2Hi, xh);  // xh - k float(ln 2), exact (a multiple of 2^-21)
  float ep = kGeluE6;
  ep = fmadd(ep, r, kGeluE5);
  ep = fmadd(ep, r, kGeluE4);
  ep = fmadd(ep, r, kGeluE3);
  ep = fmadd(ep, r, kGeluE2);
  ep = fmadd(ep, r, 1.f);
  ep = fmadd(ep, r, 1.f);
  const float t = 1.f / fmadd(0.25f, s, 1.f);
  float R = kGeluR8;
  R = fmadd(R, t, kGeluR7);
  R = fmadd(R, t, kGeluR6);
  R = fmadd(R, t, kGeluR5);
  R = fmadd(R, t, kGeluR4);
  R = fmadd(R, t, kGeluR3);
  R = fmadd(R, t, kGeluR2);
  R = fmadd(R, t, kGeluR1);
  R = fmadd(R, t, kGeluR0);
  const float sp = (((s * R) * ep) * scale) * 0x1p-64f;  // s Phi(-s)
  const float a_large = with_sign_of(select(neg, sp, z - sp), z);

  // NaN in: the canonical NaN out (the same bits in every code path). gelu(-inf) =
  // -inf * 0: NaN, as torch. gelu(+inf) = +inf.
  a = select(is_nan | (neg & is_inf), kNaN, select(small, a_small, a_large));
  if (kDeriv) {
    float D = kGeluD5;
    D = fmadd(D, ss, kGeluD4);
    D = fmadd(D, ss, kGeluD3);
    D = fmadd(D, ss, kGeluD2);
    D = fmadd(D, ss, kGeluD1);
    D = fmadd(D, ss, kGeluD0);
    const float d_small = fmadd(z, D, 0.5f);
    const float X = ((fmadd(-kCHi, s, R) * ep) * scale) * 0x1p-64f;
    const float d_large = select(neg, X, 1.f - X);
    d = select(is_nan | is_inf, kNaN, select(small, d_small, d_large));  // torch: gelu'(+-inf) = NaN
  }
}

// ---------------------------------------------------------------------------------------
// GELU, tanh approximation: a = z sigmoid(v), v = 2 sqrt(2/pi) (z + 0.044715 z^3).
// With e = exp(-|v|) in (0, 1] and r = 1 / (1 + e): sigmoid(v) = r (z >= 0), e r (z < 0).
// v is computed in double-float (the tail a ~ z exp(v) needs v to ~2^-30 absolute), and
// 1 + e, r and the products in double-float, so a is rounded about once.

constexpr float kC1Hi = 0x1.988454p+0f, kC1Lo = -0x1.857936p-25f;  // C1 = 2 sqrt(2/pi)
constexpr float kC2Hi = 0x1.2444f2p-4f, kC2Lo = 0x1.49b16ap-29f;   // C2 = C1 * 0.044715
constexpr float kC2x3Hi = 0x1.b6676cp-3f, kC2x3Lo = -0x1.175e2p-32f;  // 3 C2

template <bool kDeriv>
CMK_INLINE void gelu_tanh_one(float z, float& a, float& d) {
  // Beyond |z| = 12, exp(-|v|) is 0 in float32: clamp (keeps NaN).
  const float s = min_keep_nan(std::fabs(z), 12.f);
  const bool neg = z < 0.f;
  const bool is_inf = std::fabs(z) == kInf;
  const bool is_nan = z != z;
  const float ss = s * s;
  const float ssl = fmadd(s, s, -ss);
  // m = C1 + C2 s^2 (double-float), |v| = s m (double-float)
  const float c2s = kC2Hi * ss;
  const float c2s_l = fmadd(kC2Hi, ss, -c2s) + fmadd(kC2Hi, ssl, kC2Lo * ss);
  const DF m0 = two_sum(kC1Hi, c2s);
  const float m_l = m0.lo + (c2s_l + kC1Lo);
  const float vh = s * m0.hi;
  const float vl = fmadd(s, m_l, fmadd(s, m0.hi, -vh));
  const ExpParts E = exp_parts(-vh, -vl);  // e = exp(-|v|)
  const float Ev = E.value();
  const float El = (E.pl * E.s1) * E.s2;
  // 1 + e = den.hi + den.lo; r = 1 / (1 + e) = rh + rl
  const DF den0 = fast_two_sum(1.f, Ev);
  const float den_l = den0.lo + El;
  const float rh = 1.f / den0.hi;
  const float rl = rh * (fmadd(-rh, den0.hi, 1.f) - rh * den_l);
  const float zs = select(neg, -s, s);  // z clamped to [-12, 12]
  const float a_pos = fmadd(z, rh, zs * rl);  // z r (rl = 0 beyond 12; inf * 0 would be NaN)
  // z < 0: z e r, with e r = (ph + pl) r as wh + wl (beyond -12, z e r is 0 anyway)
  const float wh = E.ph * rh;
  const float wl = fmadd(E.ph, rh, -wh) + fmadd(E.ph, rl, E.pl * rh);
  const float a_neg = (fmadd(zs, wh, zs * wl) * E.s1) * E.s2;
  // a has z's sign (-0 included); NaN in: canonical NaN; gelu_tanh(-inf): NaN, as torch
  a = select(is_nan | (neg & is_inf), kNaN, with_sign_of(select(neg, a_neg, a_pos), z));
  if (kDeriv) {
    // d = S + z v' S (1 - S), v' = C1 + 3 C2 z^2, S (1 - S) = e r^2; with z clamped
    // (v' stays finite); zdv = z v' in double-float.
    const float c3s = kC2x3Hi * ss;
    const float c3s_l = fmadd(kC2x3Hi, ss, -c3s) + fmadd(kC2x3Hi, ssl, kC2x3Lo * ss);
    const DF dv0 = two_sum(kC1Hi, c3s);
    const DF dv = fast_two_sum(dv0.hi, dv0.lo + (c3s_l + kC1Lo));
    const float zdv = zs * dv.hi;
    const float zdv_l = fmadd(zs, dv.hi, -zdv) + zs * dv.lo;
    // z >= 0: d = r + z v' (e r) r
    const float d_pos = rh + fmadd(((zdv * wh) * E.s1) * E.s2, rh, rl);
    // z < 0: d = (e r) (1 + z v' r), 1 + z v' r in double-float
    const float p = zdv * rh;
    const float p_l = fmadd(zdv, rh, -p) + fmadd(zdv, rl, zdv_l * rh);
    const DF in0 = two_sum(1.f, p);
    const DF inner = {in0.hi, in0.lo + p_l};
    const float d_neg = (fmadd(wh, inner.hi, fmadd(wh, inner.lo, wl * inner.hi)) * E.s1) * E.s2;
    d = select(is_nan | is_inf, kNaN, select(neg, d_neg, d_pos));  // torch: NaN at +-inf
  }
}

// ---------------------------------------------------------------------------------------
// ReLU, as torch: relu(z) = z < 0 ? 0 : z (keeps NaN and -0); threshold_backward passes
// the gradient unless z <= 0, so relu'(NaN) = 1.

template <bool kDeriv>
CMK_INLINE void relu_one(float z, float& a, float& d) {
  a = select(z < 0.f, 0.f, z);
  if (kDeriv) d = select(z <= 0.f, 0.f, 1.f);
}

// ---------------------------------------------------------------------------------------
// The loops. `omp simd` asserts there is no loop-carried dependence (a may be z itself:
// element i is read before it is written, in the same lane).

template <Act kAct, bool kDeriv>
CMK_INLINE void one(float z, float& a, float& d) {
  if constexpr (kAct == Act::Gelu) {
    gelu_one<kDeriv>(z, a, d);
  } else if constexpr (kAct == Act::GeluTanh) {
    gelu_tanh_one<kDeriv>(z, a, d);
  } else {
    relu_one<kDeriv>(z, a, d);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace convmixer_kernels
