"""The index arithmetic of the generic v2 NCHW kernels (csrc/cuda/dw_block_v2_generic.cuh and
dw_block_v2_generic_backward.cuh), re-derived in PyTorch on the CPU: the window staging (rows of
pitch KP + 48, column s at WO + s, whole 8-column units written with lanes over (row, unit)
pairs), the taps (per window row, groups of 4 kernel columns read at 16-byte aligned window
columns, then the k % 4 tail group; kernel row i = wr - r), the flipped kernel of the dgrad and
the flipped tap accumulators of the wgrad, over tiles of 32 x 32 along rows and columns; and
the backward's dz scratch: gen_dz_kernel's (group, channel) warps and (row, unit) lanes writing
every element of the (N, C, H, wp) float32 scratch exactly once (dy and z read through strided
views, the padding columns W .. wp - 1 zero, the per-group sums), and gen_bwd_kernel's staging
of the dz window from it (whole units, aligned 16-byte loads, only written elements read).

This does not run the CUDA code (no GPU here): it checks that the formulas the kernels use give
the convolution, its input gradient and its weight gradient (against torch in float64), that no
staged write leaves its window row, that every window read the taps use was staged, and that
the 16-byte loads are aligned. The constants below must match the kernel headers (TR, TC, R, WO,
the pitch); tests/test_cuda_dw_block_v2.py runs the kernels themselves on a GPU.
"""
from __future__ import annotations

import pytest
import torch

TR = TC = 32  # tile rows and columns
R = 4         # rows per lane
WO = 8        # window row's column 0


def geo(k):
    kp = (k + 3) & ~3
    return dict(k=k, kp=kp, pad=k // 2, sh=TR + k - 1, pitch=kp + 48)


def stage(plane, g, h0, w0):
    """stage_x / stage_dz_g: the warp's window of tile (h0, w0), NaN where nothing was staged."""
    H, W = plane.shape
    k, pad, sh, pitch = g["k"], g["pad"], g["sh"], g["pitch"]
    ws = torch.full((sh * pitch,), float("nan"), dtype=torch.float64)
    lead = (pad + 7) & ~7
    uc = (TC + 2 * lead) // 8
    rows_it = 32 // uc
    for lane in range(32):
        ro, u = divmod(lane, uc)
        gc = w0 - lead + u * 8
        s0 = gc - (w0 - pad)
        assert -7 <= s0 and s0 + 7 <= TC + k + 6
        cols = torch.arange(gc, gc + 8)
        cin = (cols >= 0) & (cols < W)
        rr = ro if ro < rows_it else sh
        while rr < sh:
            h = h0 - pad + rr
            val = torch.zeros(8, dtype=torch.float64)
            if 0 <= h < H:
                val[cin] = plane[h, cols[cin]]
            idx = rr * pitch + WO + s0 + torch.arange(8)
            assert idx.min() >= rr * pitch and idx.max() < (rr + 1) * pitch, "a staged write leaves its row"
            ws[idx] = val
            rr += rows_it
    return ws


def weights(wk, g, flip):
    """stage_weights: w[i][j] (flipped: w[k-1-i][k-1-j]) at i * KP + j, zero padding columns."""
    k, kp = g["k"], g["kp"]
    w = torch.flip(wk, (0, 1)) if flip else wk
    out = torch.zeros(k, kp, dtype=torch.float64)
    out[:, :k] = w
    return out.reshape(-1)


def groups(k):
    kfull = k & ~3
    return [(j0, 4) for j0 in range(0, kfull, 4)] + [(kfull, 3 if (k & 3) == 3 else 1)]


LANES = torch.arange(32)
RG, Q = LANES >> 2, LANES & 3
CC = torch.arange(8)


def taps(wsw, ws, g):
    """taps / tap_group: acc[lane][r][cc]."""
    k, kp, pitch = g["k"], g["kp"], g["pitch"]
    acc = torch.zeros(32, R, 8, dtype=torch.float64)
    srow = (RG * R) * pitch + WO + Q * 8
    for wr in range(R + k - 1):
        s = srow + wr * pitch
        for j0, nt in groups(k):
            assert bool(((s + j0) % 4 == 0).all()), "misaligned 16-byte window load"
            for r in range(R):
                i = wr - r
                if i < 0 or i >= k:
                    continue
                assert (i * kp + j0) % 4 == 0
                for jj in range(nt):
                    v = ws[(s + j0 + jj)[:, None] + CC[None, :]]
                    assert not torch.isnan(v).any(), "a tap reads an unstaged window column"
                    acc[:, r, :] += v * wsw[i * kp + j0 + jj]
    return acc


def scatter(acc, out, h0, w0):
    H, W = out.shape
    for r in range(R):
        hr = h0 + RG * R + r
        wc = w0 + Q[:, None] * 8 + CC[None, :]
        ok = (hr[:, None] < H) & (wc < W)
        out[hr[:, None].expand(-1, 8)[ok], wc[ok]] = acc[:, r, :][ok]


def conv(x, wt, flip=False):
    """gen_eval_kernel's conv (flip: gen_bwd_kernel's dgrad with the flipped kernel)."""
    N, C, H, W = x.shape
    g = geo(wt.shape[-1])
    out = torch.zeros_like(x)
    for n in range(N):
        for c in range(C):
            wsw = weights(wt[c, 0], g, flip)
            for h0 in range(0, H, TR):
                for w0 in range(0, W, TC):
                    ws = stage(x[n, c], g, h0, w0)
                    scatter(taps(wsw, ws, g), out[n, c], h0, w0)
                    # the residual the eval epilogue reads from the window is x itself
                    for r in range(R):
                        hr = h0 + RG * R + r
                        wc = w0 + Q[:, None] * 8 + CC[None, :]
                        ok = (hr[:, None] < H) & (wc < W)
                        row = (RG * R + r + g["pad"])[:, None] * g["pitch"]
                        sx = row + WO + Q[:, None] * 8 + g["pad"] + CC
                        assert torch.equal(ws[sx][ok], x[n, c][hr[:, None].expand(-1, 8)[ok], wc[ok]])
    return out


def wgrad(x, dz, k):
    """gen_bwd_kernel's wgrad: own x (zero outside the image) times the staged dz window,
    accumulator (i', j') = the gradient of w[k-1-i'][k-1-j']."""
    N, C, H, W = x.shape
    g = geo(k)
    kp, pitch = g["kp"], g["pitch"]
    dw = torch.zeros(C, k, k, dtype=torch.float64)
    srow = (RG * R) * pitch + WO + Q * 8
    for n in range(N):
        for c in range(C):
            wacc = torch.zeros(k * kp, dtype=torch.float64)
            for h0 in range(0, H, TR):
                for w0 in range(0, W, TC):
                    ws = stage(dz[n, c], g, h0, w0)
                    xs = torch.zeros(32, R, 8, dtype=torch.float64)
                    for r in range(R):
                        hr = h0 + RG * R + r
                        wc = w0 + Q[:, None] * 8 + CC[None, :]
                        ok = (hr[:, None] < H) & (wc < W)
                        xs[:, r, :][ok] = x[n, c][hr[:, None].expand(-1, 8)[ok], wc[ok]]
                    for i in range(k):
                        for j0, nt in groups(k):
                            for jj in range(nt):
                                tot = 0.0
                                for r in range(R):
                                    v = ws[(srow + (r + i) * pitch + j0 + jj)[:, None] + CC[None, :]]
                                    assert not torch.isnan(v).any()
                                    tot += float((xs[:, r, :] * v).sum())
                                wacc[i * kp + j0 + jj] += tot
            for i in range(k):
                for j in range(k):
                    dw[c, i, j] = wacc[(k - 1 - i) * kp + (k - 1 - j)]
    return dw


# k wider than the plane; two column tiles with W % 8 != 0; two row tiles with a 3-wide plane;
# the kernel sizes whose k % 4 tail is 3 (11, 15) and 1 (13, 5)
CASES = [((1, 2, 7, 5), 15), ((1, 1, 36, 33), 11), ((1, 1, 34, 3), 13), ((1, 1, 9, 40), 5)]


@pytest.mark.parametrize("shape,k", CASES, ids=str)
def test_generic_kernel_index_math(shape, k):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    wt = torch.randn(shape[1], 1, k, k, dtype=torch.float64)
    dz = torch.randn(shape, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(True), wt.clone().requires_grad_(True)
    y = torch.nn.functional.conv2d(xr, wr, padding=k // 2, groups=shape[1])
    y.backward(dz)
    got = conv(x, wt)
    err = (got - y.detach()).abs().max().item()
    dx = conv(dz, wt, flip=True)
    dx_err = (dx - xr.grad).abs().max().item()
    dw_err = (wgrad(x, dz, k) - wr.grad[:, 0]).abs().max().item()
    print(f"conv {err:.2e} dgrad {dx_err:.2e} wgrad {dw_err:.2e}")
    assert err < 1e-10 and dx_err < 1e-10 and dw_err < 1e-10


# ---- the backward's dz scratch (gen_dz_kernel writes it, gen_bwd_kernel stages from it) ------

def flat(t):
    """The storage of a view as a flat tensor, and the view's offset and strides (the kernels'
    data pointer and View)."""
    return t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0), t.storage_offset(), t.stride()


def dz_of_stub(dy, z):
    """Stands for v2b::dz_of: any elementwise function that is not 0 at dy = z = 0 (as dz_of in
    training is not), so a padding column that is not zeroed shows in the gradients."""
    return dy * z + 0.25 * z - dy + 1.0


def dz_pass(dy, z, group):
    """gen_dz_kernel: one warp per (group, channel), lanes over (row, 8-column unit) pairs, row
    offsets advanced by rows_it rows per step; dz of every element into the (N, C, H, wp) float32
    scratch (columns W .. wp - 1 zero: the select of the row's last unit) and the group's sum of
    dz. Returns the flat scratch, the per-element write counts and psum."""
    N, C, H, W = dy.shape
    wp = (W + 7) // 8 * 8
    scratch = torch.full((N * C * H * wp,), float("nan"), dtype=torch.float64)
    writes = torch.zeros(N * C * H * wp, dtype=torch.int64)
    groups = (N + group - 1) // group
    psum = torch.zeros(groups, C, dtype=torch.float64)
    upr = (W + 7) // 8
    rows_it = 32 // upr if upr <= 32 else 1
    (fdy, ody, (dsn, dsc, dsh, dsw)), (fz, oz, (zsn, zsc, zsh, zsw)) = flat(dy), flat(z)
    for item in range(groups * C):
        grp, c = divmod(item, C)
        n0, n1 = grp * group, min(grp * group + group, N)
        sdz = torch.zeros(32, dtype=torch.float64)
        for lane in range(32):
            ro, u0 = divmod(lane, upr) if upr <= 32 else (0, lane)
            h_first = ro if ro < rows_it else H
            for n in range(n0, n1):
                dyr = ody + n * dsn + c * dsc + h_first * dsh
                zr = oz + n * zsn + c * zsc + h_first * zsh
                dzo = ((n * C + c) * H + h_first) * wp
                h = h_first
                while h < H:
                    w0 = u0 * 8
                    while w0 < W:
                        cols = torch.arange(w0, w0 + 8)
                        cin = cols < W  # load_row8 (and load8 of a full unit): zeros past W
                        dyv = torch.zeros(8, dtype=torch.float64)
                        zv = torch.zeros(8, dtype=torch.float64)
                        dyv[cin] = fdy[dyr + cols[cin] * dsw]
                        zv[cin] = fz[zr + cols[cin] * zsw]
                        d = dz_of_stub(dyv, zv)
                        if w0 + 8 > W:  # not full: the select
                            d = torch.where(cin, d, torch.zeros(8, dtype=torch.float64))
                        sdz[lane] += d.sum()
                        off = dzo + w0
                        assert off % 8 == 0 and off + 8 <= ((n * C + c) * H + h + 1) * wp, \
                            "a 16-byte store misaligned or leaving its row"
                        scratch[off:off + 8] = d
                        writes[off:off + 8] += 1
                        w0 += 256
                    h += rows_it
                    dyr += rows_it * dsh
                    zr += rows_it * zsh
                    dzo += rows_it * wp
        psum[grp, c] = sdz.sum()
    return scratch, writes, psum


def stage_dzb(scratch, n, c, C, H, W, g, h0, w0):
    """gen_bwd_kernel's stage_dzb: the window of tile (h0, w0) of plane (n, c) from the scratch,
    units wholly inside 0 .. wp - 1 (two 16-byte loads) or zero; NaN where nothing was staged."""
    k, pad, sh, pitch = g["k"], g["pad"], g["sh"], g["pitch"]
    wp = (W + 7) // 8 * 8
    dzp = (n * C + c) * H * wp
    ws = torch.full((sh * pitch,), float("nan"), dtype=torch.float64)
    lead = (pad + 7) & ~7
    uc = (TC + 2 * lead) // 8
    rows_it = 32 // uc
    for lane in range(32):
        ro, u = divmod(lane, uc)
        gc = w0 - lead + u * 8
        cin = 0 <= gc < wp
        s0 = gc - (w0 - pad)
        rr = ro if ro < rows_it else sh
        while rr < sh:
            h = h0 - pad + rr
            val = torch.zeros(8, dtype=torch.float64)
            if cin and 0 <= h < H:
                src = dzp + h * wp + gc
                assert src % 4 == 0 and gc + 8 <= wp, "misaligned or out-of-row 16-byte dz load"
                val = scratch[src:src + 8]
                assert not torch.isnan(val).any(), "the staging reads a scratch element never written"
            idx = rr * pitch + WO + s0 + torch.arange(8)
            assert idx.min() >= rr * pitch and idx.max() < (rr + 1) * pitch, "a staged write leaves its row"
            ws[idx] = val
            rr += rows_it
    return ws


def strided(t, kind):
    """t's values in a strided view (as tests/test_cuda_dw_block_v2.py's strided_view)."""
    n, c, h, w = t.shape
    if kind == "contiguous":
        return t.clone()
    if kind == "w_step2":
        v = torch.randn(n, c, h, 2 * w, dtype=t.dtype)[..., ::2]
    elif kind == "channel_slice":
        v = torch.randn(n, 2 * c + 1, h, w, dtype=t.dtype)[:, 1::2]
    elif kind == "transposed":
        v = torch.randn(n, c, w, h, dtype=t.dtype).transpose(2, 3)
    elif kind == "channels_last":
        v = torch.randn(n, c, h, w, dtype=t.dtype).contiguous(memory_format=torch.channels_last)
    else:
        raise ValueError(kind)
    v.copy_(t)
    return v


# (shape, k, images per group, views of dy and z): W % 8 != 0 (padding columns), W > 256 (one
# row per lane step), a partial last group, k wider than the plane, strided views (dy and z
# of different kinds: each read through its own strides)
DZ_CASES = [((3, 2, 9, 13), 5, 2, ("contiguous", "w_step2")), ((2, 3, 7, 5), 15, 1, ("w_step2", "transposed")),
            ((1, 2, 34, 37), 11, 1, ("transposed", "contiguous")), ((3, 1, 3, 263), 3, 3, ("channel_slice", "w_step2")),
            ((2, 3, 5, 40), 7, 2, ("channels_last", "channel_slice"))]


@pytest.mark.parametrize("shape,k,group,kinds", DZ_CASES, ids=str)
def test_generic_dz_scratch(shape, k, group, kinds):
    torch.manual_seed(1)
    N, C, H, W = shape
    dy = torch.randn(shape, dtype=torch.float64)
    z = torch.randn(shape, dtype=torch.float64)
    scratch, writes, psum = dz_pass(strided(dy, kinds[0]), strided(z, kinds[1]), group)
    wp = (W + 7) // 8 * 8
    assert bool((writes == 1).all()), "a scratch element written never or more than once"
    s4 = scratch.view(N, C, H, wp)
    dz = dz_of_stub(dy, z)
    assert torch.equal(s4[..., :W], dz) and bool((s4[..., W:] == 0).all())
    groups = (N + group - 1) // group
    want = torch.stack([dz[g * group:(g + 1) * group].sum((0, 2, 3)) for g in range(groups)])
    assert (psum - want).abs().max().item() < 1e-9
    # the backward's staging from the scratch: the same window as staging the dz plane itself,
    # and the dgrad and wgrad from it against torch
    g = geo(k)
    x = torch.randn(shape, dtype=torch.float64)
    wt = torch.randn(C, 1, k, k, dtype=torch.float64)
    dx = torch.zeros_like(x)
    dw = torch.zeros(C, k, k, dtype=torch.float64)
    kp, pitch = g["kp"], g["pitch"]
    srow = (RG * R) * pitch + WO + Q * 8
    for c in range(C):
        wsw = weights(wt[c, 0], g, True)
        wacc = torch.zeros(k * kp, dtype=torch.float64)
        for n in range(N):
            for h0 in range(0, H, TR):
                for w0 in range(0, W, TC):
                    ws = stage_dzb(scratch, n, c, C, H, W, g, h0, w0)
                    ref = stage(dz[n, c], g, h0, w0)
                    assert torch.equal(torch.isnan(ws), torch.isnan(ref))
                    assert torch.equal(ws[~torch.isnan(ws)], ref[~torch.isnan(ref)])
                    scatter(taps(wsw, ws, g), dx[n, c], h0, w0)
                    xs = torch.zeros(32, R, 8, dtype=torch.float64)
                    for r in range(R):
                        hr = h0 + RG * R + r
                        wc = w0 + Q[:, None] * 8 + CC[None, :]
                        ok = (hr[:, None] < H) & (wc < W)
                        xs[:, r, :][ok] = x[n, c][hr[:, None].expand(-1, 8)[ok], wc[ok]]
                    for i in range(k):
                        for j in range(k):
                            v = torch.stack([ws[(srow + (r + i) * pitch + j)[:, None] + CC[None, :]]
                                             for r in range(R)], 1)
                            wacc[i * kp + j] += float((xs * v).sum())
        for i in range(k):
            for j in range(k):
                dw[c, i, j] = wacc[(k - 1 - i) * kp + (k - 1 - j)]
    xr, wr = x.clone().requires_grad_(True), wt.clone().requires_grad_(True)
    torch.nn.functional.conv2d(xr, wr, padding=k // 2, groups=C).backward(dz)
    assert (dx - xr.grad).abs().max().item() < 1e-10
    assert (dw - wr.grad[:, 0]).abs().max().item() < 1e-10
