// The element code of the CPU activations (activation.cpp; accuracy and method there): one
// float32 element at a time, branch-free and force-inlined so that GCC vectorises the
// loops over it. Building blocks (FMA, bit-level select, double-float sums, exp of a
// double-float argument), GELU (general and |z| <= 4 fast path), tanh-GELU, ReLU.
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
  // x * exp(..) with a single rounding (for |x| not far from 1, so that x * p stays normal)
  CMK_INLINE float times(float x) const { return (fmadd(x, ph, x * pl) * s1) * s2; }
  // (xh + xl) * exp(..), the same way
  CMK_INLINE float times(DF x) const { return (fmadd(x.hi, ph, fmadd(x.hi, pl, x.lo * ph)) * s1) * s2; }
};

constexpr float kLog2e = 0x1.715476p+0f;
constexpr float kLn2Hi = 0x1.62e43p-1f;    // float(ln 2): 20 significant bits
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
// GELU (exact, erf): a = z Phi(z), d = Phi(z) + z phi(z), phi(z) = c exp(-z^2/2).
//
// s = |z| <= 1.25: Phi(z) = 1/2 + z P(z^2), P(u) = c + u Q(u), everything after Q in
//   double-float, so that the cancellation in 1/2 + z P for z < 0 costs nothing.
// s > 1.25: M(s) = s Phi(-s) exp(s^2/2) (smooth, -> c as s -> inf) is a polynomial in
//   t = 1 / (1 + s/2); t's rounding error t_l and the last three Horner steps are carried
//   in double-float. Then a = -M exp(-s^2/2) for z < 0 and z - M exp(-s^2/2) for z > 0,
//   d = -D or 1 + D with D = exp(-s^2/2) (c s - M/s).
// exp(-s^2/2) gets s^2 exactly (hi + lo), so the tails keep full relative accuracy.

constexpr float kCHi = 0x1.988454p-2f, kCLo = -0x1.857936p-27f;  // c = 1/sqrt(2 pi) = hi + lo

// Q(u) = (P(u) - c) / u, P(u) = erf(s/sqrt2) / (2 s), u = s^2 in [0, 1.5625]; minimax for
// the relative error of z Phi(z) (z < 0), 4.5e-10.
constexpr float kQ0 = -0x1.105834p-4f, kQ1 = 0x1.46cf5p-7f, kQ2 = -0x1.3727f4p-10f,
                kQ3 = 0x1.e1c7f4p-14f, kQ4 = -0x1.2ced9cp-17f, kQ5 = 0x1.eb6278p-22f;

// M(s) = sum_k kM_k t^k, t = 1 / (1 + s/2), s in [1.25, 16]: relative error 1.3e-9.
constexpr float kM0 = 0x1.98844cp-2f, kM1 = 0x1.226122p-17f, kM2 = -0x1.998a34p-4f,
                kM3 = -0x1.90bb5cp-3f, kM4 = -0x1.09dbc8p-2f, kM5 = 0x1.cbecaap-4f,
                kM6 = -0x1.62be62p-1f, kM7 = 0x1.4879dep+1f, kM8 = -0x1.baac3cp+1f,
                kM9 = 0x1.16dac4p+1f, kM10 = -0x1.1a1312p-1f;

constexpr float kGeluSplit = 1.25f;

// c_k + (t + t_l) (x.hi + x.lo) in double-float
CMK_INLINE DF horner_df_step(DF x, float t, float t_l, float c_k) {
  const float ph = t * x.hi;
  const float pl = fmadd(t, x.hi, -ph) + fmadd(t, x.lo, t_l * x.hi);
  const DF h = two_sum(c_k, ph);
  return {h.hi, h.lo + pl};
}

template <bool kDeriv>
CMK_INLINE void gelu_one(float z, float& a, float& d) {
  // Beyond |z| = 16, exp(-z^2/2) is 0 in float32: clamp (keeps NaN).
  const float s = min_keep_nan(std::fabs(z), 16.f);
  const bool neg = z < 0.f;
  const bool is_inf = std::fabs(z) == kInf;
  const bool is_nan = z != z;
  const float ss = s * s;
  const float ssl = fmadd(s, s, -ss);  // s^2 = ss + ssl exactly
  const ExpParts E = exp_parts(-0.5f * ss, -0.5f * ssl);
  const float Ev = E.value();

  // --- s <= 1.25
  float q = kQ5;
  q = fmadd(q, ss, kQ4);
  q = fmadd(q, ss, kQ3);
  q = fmadd(q, ss, kQ2);
  q = fmadd(q, ss, kQ1);
  q = fmadd(q, ss, kQ0);
  const float uq = ss * q;
  const float uq_l = fmadd(ss, q, -uq) + ssl * q;
  const DF P0 = fast_two_sum(kCHi, uq);  // |u Q| < c
  const DF P = {P0.hi, P0.lo + (uq_l + kCLo)};
  const float zp = z * P.hi;
  const float zp_l = fmadd(z, P.hi, -zp) + z * P.lo;
  const DF Phi0 = fast_two_sum(0.5f, zp);  // |z P| < 1/2
  const DF Phi = {Phi0.hi, Phi0.lo + zp_l};
  const float a_small = fmadd(z, Phi.hi, z * Phi.lo);

  // --- s > 1.25
  const float hs = 0.5f * s;
  const DF uu = two_sum(1.f, hs);  // 1 + s/2 = uu.hi + uu.lo
  const float t = 1.f / uu.hi;
  const float t_l = t * fmadd(-t, uu.lo, fmadd(-t, uu.hi, 1.f));  // 1 / (1 + s/2) = t + t_l
  float m = kM10;
  m = fmadd(m, t, kM9);
  m = fmadd(m, t, kM8);
  m = fmadd(m, t, kM7);
  m = fmadd(m, t, kM6);
  m = fmadd(m, t, kM5);
  m = fmadd(m, t, kM4);
  m = fmadd(m, t, kM3);
  DF M = {m, 0.f};
  M = horner_df_step(M, t, t_l, kM2);
  M = horner_df_step(M, t, t_l, kM1);
  M = horner_df_step(M, t, t_l, kM0);
  const float a_neg = -E.times(M);
  const float a_pos = z - M.hi * Ev;

  const bool small = s <= kGeluSplit;
  // NaN in: the canonical NaN out (not whichever NaN operand the arithmetic propagated, so
  // the result is the same bits in every code path). gelu(-inf) = -inf * 0: NaN, as torch.
  // The sign of a is z's (gelu(-0) = -0, underflow to -0 for z < 0, as torch).
  const float a_val = with_sign_of(select(small, a_small, select(neg, a_neg, a_pos)), z);
  a = select(is_nan | (neg & is_inf), kNaN, a_val);
  if (kDeriv) {
    // s <= 1.25: d = Phi + z c exp(-z^2/2)
    const float zc = z * kCHi;
    const float zc_l = fmadd(z, kCHi, -zc) + z * kCLo;
    const float El = (E.pl * E.s1) * E.s2;
    const float d_small = fmadd(zc, Ev, Phi.hi + (Phi.lo + fmadd(zc_l, Ev, zc * El)));
    // s > 1.25: D = exp(-s^2/2) (c s - R), R = M / s = Phi(-s) exp(s^2/2)
    const float R = (M.hi + M.lo) / s;
    const float X = fmadd(kCHi, s, fmadd(kCLo, s, -R));
    const float D = E.times(X);
    const float d_large = select(neg, -D, 1.f + D);
    d = select(is_nan | is_inf, kNaN, select(small, d_small, d_large));  // torch: gelu'(+-inf) = NaN
  }
}

// ---------------------------------------------------------------------------------------
// GELU fast path, |z| <= 4 (the bulk of the inputs). With R(s) = Phi(-s) exp(s^2/2)
// (smooth, R(0) = 1/2, R(4) ~ 0.096) and s = |z|:
//   Phi(-s) = R(s) exp(-s^2/2),  a = -s Phi(-s) (z < 0),  z - s Phi(-s) (z >= 0),
//   X = R(s) - c s,  d = X exp(-s^2/2) (z < 0),  1 - X exp(-s^2/2) (z >= 0).
// exp(-s^2/2) = (1 + E1) 2^k comes from the float32 exp steps above (Cody-Waite with s^2's
// rounding error ssl and ln 2's low part in rl; E1 = rh + tail, rh exact, |tail| < 0.07);
// R (a degree-14 polynomial in v = (s - 2)/2, relative error 3.2e-9) and the products are
// evaluated in double and rounded to float once at the end, so that no cancellation (the
// z < 0 tail, d's zero near z = -0.75) costs accuracy and no double-float steps are needed.
// In double the terms cost two vector halves per float vector, which is still far cheaper
// than evaluating both regions of the general code below for every element.

constexpr float kGeluFastMax = 4.f;
constexpr double kC = 0.3989422804014327;  // 1 / sqrt(2 pi)
// R(s) = sum kR_k v^k, v = s/2 - 1, s in [0, 4]: minimax for the relative error (Lawson).
constexpr double kR0 = 0.16810200143554543, kR1 = -0.12547656359874934, kR2 = 0.08525087184346987,
                 kR3 = -0.05363391871415074, kR4 = 0.03161691458051141, kR5 = -0.01761740801571849,
                 kR6 = 0.009334153228233036, kR7 = -0.00471450059548452, kR8 = 0.002302396236085617,
                 kR9 = -0.0011193784400849334, kR10 = 0.0004945702039430495,
                 kR11 = -0.00016364655342711619, kR12 = 7.926670564726417e-05,
                 kR13 = -6.926247716935312e-05, kR14 = 2.514576640482636e-05;

CMK_INLINE double fmadd(double a, double b, double c) {
#if defined(__FMA__)
  return __builtin_fma(a, b, c);
#else
  return a * b + c;  // used only where the terms' rounding errors are far below float32's
#endif
}

// z finite with |z| <= kGeluFastMax (the caller checks; other z give garbage, no trap).
template <bool kDeriv>
CMK_INLINE void gelu_fast_one(float z, float& a, float& d) {
  const float s = std::fabs(z);
  const bool neg = z < 0.f;
  const float ss = s * s;
  const float ssl = fmadd(s, s, -ss);  // s^2 = ss + ssl exactly
  const float xh = -0.5f * ss;         // exp argument -s^2/2 = xh - ssl/2, xh in [-8, 0]
  const float kmag = fmadd(xh, kLog2e, kRoundMagic);
  const float kf = kmag - kRoundMagic;
  const int32_t k = static_cast<int32_t>(bits_of(kmag) - bits_of(kRoundMagic));  // in [-12, 0]
  const float rh = fmadd(-kf, kLn2Hi, xh);                 // exact (as in exp_parts)
  const float rl = fmadd(-kf, kLn2Lo, -0.5f * ssl);        // |rl| < 2^-21
  float q = kExpQ5;
  q = fmadd(q, rh, kExpQ4);
  q = fmadd(q, rh, kExpQ3);
  q = fmadd(q, rh, kExpQ2);
  q = fmadd(q, rh, kExpQ1);
  q = fmadd(q, rh, kExpQ0);
  const float rh2 = rh * rh;
  const float expm1_rh = fmadd(rh2, q, rh);
  const float tail = fmadd(rh2, q, fmadd(rl, expm1_rh, rl));  // exp(rh + rl) = 1 + rh + tail
  const double scale = static_cast<double>(float_of(static_cast<uint32_t>(k + 127) << 23));
  const double e = fmadd(static_cast<double>(rh) + static_cast<double>(tail), scale, scale);  // exp(-s^2/2)

  const double sd = s;
  const double v = fmadd(sd, 0.5, -1.0);
  double r = kR14;
  r = fmadd(r, v, kR13);
  r = fmadd(r, v, kR12);
  r = fmadd(r, v, kR11);
  r = fmadd(r, v, kR10);
  r = fmadd(r, v, kR9);
  r = fmadd(r, v, kR8);
  r = fmadd(r, v, kR7);
  r = fmadd(r, v, kR6);
  r = fmadd(r, v, kR5);
  r = fmadd(r, v, kR4);
  r = fmadd(r, v, kR3);
  r = fmadd(r, v, kR2);
  r = fmadd(r, v, kR1);
  r = fmadd(r, v, kR0);
  // z < 0: |a| = sp, d = xe; z >= 0: |a| = s - sp, d = 1 - xe (float selects, exact in double)
  const double sgn = select(neg, 1.f, -1.f);
  const double sp = sd * (r * e);                                          // s Phi(-s)
  a = with_sign_of(static_cast<float>(fmadd(sgn, sp, select(neg, 0.f, s))), z);  // gelu(-0) = -0
  if (kDeriv) {
    const double xe = fmadd(-kC, sd, r) * e;  // (R - c s) exp(-s^2/2)
    d = static_cast<float>(fmadd(sgn, xe, select(neg, 0.f, 1.f)));
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
