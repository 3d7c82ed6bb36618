"""Triton kernels of the residual depthwise block ``x + BN(act(dwconv_k(x) + b))``.

Tiling: a program owns ``BLOCK_P`` consecutive pixels (row-major over H x W, so a tile
may span rows) of one image times ``BLOCK_C`` channels. Every tensor is addressed
through its own (n, c, h, w) strides, so NCHW, channels_last and strided views are
read in place (Triton specialises unit strides, which gives coalesced access along
whichever axis is contiguous). The k x k taps are a run-time loop over kernel rows
with the columns unrolled; input rows are reused across taps from L1/L2. Offsets are
int64 when some tensor needs it (``IDX64``). Arithmetic is float32 whatever the
storage dtype: every load is upcast at once.

Kernels (``forward``/``backward`` below are the backend contract of
``convmixer_kernels.reference``):

- ``_fwd``: conv + bias, rounded to the storage dtype (the pre-activation), then
  - eval: act, BN affine with the running statistics, residual: the output, one pass;
  - train: act and per-tile (mean, M2) of the activation, the pre-activation stored.
  A deterministic Chan combination of the tile statistics (float64, in PyTorch) gives
  the batch mean and biased variance; ``_norm`` then applies act + BN + residual.
- ``_bwd_elem``: per-tile sums of dy and dy * xhat (the BatchNorm weight and bias
  gradients, and the batch-statistics terms of the input gradient), then
  dz = act'(z) * (dy * bn_weight - mean terms) * invstd in float32, with the
  per-tile sums of dz for the conv bias gradient; the pre-activation is read if it was
  saved and recomputed from x (a conv) if not.
- ``_dgrad``: dx = depthwise conv of dz with the flipped kernel + dy (the residual).
- ``_wgrad``: per-split partial sums of dz * shifted x for every tap.
All partial sums are reduced in a fixed order (no atomics): results are bitwise
reproducible run to run for a given shape and device.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...spec import output_memory_format
from ._common import (ACT_CODES, act_bwd, act_fwd, combine_tile_stats, interpreting, invstd,
                      launch, needs_int64, pow2)


# ---- device functions ---------------------------------------------------------------

@triton.jit
def _pixels(t, N, H, W, BLOCK_P: tl.constexpr, IDX64: tl.constexpr):
    """Pixels of tile ``t``: BLOCK_P consecutive positions of the flattened N x H x W
    (a tile may span rows and images) as (n, h, w) and their mask."""
    if IDX64:
        t = tl.cast(t, tl.int64)
    p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < N * H * W
    n = p // (H * W)
    r = p - n * (H * W)
    h = r // W
    w = r - h * W
    return n, h, w, pmask


@triton.jit
def _tile(N, C, H, W, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, IDX64: tl.constexpr):
    """This program's tile index, pixels (n, h, w) and channels, with their masks."""
    pid = tl.program_id(0)
    n_cb = tl.cdiv(C, BLOCK_C)
    cb = pid % n_cb
    t = pid // n_cb
    n, h, w, pmask = _pixels(t, N, H, W, BLOCK_P, IDX64)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if IDX64:
        c = c.to(tl.int64)
    return t, n, h, w, pmask, c, cmask


@triton.jit
def _offsets(n, c, h, w, sn, sc, sh, sw):
    return n[:, None] * sn + c[None, :] * sc + h[:, None] * sh + w[:, None] * sw


@triton.jit
def _conv(src_ptr, n, c, cmask, h, w, pmask, sn, sc, sh, sw, wt_ptr, C, H, W,
          K: tl.constexpr, DIR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """sum over taps (i, j) of src[h + DIR*(i - K//2), w + DIR*(j - K//2)] * wt[i*K + j, c]
    with zero padding, in float32. DIR=1: the forward conv; DIR=-1: its input gradient."""
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    base = src_ptr + n[:, None] * sn + c[None, :] * sc
    cm = cmask[None, :]
    for i in range(K):
        hh = h + DIR * (i - K // 2)
        hm = pmask & (hh >= 0) & (hh < H)
        row = base + (hh * sh)[:, None]
        if K <= 9:  # columns unrolled; beyond that the code (and spills) grow too much
            for j in tl.static_range(K):
                acc += _tap(row, hm, w, sw, cm, wt_ptr + (i * K + j) * C, c, cmask, W,
                            DIR * (j - K // 2))
        else:
            for j in range(K):
                acc += _tap(row, hm, w, sw, cm, wt_ptr + (i * K + j) * C, c, cmask, W,
                            DIR * (j - K // 2))
    return acc


@triton.jit
def _tap(row, hm, w, sw, cm, wt_tap_ptr, c, cmask, W, dj):
    """One tap's contribution: src[h + di, w + dj] * weight[tap] (zero outside the image)."""
    ww = w + dj
    m = (hm & (ww >= 0) & (ww < W))[:, None] & cm
    v = tl.load(row + (ww * sw)[:, None], mask=m, other=0.0).to(tl.float32)
    return v * tl.load(wt_tap_ptr + c, mask=cmask, other=0.0)[None, :]


@triton.jit
def _preact(x_ptr, n, c, cmask, h, w, pmask, sxn, sxc, sxh, sxw, wt_ptr, b_ptr, C, H, W,
            K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr,
            BLOCK_C: tl.constexpr):
    """conv(x) + bias, rounded to x's dtype (the stored pre-activation), as float32."""
    z = _conv(x_ptr, n, c, cmask, h, w, pmask, sxn, sxc, sxh, sxw, wt_ptr, C, H, W,
              K, 1, BLOCK_P, BLOCK_C)
    if HAS_BIAS:
        z += tl.load(b_ptr + c, mask=cmask, other=0.0)[None, :]
    return z.to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _bn(a, c, cmask, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps,
        HAS_BNW: tl.constexpr, HAS_BNB: tl.constexpr):
    """(a - mean) * invstd * bn_weight + bn_bias, in the reference's order."""
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    inv = invstd(tl.load(var_ptr + c, mask=cmask, other=1.0), eps)
    y = (a - mean[None, :]) * inv[None, :]
    if HAS_BNW:
        y = y * tl.load(bnw_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_BNB:
        y = y + tl.load(bnb_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _tile_stats(a, mask, pmask, c, cmask, t, C, pmean_ptr, pm2_ptr):
    """Per-channel mean and M2 (sum of squared deviations) of this tile's values."""
    cnt = tl.sum(pmask.to(tl.float32), axis=0)
    a = tl.where(mask, a, 0.0)
    mean = tl.sum(a, axis=0) / cnt
    d = tl.where(mask, a - mean[None, :], 0.0)
    tl.store(pmean_ptr + t * C + c, mean, mask=cmask)
    tl.store(pm2_ptr + t * C + c, tl.sum(d * d, axis=0), mask=cmask)


# ---- kernels ------------------------------------------------------------------------

@triton.jit
def _fwd(x_ptr, wt_ptr, b_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, out_ptr, z_ptr,
         pmean_ptr, pm2_ptr, N, C, H, W, eps,
         sxn, sxc, sxh, sxw, son, soc, soh, sow,
         K: tl.constexpr, ACT: tl.constexpr, TRAIN: tl.constexpr, STORE_Z: tl.constexpr,
         HAS_BIAS: tl.constexpr, HAS_BNW: tl.constexpr, HAS_BNB: tl.constexpr,
         IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    t, n, h, w, pmask, c, cmask = _tile(N, C, H, W, BLOCK_P, BLOCK_C, IDX64)
    mask = pmask[:, None] & cmask[None, :]
    z = _preact(x_ptr, n, c, cmask, h, w, pmask, sxn, sxc, sxh, sxw, wt_ptr, b_ptr, C, H, W,
                K, HAS_BIAS, BLOCK_P, BLOCK_C)
    o_off = _offsets(n, c, h, w, son, soc, soh, sow)
    if STORE_Z:
        tl.store(z_ptr + o_off, z.to(z_ptr.dtype.element_ty), mask=mask)
    a = act_fwd(z, ACT)
    if TRAIN:
        _tile_stats(a, mask, pmask, c, cmask, t, C, pmean_ptr, pm2_ptr)
    else:
        xv = tl.load(x_ptr + _offsets(n, c, h, w, sxn, sxc, sxh, sxw), mask=mask,
                     other=0.0).to(tl.float32)
        y = _bn(a, c, cmask, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps, HAS_BNW, HAS_BNB)
        tl.store(out_ptr + o_off, (xv + y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm(x_ptr, z_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, out_ptr, N, C, H, W, eps,
          sxn, sxc, sxh, sxw, son, soc, soh, sow,
          ACT: tl.constexpr, HAS_BNW: tl.constexpr, HAS_BNB: tl.constexpr,
          IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    t, n, h, w, pmask, c, cmask = _tile(N, C, H, W, BLOCK_P, BLOCK_C, IDX64)
    mask = pmask[:, None] & cmask[None, :]
    o_off = _offsets(n, c, h, w, son, soc, soh, sow)
    z = tl.load(z_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
    xv = tl.load(x_ptr + _offsets(n, c, h, w, sxn, sxc, sxh, sxw), mask=mask,
                 other=0.0).to(tl.float32)
    y = _bn(act_fwd(z, ACT), c, cmask, mean_ptr, var_ptr, bnw_ptr, bnb_ptr, eps,
            HAS_BNW, HAS_BNB)
    tl.store(out_ptr + o_off, (xv + y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_elem(dy_ptr, x_ptr, wt_ptr, b_ptr, z_ptr, mean_ptr, var_ptr, cg_ptr, c0_ptr, cx_ptr,
              dz_ptr, zout_ptr, psum_ptr, pdot_ptr, pdb_ptr, N, C, H, W, eps,
              sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, son, soc, soh, sow,
              K: tl.constexpr, ACT: tl.constexpr, RECOMPUTE: tl.constexpr,
              STORE_Z: tl.constexpr, STATS: tl.constexpr, DZ: tl.constexpr,
              HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
              IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    t, n, h, w, pmask, c, cmask = _tile(N, C, H, W, BLOCK_P, BLOCK_C, IDX64)
    mask = pmask[:, None] & cmask[None, :]
    o_off = _offsets(n, c, h, w, son, soc, soh, sow)
    if RECOMPUTE:
        z = _preact(x_ptr, n, c, cmask, h, w, pmask, sxn, sxc, sxh, sxw, wt_ptr, b_ptr,
                    C, H, W, K, HAS_BIAS, BLOCK_P, BLOCK_C)
        if STORE_Z:
            tl.store(zout_ptr + o_off, z.to(zout_ptr.dtype.element_ty), mask=mask)
    else:
        z = tl.load(z_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + _offsets(n, c, h, w, sgn, sgc, sgh, sgw), mask=mask,
                 other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=cmask, other=0.0)
    inv = invstd(tl.load(var_ptr + c, mask=cmask, other=1.0), eps)
    xhat = (act_fwd(z, ACT) - mean[None, :]) * inv[None, :]
    if STATS:
        tl.store(psum_ptr + t * C + c, tl.sum(dy, axis=0), mask=cmask)
        tl.store(pdot_ptr + t * C + c, tl.sum(tl.where(mask, dy * xhat, 0.0), axis=0),
                 mask=cmask)
    if DZ:
        cg = tl.load(cg_ptr + c, mask=cmask, other=0.0)
        c0 = tl.load(c0_ptr + c, mask=cmask, other=0.0)
        cx = tl.load(cx_ptr + c, mask=cmask, other=0.0)
        da = (dy * cg[None, :] + c0[None, :] + xhat * cx[None, :]) * inv[None, :]
        dz = tl.where(mask, act_bwd(z, da, ACT), 0.0)
        tl.store(dz_ptr + o_off, dz, mask=mask)
        if BIAS_GRAD:
            tl.store(pdb_ptr + t * C + c, tl.sum(dz, axis=0), mask=cmask)


@triton.jit
def _dgrad(dz_ptr, wt_ptr, dy_ptr, dx_ptr, N, C, H, W,
           son, soc, soh, sow, sgn, sgc, sgh, sgw,
           K: tl.constexpr, IDX64: tl.constexpr, BLOCK_P: tl.constexpr,
           BLOCK_C: tl.constexpr):
    t, n, h, w, pmask, c, cmask = _tile(N, C, H, W, BLOCK_P, BLOCK_C, IDX64)
    mask = pmask[:, None] & cmask[None, :]
    acc = _conv(dz_ptr, n, c, cmask, h, w, pmask, son, soc, soh, sow, wt_ptr, C, H, W,
                K, -1, BLOCK_P, BLOCK_C)
    dy = tl.load(dy_ptr + _offsets(n, c, h, w, sgn, sgc, sgh, sgw), mask=mask,
                 other=0.0).to(tl.float32)
    o_off = _offsets(n, c, h, w, son, soc, soh, sow)
    tl.store(dx_ptr + o_off, (acc + dy).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _wgrad(dz_ptr, x_ptr, pw_ptr, N, C, H, W, TILES, TILES_PER_SPLIT,
           son, soc, soh, sow, sxn, sxc, sxh, sxw,
           K: tl.constexpr, IDX64: tl.constexpr, BLOCK_T: tl.constexpr,
           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """pw[split, tap, c] = sum over this split's tiles of dz[p, c] * x[p + offset(tap), c]."""
    pid = tl.program_id(0)
    n_cb = tl.cdiv(C, BLOCK_C)
    cb = pid % n_cb
    split = pid // n_cb
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if IDX64:
        c = c.to(tl.int64)
    lo = split * TILES_PER_SPLIT
    hi = tl.minimum(lo + TILES_PER_SPLIT, TILES)
    for t0 in range(0, K * K, BLOCK_T):
        taps = t0 + tl.arange(0, BLOCK_T)
        tmask = taps < K * K
        di = taps // K - K // 2
        dj = taps % K - K // 2
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for t in range(lo, hi):
            n, h, w, pmask = _pixels(t, N, H, W, BLOCK_P, IDX64)
            mask = pmask[:, None] & cmask[None, :]
            dz = tl.load(dz_ptr + _offsets(n, c, h, w, son, soc, soh, sow), mask=mask,
                         other=0.0)
            hh = h[None, :, None] + di[:, None, None]
            ww = w[None, :, None] + dj[:, None, None]
            m = ((hh >= 0) & (hh < H) & (ww >= 0) & (ww < W) & tmask[:, None, None]
                 & mask[None, :, :])
            xv = tl.load(x_ptr + (n * sxn)[None, :, None] + c[None, None, :] * sxc
                         + hh * sxh + ww * sxw, mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(xv * dz[None, :, :], axis=1)
        dst = pw_ptr + (split * K * K + taps[:, None]) * C + c[None, :]
        tl.store(dst, acc, mask=tmask[:, None] & cmask[None, :])


# ---- launch configuration -----------------------------------------------------------

def elementwise_config(C: int, P: int) -> dict:
    """Tile of the pixel x channel kernels for P = N*H*W pixels. The interpreter (CPU
    tests) costs per program and per operation, not per element: there a program
    takes as many pixels as it can."""
    if interpreting():
        bp = min(pow2(P), 1024)
        return dict(BLOCK_P=bp, BLOCK_C=min(pow2(C), max(1, 65536 // bp)), num_warps=4)
    # 64 x 32 with 8 warps: no register spills at k <= 9 on sm_80/sm_90 (4 warps spill);
    # see python -m convmixer_kernels.tools.triton_variants for the resource report.
    return dict(BLOCK_P=64, BLOCK_C=min(32, pow2(C)), num_warps=8)


def wgrad_config(C: int, P: int, K: int, device: torch.device) -> dict:
    if interpreting():
        bt = min(pow2(K * K), 32)
        bp = min(pow2(P), 256)
        bc = min(pow2(C), max(1, 262144 // (bt * bp)))
        return dict(BLOCK_T=bt, BLOCK_P=bp, BLOCK_C=bc, num_warps=4, programs=1)
    sms = 132
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    return dict(BLOCK_T=16, BLOCK_P=16, BLOCK_C=min(32, pow2(C)), num_warps=4,
                programs=4 * sms)


def _grid(P: int, C: int, cfg: dict) -> tuple[int]:
    return (math.ceil(P / cfg["BLOCK_P"]) * math.ceil(C / cfg["BLOCK_C"]),)


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def _wt(weight: Tensor) -> Tensor:
    """(C, 1, k, k) -> (k*k, C) float32: one tap's weights are contiguous over channels."""
    c, k = weight.shape[0], weight.shape[-1]
    return weight.detach().reshape(c, k * k).t().to(torch.float32).contiguous()


def _vec(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().contiguous()


# ---- the backend contract -----------------------------------------------------------

def forward(x: Tensor, weight: Tensor, bias, bn_weight, bn_bias, running_mean, running_var,
            use_batch_stats: bool, eps: float, activation: str, save_preact: bool):
    N, C, H, W = x.shape
    K, HW = weight.shape[-1], H * W
    fmt = output_memory_format(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    keep_z = use_batch_stats or save_preact
    z = torch.empty_like(out) if keep_z else None
    P = N * HW
    cfg = elementwise_config(C, P)
    meta = dict(BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    idx64 = needs_int64(x, out) or P >= 2 ** 31 - 1
    grid = _grid(P, C, cfg)
    wt, b, bnw, bnb = _wt(weight), _vec(bias), _vec(bn_weight), _vec(bn_bias)
    act = ACT_CODES[activation]
    flags = dict(HAS_BNW=bnw is not None, HAS_BNB=bnb is not None, IDX64=idx64)
    if use_batch_stats:
        tiles = math.ceil(P / cfg["BLOCK_P"])
        pmean = torch.empty(tiles, C, dtype=torch.float32, device=x.device)
        pm2 = torch.empty_like(pmean)
        launch(_fwd, grid, x, wt, b, None, None, bnw, bnb, out, z, pmean, pm2, N, C, H, W, eps,
               *_strides(x), *_strides(out), K=K, ACT=act, TRAIN=True, STORE_Z=True,
               HAS_BIAS=b is not None, **flags, **meta)
        mean, var = combine_tile_stats(pmean, pm2, P, cfg["BLOCK_P"])
        launch(_norm, grid, x, z, mean, var, bnw, bnb, out, N, C, H, W, eps,
               *_strides(x), *_strides(out), ACT=act, **flags, **meta)
    else:
        mean = running_mean.detach().to(torch.float32).clone()
        var = running_var.detach().to(torch.float32).clone()
        launch(_fwd, grid, x, wt, b, mean, var, bnw, bnb, out, z, None, None, N, C, H, W, eps,
               *_strides(x), *_strides(out), K=K, ACT=act, TRAIN=False, STORE_Z=keep_z,
               HAS_BIAS=b is not None, **flags, **meta)
    preact = z if save_preact else x.new_empty(0)
    return out, mean, var, preact


def backward(grad_out: Tensor, x: Tensor, weight: Tensor, bias, bn_weight, mean: Tensor,
             var: Tensor, preact: Tensor, use_batch_stats: bool, eps: float, activation: str,
             output_mask):
    need_dx, need_dw, need_db, need_dbnw, need_dbnb = (bool(m) for m in output_mask)
    N, C, H, W = x.shape
    K, HW = weight.shape[-1], H * W
    dev, f32 = x.device, torch.float32
    fmt = output_memory_format(x)
    P = N * HW
    cfg = elementwise_config(C, P)
    meta = dict(BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    grid = _grid(P, C, cfg)
    tiles = math.ceil(P / cfg["BLOCK_P"])
    act = ACT_CODES[activation]
    wt, b = _wt(weight), _vec(bias)
    mean32, var32 = mean.to(f32).contiguous(), var.to(f32).contiguous()
    like_out = dict(dtype=x.dtype, device=dev, memory_format=fmt)
    recompute = preact.numel() == 0
    z = None if recompute else preact.contiguous(memory_format=fmt)
    # z, dz and dx share the output layout, hence one set of strides.
    ostr = torch.empty(x.shape, device="meta", memory_format=fmt).stride()
    idx64 = needs_int64(x, grad_out, z) or P >= 2 ** 31 - 1
    need_conv = need_dx or need_dw or need_db
    need_stats = need_dbnw or need_dbnb or (use_batch_stats and need_conv)

    # dz = act'(z) * (dy * cg + c0 + xhat * cx) * invstd: cg = bn_weight, and in training
    # c0, cx = -(means of g = dy * bn_weight and of g * xhat), as the reference's order.
    cg = bn_weight.detach().to(f32).contiguous() if bn_weight is not None else torch.ones(C, dtype=f32, device=dev)
    zeros = torch.zeros(C, dtype=f32, device=dev)
    dz = torch.empty(x.shape, dtype=f32, device=dev, memory_format=fmt) if need_conv else None
    pdb = torch.empty(tiles, C, dtype=f32, device=dev) if need_db else None

    def elem(stats: bool, dz_pass: bool, c0: Tensor, cx: Tensor, zsrc, store_z):
        psum = torch.empty(tiles, C, dtype=f32, device=dev) if stats else None
        pdot = torch.empty_like(psum) if stats else None
        launch(_bwd_elem, grid, grad_out, x, wt, b, zsrc, mean32, var32, cg, c0, cx,
               dz if dz_pass else None, store_z, psum, pdot, pdb if dz_pass else None,
               N, C, H, W, eps, *_strides(grad_out), *_strides(x), *ostr,
               K=K if zsrc is None else 1, ACT=act, RECOMPUTE=zsrc is None, STORE_Z=store_z is not None, STATS=stats,
               DZ=dz_pass, HAS_BIAS=b is not None, BIAS_GRAD=dz_pass and need_db,
               IDX64=idx64, **meta)
        return psum, pdot

    # masked-out results are fresh empty tensors (outputs of an op must not alias)
    dbnw, dbnb = x.new_empty(0, dtype=f32), x.new_empty(0, dtype=f32)
    if need_stats:
        fused_dz = need_conv and not use_batch_stats
        z_tmp = (torch.empty(x.shape, **like_out)
                 if recompute and need_conv and use_batch_stats else None)
        psum, pdot = elem(True, fused_dz, zeros, zeros, z, z_tmp)
        sdy, sdyx = psum.sum(0, dtype=torch.float64), pdot.sum(0, dtype=torch.float64)
        if need_dbnw:
            dbnw = sdyx.to(f32)
        if need_dbnb:
            dbnb = sdy.to(f32)
        if z_tmp is not None:
            z = z_tmp
        if need_conv and use_batch_stats:
            m = float(P)
            c0 = (-(cg.double() * sdy / m)).to(f32)
            cx = (-(cg.double() * sdyx / m)).to(f32)
            elem(False, True, c0, cx, z, None)
    elif need_conv:
        elem(False, True, zeros, zeros, z, None)

    if not need_conv:
        return x.new_empty(0), x.new_empty(0), x.new_empty(0), dbnw, dbnb
    dx, dw, db = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_dx:
        dx = torch.empty(x.shape, **like_out)
        launch(_dgrad, grid, dz, wt, grad_out, dx, N, C, H, W,
               *_strides(dz), *_strides(grad_out), K=K, IDX64=idx64, **meta)
    if need_dw:
        wcfg = wgrad_config(C, P, K, dev)
        wtiles = math.ceil(P / wcfg["BLOCK_P"])
        splits = max(1, min(wtiles, wcfg["programs"] // math.ceil(C / wcfg["BLOCK_C"])))
        per_split = math.ceil(wtiles / splits)
        splits = math.ceil(wtiles / per_split)
        pw = torch.empty(splits, K * K, C, dtype=f32, device=dev)
        launch(_wgrad, (splits * math.ceil(C / wcfg["BLOCK_C"]),), dz, x, pw, N, C, H, W,
               wtiles, per_split, *_strides(dz), *_strides(x), K=K, IDX64=idx64,
               BLOCK_T=wcfg["BLOCK_T"], BLOCK_P=wcfg["BLOCK_P"], BLOCK_C=wcfg["BLOCK_C"],
               num_warps=wcfg["num_warps"])
        dw = pw.sum(0, dtype=torch.float64).t().reshape(weight.shape).to(weight.dtype)
    if need_db:
        db = pdb.sum(0, dtype=torch.float64).to(weight.dtype)
    return dx, dw.contiguous() if need_dw else dw, db, dbnw, dbnb
