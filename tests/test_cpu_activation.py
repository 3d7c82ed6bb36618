"""Accuracy and special values of the vectorised CPU activations (csrc/cpu/activation.cpp).

Through the test op ``convmixer_kernels::_cpu_activation(z, activation) -> (a, d)``:
a = act(z) and d = act'(z) from ``act_forward_deriv`` (the op also checks that
``act_forward`` gives the same ``a`` bit for bit, out of place and in place).

The oracle is float64: for ``gelu`` Phi(z) = erfc(-z / sqrt 2) / 2 (torch's float64 GELU,
0.5 z (1 + erf(z / sqrt 2)), cancels below z ~ -5, so it is only used as a cross-check
where it is accurate), for ``gelu_tanh`` z sigmoid(2 u) with u = sqrt(2/pi) (z + 0.044715 z^3),
the same function as torch's 0.5 z (1 + tanh(u)) without its cancellation.

Errors are in float32 ulps:
  * activation: |a - a_ref| / ulp(a_ref) (ulp of a subnormal: 2^-149);
  * derivative: |d - d_ref| / ulp(max(|d_ref|, |T1|, |T2|)) where d = T1 + T2 is the sum of
    the two terms (Phi and z phi for gelu). The derivatives have a zero near z = -0.75; no
    float32 evaluation of a sum is relatively accurate there, so the error is measured
    against the size of the terms (the pure relative error is printed too).
torch's own float32 CPU results are measured the same way. The bar for ``gelu`` is torch's
own float32 GELU on this machine (docs/design.md, "CPU GELU"): over a sample of the whole
float32 range, ours must have max ulp and max absolute errors (a and d) no larger than
torch's, overall and in each region (the negative tail z <= -3, where torch's
1 + erf(z / sqrt 2) cancels; -3 < z < 0; z >= 0). The bounds are torch's errors measured
at run time, not fixed numbers. ``gelu_tanh`` keeps fixed bounds (A_BOUND_ULP, D_BOUND_ULP).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from convmixer_kernels import _cpp_lib

_REASON = _cpp_lib.testing_status()
if _REASON is not None:
    pytest.skip(f"compiled extension unavailable: {_REASON}", allow_module_level=True)
_cpp_lib.load_testing()

ACTS = ("gelu", "gelu_tanh", "relu")
# gelu_tanh's bounds (the exhaustive check over every float32 with |z| <= 16, done when the
# kernel was written, measured at most 0.77 ulp for a and 1.81 ulp for d).
A_BOUND_ULP = 1.5
D_BOUND_ULP = 2.5
# gelu: the negative tail, where torch's float32 GELU cancels; above 2^127 torch's float32
# GELU overflows (its z (1 + erf) product gives inf), so the comparison stops there (ours
# is checked there on its own: a = z, d = 1 exactly).
TAIL = -3.0
TORCH_OVERFLOW = 2.0**127

FMAX = torch.finfo(torch.float32).max
FTINY = torch.finfo(torch.float32).tiny  # smallest normal
SPECIAL = [0.0, -0.0, 1e-45, -1e-45, 3e-44, -3e-44, 1e-40, -1e-40, FTINY, -FTINY, 1e-30, -1e-30,
           1e-8, -1e-8, 0.5, -0.5, 0.75, -0.75, 1.0, -1.0, 1.25, -1.25, 2.0, -2.0, 12.0, -12.0,
           16.0, -16.0, 20.0, -20.0, 1e5, -1e5, 1e20, -1e20, 1e30, -1e30, FMAX, -FMAX,
           math.inf, -math.inf, math.nan]


def run(z: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.convmixer_kernels._cpu_activation(z, activation)


def f32_window(center: float, count: int) -> torch.Tensor:
    """`count` consecutive float32 values on each side of `center`."""
    c = torch.tensor([center], dtype=torch.float32).view(torch.int32).item()
    if center < 0:  # bit patterns of negative floats grow with the magnitude
        bits = torch.arange(c - count, c + count, dtype=torch.int64)
    else:
        bits = torch.arange(max(c - count, 0), c + count, dtype=torch.int64)
    return bits.to(torch.int32).view(torch.float32)


def sweep() -> torch.Tensor:
    """About 3.7 million float32 inputs: every 4099th float32 bit pattern (the whole range,
    every binade of both signs, about 4,000 per binade), a dense grid over [-16, 16] (every
    result that is not 0 or z itself lies in there), log-spaced magnitudes down to the
    subnormals, every float around the branch points of the implementations, the zero of
    the derivative near -0.75, the start of the tail and the underflow edges."""
    bits = torch.arange(0, 2**32, 4099, dtype=torch.int64)
    parts = [
        torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32),
        torch.linspace(-16.0, 16.0, 2_000_001, dtype=torch.float64).float(),
        torch.logspace(-45.0, math.log10(16.0), 100_000, dtype=torch.float64).float(),
        -torch.logspace(-45.0, math.log10(16.0), 100_000, dtype=torch.float64).float(),
    ]
    for c in (1.0, -1.0, 1.25, -1.25, 0.75, -0.75, 0.7518, -0.7518, 3.0, -3.0, 4.0, -4.0,
              12.0, -12.0, 13.0, -13.0, 16.0, -16.0, -10.5, -14.3, 1e-3, -1e-3):
        parts.append(f32_window(c, 20_000))
    z = torch.cat(parts + [torch.tensor(SPECIAL, dtype=torch.float32)])
    return z


def ulp32(x: torch.Tensor) -> torch.Tensor:
    """float32 ulp at |x| (x float64): 2^(e - 24) for |x| in [2^(e-1), 2^e), 2^-149 below."""
    ax = x.abs()
    _, e = torch.frexp(ax)
    u = torch.pow(2.0, (e.double() - 24.0).clamp(min=-149.0))
    return torch.where(ax < 2.0**-126, torch.full_like(ax, 2.0**-149), u)


def oracle(z32: torch.Tensor, activation: str):
    """float64 (a, d, T1, T2) with d = T1 + T2."""
    z = z32.double()
    if activation == "gelu":
        cdf = 0.5 * torch.special.erfc(-z / math.sqrt(2.0))
        zpdf = z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return z * cdf, cdf + zpdf, cdf, zpdf
    if activation == "gelu_tanh":
        c1 = math.sqrt(2.0 / math.pi)
        v = 2.0 * c1 * (z + 0.044715 * z**3)
        s, sc = torch.sigmoid(v), torch.sigmoid(-v)
        t2 = z * s * sc * 2.0 * c1 * (1.0 + 3.0 * 0.044715 * z * z)
        return z * s, s + t2, s, t2
    raise AssertionError(activation)


def torch_f32(z32: torch.Tensor, activation: str):
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    a = F.gelu(z32, approximate=approximate)
    d = torch.ops.aten.gelu_backward(torch.ones_like(z32), z32, approximate=approximate)
    return a, d


def errors(a, d, ref):
    """Per-element errors in ulps (a: relative; d: relative to its largest term, and pure)."""
    a_ref, d_ref, t1, t2 = ref
    scale = torch.maximum(d_ref.abs(), torch.maximum(t1.abs(), t2.abs()))
    ea = (a.double() - a_ref).abs() / ulp32(a_ref)
    ed = (d.double() - d_ref).abs() / ulp32(scale)
    ed_pure = (d.double() - d_ref).abs() / ulp32(d_ref)
    # a non-finite result where the oracle is finite is an infinite error (NaN -> inf)
    return [torch.nan_to_num(e, nan=math.inf) for e in (ea, ed, ed_pure)]


@pytest.fixture(scope="module")
def z_sweep():
    return sweep()


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_oracle_is_torch_float64(z_sweep, activation):
    """The oracle is torch's float64 function where that is accurate (it cancels in the
    negative tail): relative difference <= 1e-10 (float32's eps is 1.2e-7) for z >= -4."""
    z = z_sweep[torch.isfinite(z_sweep) & (z_sweep >= -4) & (z_sweep.abs() <= 16)]
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    a_ref, d_ref, _, _ = oracle(z, activation)
    a64 = F.gelu(z.double(), approximate=approximate)
    d64 = torch.ops.aten.gelu_backward(torch.ones_like(a64), z.double(), approximate=approximate)
    ra = ((a64 - a_ref).abs() / a_ref.abs().clamp(min=1e-300)).max().item()
    rd = ((d64 - d_ref).abs() / d_ref.abs().clamp(min=1e-3)).max().item()
    print(f"{activation}: oracle vs torch float64: a {ra:.2e}, d {rd:.2e}")
    assert ra <= 1e-10 and rd <= 1e-10


def gelu_regions(z: torch.Tensor) -> dict:
    below = z < TORCH_OVERFLOW
    return {"overall": below, f"tail z<={TAIL:g}": z <= TAIL,
            f"{TAIL:g}<z<0": (z > TAIL) & (z < 0), "z>=0": (z >= 0) & below}


def gelu_error_maxima(z, a, d, ref) -> dict:
    """{(region, measure): max} with measures a_ulp, a_abs, d_ulp (ulps of the larger term),
    d_abs (absolute errors: |a - a_ref|, |d - d_ref|)."""
    ea, ed, _ = errors(a, d, ref)
    abs_a = torch.nan_to_num((a.double() - ref[0]).abs(), nan=math.inf)
    abs_d = torch.nan_to_num((d.double() - ref[1]).abs(), nan=math.inf)
    out = {}
    for region, m in gelu_regions(z).items():
        for name, e in (("a_ulp", ea), ("a_abs", abs_a), ("d_ulp", ed), ("d_abs", abs_d)):
            out[(region, name)] = e[m].max().item()
    return out


def gelu_shortfalls(ours: dict, bars: dict) -> list[str]:
    """Where ours is less accurate than the bar (torch's float32 GELU)."""
    return [f"{r} {m}: ours {v:.4g} > torch {bars[(r, m)]:.4g}" for (r, m), v in ours.items()
            if not v <= bars[(r, m)]]


@pytest.fixture(scope="module")
def gelu_sweep(z_sweep):
    """(z, oracle, torch's error maxima: the bar) over the finite sweep."""
    z = z_sweep[torch.isfinite(z_sweep)]
    ref = oracle(z, "gelu")
    return z, ref, gelu_error_maxima(z, *torch_f32(z, "gelu"), ref)


def test_gelu_at_least_as_accurate_as_torch(gelu_sweep):
    """Max ulp and absolute errors of a and d, overall and per region, against float64: ours
    no larger than torch's float32 GELU / gelu_backward on the same inputs (printed)."""
    z, ref, bars = gelu_sweep
    a, d = run(z, "gelu")
    ours = gelu_error_maxima(z, a, d, ref)
    print(f"\ngelu ({z.numel()} inputs): ours | torch float32")
    for (r, m), v in ours.items():
        print(f"  {r:<12} {m:<6} {v:10.4g} | {bars[(r, m)]:10.4g}")
    assert not gelu_shortfalls(ours, bars), gelu_shortfalls(ours, bars)
    # above torch's overflow, and wherever exp(-z^2/2) is 0: the correctly rounded a = z, d = 1
    big = z >= 16
    assert big.sum() > 1000
    assert torch.equal(a[big], z[big]) and torch.equal(d[big], torch.ones_like(d[big]))


def test_gelu_tanh_accuracy_dense_sweep(z_sweep):
    """gelu_tanh: max errors over the sweep (printed, ours and torch float32) within the bounds."""
    activation = "gelu_tanh"
    z = z_sweep[torch.isfinite(z_sweep)]
    ref = oracle(z, activation)
    a, d = run(z, activation)
    ea, ed, ed_pure = errors(a, d, ref)
    ta, td = torch_f32(z, activation)
    tea, ted, ted_pure = errors(ta, td, ref)

    def worst(e):
        i = int(torch.argmax(e))
        return f"{e[i].item():.3f} ulp at z={z[i].item():.9g}"

    # torch's float32 kernels overflow for huge |z| (gelu_tanh' at 1e20: NaN): compare on |z| <= 16
    small = z.abs() <= 16
    tea, ted, ted_pure = (torch.where(small, e, torch.zeros_like(e)) for e in (tea, ted, ted_pure))
    neg, pos = z < 0, z >= 0
    print(f"\n{activation} ({z.numel()} inputs; torch on |z| <= 16)")
    print(f"  a  ours {worst(ea)} | torch float32 {worst(tea)}")
    print(f"     z<0: ours {ea[neg].max().item():.3f}, torch {tea[neg].max().item():.4g};"
          f" z>=0: ours {ea[pos].max().item():.3f}, torch {tea[pos].max().item():.3f}")
    print(f"  d  ours {worst(ed)} | torch float32 {worst(ted)}   (ulps of the larger term)")
    print(f"     z<0: ours {ed[neg].max().item():.3f}, torch {ted[neg].max().item():.4g};"
          f" z>=0: ours {ed[pos].max().item():.3f}, torch {ted[pos].max().item():.3f}")
    print(f"  d  pure relative: ours {worst(ed_pure)} | torch float32 {worst(ted_pure)}")

    assert ea.max().item() <= A_BOUND_ULP, f"{activation}: forward error {worst(ea)}"
    assert ed.max().item() <= D_BOUND_ULP, f"{activation}: derivative error {worst(ed)}"
    # At least as accurate as torch's own float32 kernels, overall and on z >= 0 (where
    # torch's float32 GELU has no cancellation), up to the bounds above.
    assert ea.max() <= max(tea.max().item(), A_BOUND_ULP)
    assert ed.max() <= max(ted.max().item(), D_BOUND_ULP)
    assert ea[pos].max() <= max(tea[pos].max().item(), 1.0)
    assert ed[pos].max() <= max(2 * ted[pos].max().item(), 1.5)


def test_relu_is_torch_bit_for_bit(z_sweep):
    a, d = run(z_sweep, "relu")
    assert torch.equal(a.view(torch.int32), F.relu(z_sweep).view(torch.int32))
    assert torch.equal(d, torch.ops.aten.threshold_backward(torch.ones_like(z_sweep), z_sweep, 0.0))


def test_checker_catches_bad_results(z_sweep, gelu_sweep):
    """The accuracy checks bite. gelu_tanh: torch's float32 GELU (which cancels for z < 0)
    fails its fixed bounds by far, and so does a single result moved by 3 ulps (a) or 5 ulps
    (d). gelu: a single result moved past torch's error (by 6 ulps where torch's worst is
    about 5) fails the comparison with torch, for a and for d."""
    z = z_sweep[torch.isfinite(z_sweep)]
    ref = oracle(z, "gelu_tanh")
    ta, td = torch_f32(z, "gelu_tanh")
    assert errors(ta, td, ref)[0].max().item() > 1000 * A_BOUND_ULP
    a, d = run(z, "gelu_tanh")
    i = int(torch.nonzero((z > 0.3) & (z < 0.4))[0])  # there a and d are the largest terms
    bad_a, bad_d = a.clone(), d.clone()
    bad_a[i] += 3 * ulp32(ref[0][i : i + 1]).float()[0]
    bad_d[i] += 5 * ulp32(ref[1][i : i + 1]).float()[0]
    assert errors(bad_a, d, ref)[0].max().item() > A_BOUND_ULP
    assert errors(a, bad_d, ref)[1].max().item() > D_BOUND_ULP
    assert errors(a, d, ref)[0].max().item() <= A_BOUND_ULP

    z, ref, bars = gelu_sweep
    a, d = run(z, "gelu")
    assert not gelu_shortfalls(gelu_error_maxima(z, a, d, ref), bars)
    i = int(torch.nonzero((z > 0.3) & (z < 0.4))[0])
    steps = [k * max(bars[("z>=0", m)], 1.0) for k, m in ((1.2, "a_ulp"), (1.2, "d_ulp"))]
    bad_a, bad_d = a.clone(), d.clone()
    bad_a[i] += steps[0] * ulp32(ref[0][i : i + 1]).float()[0]
    bad_d[i] += steps[1] * ulp32(ref[1][i : i + 1]).float()[0]
    assert any("z>=0 a_ulp" in f for f in gelu_shortfalls(gelu_error_maxima(z, bad_a, d, ref), bars))
    assert any("z>=0 d_ulp" in f for f in gelu_shortfalls(gelu_error_maxima(z, a, bad_d, ref), bars))


@pytest.mark.parametrize("activation", ACTS)
def test_special_values_match_torch(activation, gelu_sweep):
    """NaN -> NaN, +-inf -> what torch's float64 GELU gives (gelu(+inf) = +inf,
    gelu(-inf) = NaN, gelu'(+-inf) = NaN; torch's float32 GELU agrees, except that its
    vectorised erf GELU returns NaN for +inf where its scalar path returns +inf); finite
    specials (signed zeros, subnormals, huge values) within the bounds of the oracle
    (gelu: within torch's float32 errors over the sweep, region by region)."""
    z = torch.tensor(SPECIAL, dtype=torch.float32)
    a, d = run(z, activation)
    if activation == "relu":
        ta = F.relu(z)
        td = torch.ops.aten.threshold_backward(torch.ones_like(z), z, 0.0)
        # bit for bit, -0 and NaN included; relu'(NaN) = 1 as threshold_backward has it
        assert torch.equal(a.view(torch.int32), ta.view(torch.int32))
        assert torch.equal(d, td)
        return
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    ta = F.gelu(z.double(), approximate=approximate)
    td = torch.ops.aten.gelu_backward(torch.ones_like(ta), z.double(), approximate=approximate)
    for name, ours, theirs in (("a", a, ta), ("d", d, td)):
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs)), f"{name}: NaN pattern {ours} vs {theirs}"
        inf = torch.isinf(theirs)
        assert torch.equal(ours[inf].double(), theirs[inf]), f"{name}: inf differs"
    assert torch.equal(torch.isnan(a), torch.isnan(z) | (z == -math.inf))
    assert torch.equal(torch.isnan(d), ~torch.isfinite(z))
    fin = torch.isfinite(z)
    if activation == "gelu":
        zf = z[fin]
        ours = gelu_error_maxima(zf, a[fin], d[fin], oracle(zf, activation))
        assert not gelu_shortfalls(ours, gelu_sweep[2]), gelu_shortfalls(ours, gelu_sweep[2])
    else:
        ea, ed, _ = errors(a[fin], d[fin], oracle(z[fin], activation))
        assert ea.max().item() <= A_BOUND_ULP and ed.max().item() <= D_BOUND_ULP
    # signed zeros as torch: gelu(-0) = -0, gelu(-tiny) = -0, gelu(z << 0) = -0
    for i in (1, 3, SPECIAL.index(-20.0), SPECIAL.index(-1e30), SPECIAL.index(-FMAX)):
        r = a[i].item()
        assert r == 0.0 and math.copysign(1.0, r) == -1.0, (SPECIAL[i], r)
    assert SPECIAL[1] == 0.0 and math.copysign(1.0, SPECIAL[1]) == -1.0 and SPECIAL[3] == -1e-45
    assert a[SPECIAL.index(FMAX)].item() == FMAX and d[SPECIAL.index(FMAX)].item() == 1.0


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 31, 1000, 100_003])
def test_sizes_and_layouts(activation, n):
    """Every length (vector body and remainder); results do not depend on the position
    of an element or on the input's layout."""
    z = torch.randn(n) * 4
    a, d = run(z, activation)
    assert a.shape == z.shape and d.shape == z.shape and a.dtype == torch.float32
    # element by element
    for i in range(min(n, 9)):
        ai, di = run(z[i : i + 1], activation)
        assert torch.equal(ai, a[i : i + 1]) and torch.equal(di, d[i : i + 1])
    if n >= 8:
        a2, d2 = run(z[3:], activation)  # another alignment
        assert torch.equal(a2, a[3:]) and torch.equal(d2, d[3:])
    x = torch.randn(6, 5) * 3
    at, dt = run(x.t(), activation)  # non-contiguous input
    ac, dc = run(x.t().contiguous(), activation)
    assert at.shape == (5, 6) and torch.equal(at, ac) and torch.equal(dt, dc)


def test_bad_input():
    with pytest.raises(RuntimeError, match="float32"):
        run(torch.zeros(3, dtype=torch.float64), "gelu")
    with pytest.raises(RuntimeError, match="float32"):
        run(torch.zeros(3, dtype=torch.int32), "relu")
    with pytest.raises(ValueError, match="activation: expected one of"):
        run(torch.zeros(3), "swish")


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


@pytest.mark.parametrize("activation", ACTS)
def test_vector_paths_agree_bit_for_bit(z_sweep, monkeypatch, activation):
    """The AVX-512 code (used where the CPU has it) and the AVX2 code (forced with
    CONVMIXER_KERNELS_CPU_ISA=avx2, the path of machines without AVX-512) give the same
    bits, NaN included, over the sweep and for every length around the vector widths; so
    the accuracy tests above cover both paths."""
    z = torch.cat([z_sweep, torch.randn(100_003) * 3, torch.randn(1000) * 8])
    a, d = run(z, activation)
    monkeypatch.setenv("CONVMIXER_KERNELS_CPU_ISA", "avx2")
    a2, d2 = run(z, activation)
    assert torch.equal(a.view(torch.int32), a2.view(torch.int32))
    assert torch.equal(d.view(torch.int32), d2.view(torch.int32))
    for n in list(range(1, 40)) + [255, 256, 257]:
        zn = torch.randn(n) * 2.5
        zn[n // 2] = 5.0  # a large value among small ones
        monkeypatch.setenv("CONVMIXER_KERNELS_CPU_ISA", "avx2")
        a2, d2 = run(zn, activation)
        monkeypatch.delenv("CONVMIXER_KERNELS_CPU_ISA")
        a1, d1 = run(zn, activation)
        assert torch.equal(a1, a2) and torch.equal(d1, d2), n
    if not _has_avx512():
        pytest.skip("no AVX-512 on this CPU: both runs took the AVX2 path")


@pytest.mark.parametrize("activation", ACTS)
def test_activation_into_and_cost_tool(activation):
    """_cpu_activation_into (chunks over at::parallel_for, for timing) writes what
    _cpu_activation returns; the cost tool (convmixer_kernels.tools.gelu_cost) runs."""
    z = torch.randn(70_001) * 4
    a0, d0 = run(z, activation)
    a, d = torch.empty_like(z), torch.empty_like(z)
    torch.ops.convmixer_kernels._cpu_activation_into(z, a, d, activation)
    assert torch.equal(a, a0) and torch.equal(d, d0)
    a.zero_()
    torch.ops.convmixer_kernels._cpu_activation_into(z, a, None, activation)
    assert torch.equal(a, a0)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.convmixer_kernels._cpu_activation_into(z, a[:10], None, activation)
    if activation == "gelu":
        from convmixer_kernels.tools import gelu_cost
        rows = gelu_cost.measure(n=4096, rounds=1, calls=1, threads=(1,))
        assert len(rows) == 4 and all(r[3] > 0 for r in rows)
