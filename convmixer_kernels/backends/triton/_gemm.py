"""GEMM kernels of the pointwise block and the patch embedding: ``BN(act(conv(x) + b))``
where the convolution is a 1x1 conv (``P = 1``) or a ``P x P`` conv with stride ``P``.

Both are one GEMM over output pixels: row ``m`` of the M = N*Ho*Wo rows is the pixel
(n, ho, wo); column ``k`` of the K = Cin*P*P reduction is the input channel and the
position (i, j) inside the patch, so ``A[m, k] = x[n, ci, ho*P + i, wo*P + j]``. That
address splits into a row part and a column part (``_row_offsets``/``_col_offsets``),
so A is read straight from the image through its strides (NCHW, channels_last or any
view): no im2col copy, and rows/columns that do not fill a patch are never read. The
column order is (ci, i, j) (the weight's own order), or (i, j, ci) for channels_last
images so that consecutive k are consecutive in memory; the weight matrix is permuted
on the host to match. Every activation-shaped tensor (out, z, dz, dy) is addressed
as ``row offset + channel * channel stride`` with P = 1.

Numerics: ``tl.dot`` accumulates in float32. On a GPU it is fed the storage dtype
(tensor cores for fp16/bf16; for float32, TF32 when ``torch.backends.cudnn.allow_tf32``
allows it, as PyTorch's convolutions do, else IEEE). Under the interpreter
(``DOT_F32``) every operand is upcast to float32 right after its load (its bfloat16
arithmetic is wrong). The epilogue adds the bias, rounds to x's dtype (the stored
pre-activation z), then applies the activation and the BatchNorm affine
``(a - mean) * invstd * bn_weight + bn_bias`` in the reference's order. Absent bias /
BatchNorm parameters are passed as zeros / ones (exact in IEEE arithmetic), which keeps
the number of compiled variants down.

Kernels:
- ``_fwd``: the GEMM with, by ``MODE``, the eval epilogue (out), the training epilogue
  (z stored, per-tile (mean, M2) of act(z) per channel) or z only (the backward's
  recompute of a pre-activation that was not saved).
- ``_norm``: training forward's light pass: out = BN(act(z)) with the batch statistics
  (combined on the host from the tile statistics in float64, fixed order).
- ``_bwd_elem``: per-tile sums of dy and dy * xhat (the BatchNorm parameter gradients
  and the batch-statistics terms), then dz = act'(z) * (dy*bn_weight*invstd + c0 +
  xhat*cx) in float32 with its per-tile sums (the conv bias gradient).
- ``_dgrad``: dx = dz @ W, scattered back to the image positions of each patch.
- ``_wgrad``: dW = dz^T @ A, the reduction over M cut into a fixed number of splits
  whose float32 partials are summed on the host in float64, in a fixed order.
No atomics anywhere: results are bitwise reproducible for a given shape and device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...spec import out_memory_format, output_memory_format
from ._common import (ACT_CODES, act_bwd, act_fwd, combine_tile_stats, interpreting, invstd,
                      launch, needs_int64, pow2)


# ---- device functions ---------------------------------------------------------------
# (few nested calls: the interpreter re-patches triton.language on every device-function
# call, which costs milliseconds each)

@triton.jit
def _swizzle(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile ``pid``, GROUP_M row tiles at a time (L2 reuse)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size
    pid_n = (pid % width) // size
    return pid_m, pid_n


@triton.jit
def _pixel(m, HO, WO):
    """Output pixel (n, ho, wo) of row m."""
    hw = HO * WO
    n = m // hw
    r = m - n * hw
    ho = r // WO
    return n, ho, r - ho * WO


@triton.jit
def _col_offsets(k, CIN, sc, sh, sw, P: tl.constexpr, CL_K: tl.constexpr):
    """Offset of reduction column k = (ci, i, j) inside a patch: k = (ci*P + i)*P + j,
    or k = (i*P + j)*CIN + ci when CL_K."""
    if P == 1:
        off = k * sc
    else:
        if CL_K:
            r = k // CIN
            ci = k - r * CIN
        else:
            ci = k // (P * P)
            r = k - ci * (P * P)
        i = r // P
        j = r - i * P
        off = ci * sc + i * sh + j * sw
    return off


@triton.jit
def _bn(a, c, cmask, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps):
    """(a - mean) * invstd * bn_weight + bn_bias, in the reference's order."""
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    inv = invstd(tl.load(var_ptr + c, mask=cmask, other=1.0).to(tl.float32), eps)
    y = (a - mean[None, :]) * inv[None, :]
    y = y * tl.load(bnw_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return y + tl.load(bnb_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]


# ---- kernels ------------------------------------------------------------------------

@triton.jit
def _fwd(x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, out_ptr, z_ptr,
         pmean_ptr, pm2_ptr, M, HO, WO, CIN, COUT, KDIM, eps,
         sxn, sxc, sxh, sxw, swk, swn, son, soc, soh, sow,
         P: tl.constexpr, CL_K: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr,
         STORE_Z: tl.constexpr, IDX64: tl.constexpr, PREC: tl.constexpr,
         DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """MODE 0: eval (out = BN(act(z)) with running statistics); 1: training (z stored,
    per-row-tile (mean, M2) of act(z)); 2: z only."""
    pid_m, pid_n = _swizzle(tl.program_id(0), M, COUT, BLOCK_M, BLOCK_N, GROUP_M)
    if IDX64:
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < COUT
    n, ho, wo = _pixel(rm, HO, WO)
    a_row = n * sxn + ho * (P * sxh) + wo * (P * sxw)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, KDIM, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        if IDX64:
            rk = rk.to(tl.int64)
        kmask = rk < KDIM
        if P == 1:
            a_col = rk * sxc
        else:
            a_col = _col_offsets(rk, CIN, sxc, sxh, sxw, P, CL_K)
        a = tl.load(x_ptr + a_row[:, None] + a_col[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + rk[:, None] * swk + rn[None, :] * swn,
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    # conv + bias in float32, rounded to x's dtype: the pre-activation
    z = acc + tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    z = z.to(x_ptr.dtype.element_ty).to(tl.float32)
    mask = mmask[:, None] & nmask[None, :]
    o_off = (n * son + ho * soh + wo * sow)[:, None] + rn[None, :] * soc
    if STORE_Z:
        tl.store(z_ptr + o_off, z.to(z_ptr.dtype.element_ty), mask=mask)
    if MODE == 0:
        y = _bn(act_fwd(z, ACT), rn, nmask, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps)
        tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=mask)
    elif MODE == 1:
        a = tl.where(mask, act_fwd(z, ACT), 0.0)
        # corrected two-pass: the deviations' sum refines the mean and the M2
        cnt = tl.sum(mmask.to(tl.float32), axis=0)
        tmean = tl.sum(a, axis=0) / cnt
        d = tl.where(mask, a - tmean[None, :], 0.0)
        sd = tl.sum(d, axis=0)
        tl.store(pmean_ptr + pid_m * COUT + rn, tmean + sd / cnt, mask=nmask)
        tl.store(pm2_ptr + pid_m * COUT + rn, tl.sum(d * d, axis=0) - sd * sd / cnt,
                 mask=nmask)


@triton.jit
def _norm(z_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, out_ptr, M, HO, WO, C, eps,
          son, soc, soh, sow, ACT: tl.constexpr, IDX64: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    n_cb = tl.cdiv(C, BLOCK_N)
    t = pid // n_cb
    cb = pid - t * n_cb
    if IDX64:
        t = t.to(tl.int64)
        cb = cb.to(tl.int64)
    rm = t * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < C
    mask = (rm < M)[:, None] & nmask[None, :]
    n, ho, wo = _pixel(rm, HO, WO)
    o_off = (n * son + ho * soh + wo * sow)[:, None] + rn[None, :] * soc
    z = tl.load(z_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
    y = _bn(act_fwd(z, ACT), rn, nmask, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps)
    tl.store(out_ptr + o_off, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_elem(dy_ptr, z_ptr, mean_ptr, var_ptr, bnw_ptr, c0_ptr, cx_ptr, dz_ptr,
              psum_ptr, pdot_ptr, pdb_ptr, M, HO, WO, C, eps,
              sgn, sgc, sgh, sgw, szn, szc, szh, szw, sdn, sdc, sdh, sdw,
              ACT: tl.constexpr, STATS: tl.constexpr, DZ: tl.constexpr, CENTER: tl.constexpr,
              BIAS_GRAD: tl.constexpr, IDX64: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    n_cb = tl.cdiv(C, BLOCK_N)
    t = pid // n_cb
    cb = pid - t * n_cb
    if IDX64:
        t = t.to(tl.int64)
        cb = cb.to(tl.int64)
    rm = t * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < C
    mask = (rm < M)[:, None] & nmask[None, :]
    n, ho, wo = _pixel(rm, HO, WO)
    z = tl.load(z_ptr + (n * szn + ho * szh + wo * szw)[:, None] + rn[None, :] * szc,
                mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + (n * sgn + ho * sgh + wo * sgw)[:, None] + rn[None, :] * sgc,
                 mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + rn, mask=nmask, other=0.0)
    inv = invstd(tl.load(var_ptr + rn, mask=nmask, other=1.0), eps)
    xhat = (act_fwd(z, ACT) - mean[None, :]) * inv[None, :]
    if STATS:
        tl.store(psum_ptr + t * C + rn, tl.sum(dy, axis=0), mask=nmask)
        tl.store(pdot_ptr + t * C + rn, tl.sum(tl.where(mask, dy * xhat, 0.0), axis=0),
                 mask=nmask)
    if DZ:
        # the reference's order: (g - mean(g) - xhat * mean(g * xhat)) * invstd with
        # g = dy * bn_weight, c0 = -mean(g), cx = -mean(g * xhat); without batch
        # statistics g * invstd
        g = dy * tl.load(bnw_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if CENTER:
            c0 = tl.load(c0_ptr + rn, mask=nmask, other=0.0)
            cx = tl.load(cx_ptr + rn, mask=nmask, other=0.0)
            g = g + c0[None, :] + xhat * cx[None, :]
        dz = tl.where(mask, act_bwd(z, g * inv[None, :], ACT), 0.0)
        tl.store(dz_ptr + (n * sdn + ho * sdh + wo * sdw)[:, None] + rn[None, :] * sdc, dz,
                 mask=mask)
        if BIAS_GRAD:
            tl.store(pdb_ptr + t * C + rn, tl.sum(dz, axis=0), mask=nmask)


@triton.jit
def _dgrad(dz_ptr, w_ptr, dx_ptr, M, HO, WO, CIN, COUT, KDIM,
           sdn, sdc, sdh, sdw, swk, swn, sxn, sxc, sxh, sxw,
           P: tl.constexpr, CL_K: tl.constexpr, IDX64: tl.constexpr, PREC: tl.constexpr,
           DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """dx[m, k] = sum over output channels co of dz[m, co] * W[co, k], stored at the image
    position of column k of patch m (reduction over COUT, output columns over KDIM)."""
    pid_m, pid_n = _swizzle(tl.program_id(0), M, KDIM, BLOCK_M, BLOCK_N, GROUP_M)
    if IDX64:
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < KDIM
    n, ho, wo = _pixel(rm, HO, WO)
    dz_row = n * sdn + ho * sdh + wo * sdw
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, COUT, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        if IDX64:
            rk = rk.to(tl.int64)
        kmask = rk < COUT
        a = tl.load(dz_ptr + dz_row[:, None] + rk[None, :] * sdc,
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + rk[:, None] * swk + rn[None, :] * swn,
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        if DOT_F32:
            b = b.to(tl.float32)
        else:
            a = a.to(w_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    off = ((n * sxn + ho * (P * sxh) + wo * (P * sxw))[:, None]
           + _col_offsets(rn, CIN, sxc, sxh, sxw, P, CL_K)[None, :])
    tl.store(dx_ptr + off, acc.to(dx_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _wgrad(dz_ptr, x_ptr, pw_ptr, M, HO, WO, CIN, COUT, KDIM, ROWS_PER_SPLIT,
           sdn, sdc, sdh, sdw, sxn, sxc, sxh, sxw,
           P: tl.constexpr, CL_K: tl.constexpr, IDX64: tl.constexpr, PREC: tl.constexpr,
           DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """pw[split, co, k] = sum over this split's rows m of dz[m, co] * A[m, k]."""
    tiles = tl.cdiv(COUT, BLOCK_M) * tl.cdiv(KDIM, BLOCK_N)
    split = tl.program_id(0) // tiles
    pid_m, pid_n = _swizzle(tl.program_id(0) - split * tiles, COUT, KDIM, BLOCK_M, BLOCK_N,
                            GROUP_M)
    if IDX64:
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)
        split = split.to(tl.int64)
    rc = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = rc < COUT
    nmask = rn < KDIM
    x_col = _col_offsets(rn, CIN, sxc, sxh, sxw, P, CL_K)
    lo = split * ROWS_PER_SPLIT
    hi = tl.minimum(lo + ROWS_PER_SPLIT, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_K):
        rm = m0 + tl.arange(0, BLOCK_K)
        mmask = rm < hi
        n, ho, wo = _pixel(rm, HO, WO)
        a = tl.load(dz_ptr + rc[:, None] * sdc + (n * sdn + ho * sdh + wo * sdw)[None, :],
                    mask=cmask[:, None] & mmask[None, :], other=0.0)
        b = tl.load(x_ptr + (n * sxn + ho * (P * sxh) + wo * (P * sxw))[:, None] + x_col[None, :],
                    mask=mmask[:, None] & nmask[None, :], other=0.0)
        if DOT_F32:
            b = b.to(tl.float32)
        else:
            a = a.to(x_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    dst = pw_ptr + (split * COUT + rc[:, None]) * KDIM + rn[None, :]
    tl.store(dst, acc, mask=cmask[:, None] & nmask[None, :])


# ---- launch configuration -----------------------------------------------------------

def _fit(v: int, lo: int, hi: int) -> int:
    """The power of two >= v, clamped to [lo, hi] (tl.dot needs every dim >= 16)."""
    return max(lo, min(hi, pow2(v)))


def gemm_config(M: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """Tile of a (M x K) @ (K x N) GEMM. GPU: 128 x 128 output tiles (a 64 KB fp32
    accumulator over 8 warps), BLOCK_K 64 for 2-byte operands (32 for float32, same
    bytes per stage), 3 stages (96 KB of shared memory for bf16), grouped row order for
    L2 reuse; smaller problems get smaller power-of-two tiles. The interpreter costs per
    program and per operation, not per element: there one program takes as much as it
    can."""
    if interpreting():
        return dict(BLOCK_M=_fit(M, 16, 512), BLOCK_N=_fit(N, 16, 128),
                    BLOCK_K=_fit(K, 16, 128), GROUP_M=1, num_warps=4)
    bk = 32 if dtype == torch.float32 else 64
    bm, bn = _fit(M, 16, 128), _fit(N, 16, 128)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=_fit(K, 16, bk), GROUP_M=8,
                num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=3)


def elementwise_config(M: int, C: int) -> dict:
    if interpreting():
        bm = _fit(M, 16, 1024)
        return dict(BLOCK_M=bm, BLOCK_N=_fit(C, 16, max(16, 65536 // bm)), num_warps=4)
    # 16 values a thread over 8 warps: the GELU and its derivative keep within the
    # register file (4 warps spilled in the backward pass on sm_90)
    return dict(BLOCK_M=64, BLOCK_N=_fit(C, 16, 64), num_warps=8)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def wgrad_splits(tiles: int, row_blocks: int, device: torch.device) -> int:
    """Number of fixed row ranges the weight gradient's reduction over M is cut into:
    the fewest (at most 8) that fill the SMs' last wave to 90%, keeping at least 16
    BLOCK_K steps per split. One under the interpreter (no parallelism to gain)."""
    if interpreting():
        return 1
    sms = _sm_count(device)
    best, best_eff = 1, 0.0
    for s in range(1, 9):
        if s > 1 and row_blocks < 16 * s:
            break
        eff = tiles * s / (math.ceil(tiles * s / sms) * sms)
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
        if eff >= 0.9:
            break
    return best


def _precision(x: Tensor) -> str:
    """tl.dot's input precision: TF32 for float32 on a GPU when PyTorch's convolutions
    may use it (``torch.backends.cudnn.allow_tf32``), IEEE otherwise (and always under
    the interpreter, which computes in float32 anyway)."""
    if x.dtype == torch.float32 and not interpreting() and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _per_channel(t: Optional[Tensor], c: int, fill: float, like: Tensor) -> Tensor:
    if t is None:
        return torch.full((c,), fill, dtype=torch.float32, device=like.device)
    return t.detach().contiguous()


class Geometry:
    """Sizes, layouts and the weight matrix of one call (P = 1: pointwise block)."""

    def __init__(self, x: Tensor, weight: Tensor, out_fmt: "torch.memory_format"):
        """``out_fmt``: the layout of the activation-shaped results (out, z, dz); dx
        follows x's (``in_fmt``)."""
        N, self.cin, H, W = x.shape
        self.cout, P = weight.shape[0], weight.shape[-1]
        self.p = P
        self.ho, self.wo = H // P, W // P
        self.m = N * self.ho * self.wo
        self.kdim = self.cin * P * P
        self.out_shape = (N, self.cout, self.ho, self.wo)
        self.fmt = out_fmt
        self.in_fmt = output_memory_format(x)
        self.cl_k = P > 1 and self.in_fmt == torch.channels_last
        w = weight.detach()
        if self.cl_k:
            w = w.permute(0, 2, 3, 1)
        # (Cout, K) in the kernels' column order, in the storage dtype
        self.wmat = w.reshape(self.cout, self.kdim).contiguous()
        self.prec = _precision(x)
        self.dot_f32 = interpreting()
        self.covers = H % P == 0 and W % P == 0

    def weight_grad(self, dwmat: Tensor, weight: Tensor) -> Tensor:
        P = self.p
        if self.cl_k:
            return dwmat.reshape(self.cout, P, P, self.cin).permute(0, 3, 1, 2).contiguous()
        return dwmat.reshape(weight.shape).contiguous()

    def gemm_meta(self, cfg: dict) -> dict:
        return dict(P=self.p, CL_K=self.cl_k, PREC=self.prec, DOT_F32=self.dot_f32, **cfg)


def use_int64(g: Geometry, *tensors: Tensor) -> bool:
    """int64 offsets when some tensor of the call (the activation-shaped results
    included) or the statistics' index range needs them, and always under the
    interpreter: there int32 arithmetic is checked for overflow op by op, which costs
    more than the kernels' own work (the int32 variant is tested by forcing it)."""
    if interpreting():
        return True
    dense = torch.empty(g.out_shape, device="meta", memory_format=g.fmt)
    return needs_int64(*tensors, dense) or g.m * max(g.cout, g.kdim) >= 2 ** 31 - 1


def _grid2(M: int, N: int, cfg: dict) -> tuple[int]:
    return (math.ceil(M / cfg["BLOCK_M"]) * math.ceil(N / cfg["BLOCK_N"]),)


# ---- the backend contract -----------------------------------------------------------

def forward(x: Tensor, weight: Tensor, bias, bn_weight, bn_bias, running_mean, running_var,
            use_batch_stats: bool, eps: float, activation: str, save_preact: bool,
            out_format: str):
    """The backend contract (``convmixer_kernels.reference.forward``): out and the saved
    pre-activation are allocated in ``out_format``'s layout and the kernels store
    through their strides, so the GEMM writes that layout itself."""
    g = Geometry(x, weight, out_memory_format(out_format))
    C, M, dev = g.cout, g.m, x.device
    out = torch.empty(g.out_shape, dtype=x.dtype, device=dev, memory_format=g.fmt)
    keep_z = use_batch_stats or save_preact
    z = torch.empty_like(out) if keep_z else None
    b = _per_channel(bias, C, 0.0, x)
    bnw = _per_channel(bn_weight, C, 1.0, x)
    bnb = _per_channel(bn_bias, C, 0.0, x)
    act = ACT_CODES[activation]
    idx64 = use_int64(g, x, out)
    cfg = gemm_config(M, C, g.kdim, x.dtype)
    grid = _grid2(M, C, cfg)
    common = (M, g.ho, g.wo, g.cin, C, g.kdim, eps, *_strides(x), 1, g.kdim, *_strides(out))
    meta = dict(ACT=act, IDX64=idx64, **g.gemm_meta(cfg))
    if use_batch_stats:
        tiles = math.ceil(M / cfg["BLOCK_M"])
        pmean = torch.empty(tiles, C, dtype=torch.float32, device=dev)
        pm2 = torch.empty_like(pmean)
        launch(_fwd, grid, x, g.wmat, b, None, None, None, None, None, z, pmean, pm2,
               *common, MODE=1, STORE_Z=True, **meta)
        mean, var = combine_tile_stats(pmean, pm2, M, cfg["BLOCK_M"])
        ecfg = elementwise_config(M, C)
        launch(_norm, _grid2(M, C, ecfg), z, mean, var, bnw, bnb, out, M, g.ho, g.wo, C, eps,
               *_strides(out), ACT=act, IDX64=idx64, **ecfg)
    else:
        mean = running_mean.detach().to(torch.float32).clone()
        var = running_var.detach().to(torch.float32).clone()
        launch(_fwd, grid, x, g.wmat, b, mean, var, bnw, bnb, out, z, None, None,
               *common, MODE=0, STORE_Z=keep_z, **meta)
    preact = z if save_preact else x.new_empty(0)
    return out, mean, var, preact


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, bias, bn_weight, mean: Tensor,
             var: Tensor, preact: Tensor, use_batch_stats: bool, eps: float, activation: str,
             output_mask):
    need_dx, need_dw, need_db, need_dbnw, need_dbnb = (bool(m) for m in output_mask)
    # grad_out and preact come in any layout (the kernels read them through their
    # strides); dz and a recomputed z take preact's layout, else grad_out's.
    g = Geometry(x, weight, output_memory_format(preact if preact.numel() > 0 else grad_out))
    C, M, dev, f32 = g.cout, g.m, x.device, torch.float32
    act = ACT_CODES[activation]
    need_conv = need_dx or need_dw or need_db
    need_stats = need_dbnw or need_dbnb or (use_batch_stats and need_conv)
    # every result is a fresh tensor, placeholders of masked-out results included
    dx, dw, db = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    dbnw, dbnb = x.new_empty(0, dtype=f32), x.new_empty(0, dtype=f32)
    if not (need_conv or need_stats):
        return dx, dw, db, dbnw, dbnb

    idx64 = use_int64(g, x, grad_out, preact)
    if preact.numel() == 0:
        # The pre-activation was not saved: recompute it with the forward GEMM.
        z = torch.empty(g.out_shape, dtype=x.dtype, device=dev, memory_format=g.fmt)
        cfg = gemm_config(M, C, g.kdim, x.dtype)
        launch(_fwd, _grid2(M, C, cfg), x, g.wmat, _per_channel(bias, C, 0.0, x), None, None,
               None, None, None, z, None, None, M, g.ho, g.wo, g.cin, C, g.kdim, eps,
               *_strides(x), 1, g.kdim, *_strides(z), ACT=act, MODE=2, STORE_Z=True,
               IDX64=idx64, **g.gemm_meta(cfg))
    else:
        z = preact

    ecfg = elementwise_config(M, C)
    grid = _grid2(M, C, ecfg)
    tiles = math.ceil(M / ecfg["BLOCK_M"])
    mean32, var32 = mean.to(f32).contiguous(), var.to(f32).contiguous()
    bw = _per_channel(bn_weight, C, 1.0, x)
    dz = (torch.empty(g.out_shape, dtype=f32, device=dev, memory_format=g.fmt)
          if need_conv else None)
    pdb = torch.empty(tiles, C, dtype=f32, device=dev) if need_db else None

    def elem(stats: bool, dz_pass: bool, c0: Optional[Tensor] = None,
             cx: Optional[Tensor] = None):
        psum = torch.empty(tiles, C, dtype=f32, device=dev) if stats else None
        pdot = torch.empty_like(psum) if stats else None
        dzs = _strides(dz) if dz_pass else _strides(z)
        launch(_bwd_elem, grid, grad_out, z, mean32, var32, bw, c0, cx,
               dz if dz_pass else None, psum, pdot, pdb if dz_pass else None,
               M, g.ho, g.wo, C, eps, *_strides(grad_out), *_strides(z), *dzs,
               ACT=act, STATS=stats, DZ=dz_pass, CENTER=c0 is not None,
               BIAS_GRAD=dz_pass and need_db, IDX64=idx64, **ecfg)
        return psum, pdot

    if need_stats:
        psum, pdot = elem(True, need_conv and not use_batch_stats)
        sdy, sdyx = psum.sum(0, dtype=torch.float64), pdot.sum(0, dtype=torch.float64)
        if need_dbnw:
            dbnw = sdyx.to(f32)
        if need_dbnb:
            dbnb = sdy.to(f32)
        if need_conv and use_batch_stats:
            # -mean(g) and -mean(g * xhat) over the M pixels, g = dy * bn_weight
            bw64 = bw.double()
            elem(False, True, (-(bw64 * sdy) / M).to(f32), (-(bw64 * sdyx) / M).to(f32))
    else:
        elem(False, True)

    if not need_conv:
        return dx, dw, db, dbnw, dbnb
    if need_dx:
        dx = torch.empty(x.shape, dtype=x.dtype, device=dev, memory_format=g.in_fmt)
        if not g.covers:
            dx.zero_()  # pixels that no patch reads
        cfg = gemm_config(M, g.kdim, C, x.dtype)
        launch(_dgrad, _grid2(M, g.kdim, cfg), dz, g.wmat, dx, M, g.ho, g.wo, g.cin, C, g.kdim,
               *_strides(dz), g.kdim, 1, *_strides(dx), IDX64=idx64, **g.gemm_meta(cfg))
    if need_dw:
        cfg = gemm_config(C, g.kdim, M, x.dtype)
        tiles_w = math.ceil(C / cfg["BLOCK_M"]) * math.ceil(g.kdim / cfg["BLOCK_N"])
        row_blocks = math.ceil(M / cfg["BLOCK_K"])
        splits = wgrad_splits(tiles_w, row_blocks, dev)
        per_split = math.ceil(row_blocks / splits) * cfg["BLOCK_K"]
        splits = math.ceil(M / per_split)
        pw = torch.empty(splits, C, g.kdim, dtype=f32, device=dev)
        launch(_wgrad, (splits * tiles_w,), dz, x, pw, M, g.ho, g.wo, g.cin, C, g.kdim,
               per_split, *_strides(dz), *_strides(x), IDX64=idx64, **g.gemm_meta(cfg))
        dw = g.weight_grad(pw.sum(0, dtype=torch.float64).to(weight.dtype), weight)
    if need_db:
        db = pdb.sum(0, dtype=torch.float64).to(weight.dtype)
    return dx, dw, db, dbnw, dbnb
