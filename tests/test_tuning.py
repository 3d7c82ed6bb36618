"""The tuning table that auto reads (convmixer_kernels.backends.tuning) and the tune
command that writes it: the choice is deterministic for a table and an input, the nearest
measured shape decides, the user's table overrides the shipped one, and a corrupt or
stale table falls back to the priority rule with one log line."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import convmixer_kernels as ck
from convmixer_kernels import backends
from convmixer_kernels.backends import tuning


def entry(best, n=2, c=8, h=8, w=8, k=3, cout=8, op="dw_block", mode="eval", layout="contiguous",
          act="gelu", dtype="float32"):
    return {"op": op, "mode": mode, "dtype": dtype, "layout": layout, "act": act, "n": n, "c": c,
            "h": h, "w": w, "k": k, "cout": cout, "best": best, "ms": {best: 1.0}}


def table(*entries, torch_version=torch.__version__, **extra):
    t = {"format": tuning.FORMAT, "family": tuning.family("cpu"), "device": "test", "torch": torch_version,
         "commit": None, "created": "now", "margin": 0.03, "threads": 1, "entries": list(entries)}
    t.update(extra)
    return t


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    user, shipped = tmp_path / "user", tmp_path / "shipped"
    user.mkdir()
    shipped.mkdir()
    monkeypatch.setenv("CONVMIXER_KERNELS_TUNING_DIR", str(user))
    monkeypatch.setattr(tuning, "SHIPPED_DIR", shipped)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    tuning.clear_cache()
    backends.forget_choices()
    yield user, shipped
    tuning.clear_cache()
    backends.forget_choices()


def write(folder, t):
    (folder / f"{tuning.family('cpu')}.json").write_text(json.dumps(t))
    tuning.clear_cache()
    backends.forget_choices()


def x_of(n=2, c=8, h=8, w=8, cl=False):
    x = torch.randn(n, c, h, w)
    return x.contiguous(memory_format=torch.channels_last) if cl else x


def test_no_table_falls_back_to_native(dirs):
    name, why = backends.choose(None, "dw_block", x_of(), "eval", "gelu", 3, 8)
    assert name == "native" and "priority" in why


def test_table_decides_and_is_deterministic(dirs):
    user, _ = dirs
    write(user, table(entry("cpu"), entry("reference", mode="train")))
    picks = {backends.choose(None, "dw_block", x_of(), "eval", "gelu", 3, 8)[0] for _ in range(5)}
    assert picks == {"cpu"}
    assert backends.choose(None, "dw_block", x_of(), "train", "gelu", 3, 8)[0] == "reference"
    # another layout has no entry: the rule
    assert backends.choose(None, "dw_block", x_of(cl=True), "eval", "gelu", 3, 8)[0] == "native"
    # an explicit backend wins over the table
    assert backends.choose("reference", "dw_block", x_of(), "eval", "gelu", 3, 8)[0] == "reference"


def test_nearest_shape_decides(dirs):
    user, _ = dirs
    write(user, table(entry("cpu", n=2, c=8, h=8, w=8), entry("reference", n=64, c=512, h=32, w=32)))
    assert backends.choose(None, "dw_block", x_of(4, 16, 8, 8), "eval", "gelu", 3, 16)[0] == "cpu"
    assert backends.choose(None, "dw_block", x_of(32, 256, 32, 32), "eval", "gelu", 3, 256)[0] == "reference"
    why = backends.explain(x_of(32, 256, 32, 32), "dw_block", k=3, cout=256)["why"]
    assert "nearest measured shape" in why


def test_user_table_overrides_shipped(dirs):
    user, shipped = dirs
    write(shipped, table(entry("cpu")))
    assert backends.choose(None, "dw_block", x_of(), "eval", "gelu", 3, 8)[0] == "cpu"
    write(user, table(entry("reference")))
    assert backends.choose(None, "dw_block", x_of(), "eval", "gelu", 3, 8)[0] == "reference"


@pytest.mark.parametrize("bad", ["not json", "stale", "unknown key", "bad entry", "format"])
def test_corrupt_or_stale_table_falls_back_with_one_log_line(dirs, caplog, bad):
    user, _ = dirs
    path = user / f"{tuning.family('cpu')}.json"
    if bad == "not json":
        path.write_text("{nope")
    else:
        t = {"stale": table(entry("cpu"), torch_version="1.0.0"),
             "unknown key": table(entry("cpu"), surprise=1),
             "bad entry": table({**entry("cpu"), "extra": 1}),
             "format": table(entry("cpu"), format=99)}[bad]
        path.write_text(json.dumps(t))
    tuning.clear_cache()
    backends.forget_choices()
    with caplog.at_level(logging.WARNING, logger="convmixer_kernels"):
        for _ in range(3):
            name, _ = backends.choose(None, "dw_block", x_of(), "eval", "gelu", 3, 8)
            out = ck.dw_block(x_of(), torch.randn(8, 1, 3, 3), training=True)
    assert name == "native" and out.shape == (2, 8, 8, 8)
    lines = [r for r in caplog.records if "ignoring the tuning table" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]


def test_unavailable_table_choice_falls_back(dirs):
    user, _ = dirs
    write(user, table(entry("cuda")))  # not runnable on a cpu tensor
    assert backends.choose(None, "dw_block", x_of(), "eval", "gelu", 3, 8)[0] == "native"


def test_module_follows_the_table(dirs):
    """A fused module runs the stock children where the table says native, the fused op
    where it names a kernel backend (the route cache is dropped with a new table)."""
    from convmixer_kernels.backends.reference import ReferenceBackend

    class Spy(ReferenceBackend):
        name, priority, calls = "spy", 10_000, 0

        def block_forward(self, spec, *args):
            Spy.calls += 1
            return super().block_forward(spec, *args)

    user, _ = dirs
    backends.register(Spy())
    try:
        block = ck.DepthwiseBlock(8, 3).eval()
        x = x_of()
        write(user, table(entry("spy")))
        with torch.no_grad():
            block(x)
            block(x)
        assert Spy.calls == 2
        write(user, table(entry("native")))
        with torch.no_grad():
            block(x)
        assert Spy.calls == 2
    finally:
        backends.unregister("spy")


def test_tune_writes_a_table_auto_reads(dirs, tmp_path):
    """tune end to end on tiny shapes: a valid table, one entry per recorded call, each
    choice one of the candidates it timed."""
    from convmixer_kernels.tools import tune

    sigs = [("dw_block", "eval", "float32", "contiguous", "gelu", (2, 8, 6, 6), 3, 8),
            ("pw_block", "train", "float32", "channels_last", "relu", (2, 8, 6, 6), 1, 8)]
    with mock_signatures(tune, sigs):
        t = tune.tune(torch.device("cpu"), ["float32"], False, repeats=1, min_s=0.0, margin=0.03,
                      log=lambda s: None)
    tuning.validate(t)
    assert [(e["op"], e["mode"]) for e in t["entries"]] == [("dw_block", "eval"), ("pw_block", "train")]
    for e in t["entries"]:
        assert e["best"] in e["ms"] and "reference" not in e["ms"] and "native" in e["ms"]
    write(dirs[0], t)
    assert backends.choose(None, "dw_block", x_of(2, 8, 6, 6), "eval", "gelu", 3, 8)[0] == t["entries"][0]["best"]


def mock_signatures(module, sigs):
    from unittest import mock
    return mock.patch.object(module, "_signatures", lambda device, dtype, full: sigs)


def test_record_calls_sees_the_blocks_a_model_runs():
    from convmixer_kernels.tools.tune import record_calls

    model = ck.ConvMixer(16, 2, kernel_size=5, patch_size=2, num_classes=10).eval()
    with record_calls() as seen, torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    ops = sorted({s[0] for s in seen})
    assert ops == ["dw_block", "patch_embed", "pw_block"]
    assert any(s[0] == "patch_embed" and s[6] == 2 and s[7] == 16 for s in seen)


def test_training_modes_follow_the_input_gradient():
    """A training call whose input needs no gradient (a model's image into patch_embed) is
    its own mode: the stock path then skips the input-gradient GEMM, so the timings differ."""
    from convmixer_kernels.tools.tune import record_calls

    model = ck.ConvMixer(16, 1, kernel_size=3, patch_size=2, num_classes=10).train()
    with record_calls() as seen:
        model(torch.randn(2, 3, 8, 8))
    modes = {s[0]: s[1] for s in seen}
    assert modes == {"patch_embed": "train_no_input_grad", "dw_block": "train", "pw_block": "train"}
    with record_calls() as seen:
        model(torch.randn(2, 3, 8, 8, requires_grad=True))
    assert {s[0]: s[1] for s in seen}["patch_embed"] == "train"
    assert backends.block_mode(False, False) == "eval"


def test_no_input_grad_mode_has_its_rows_else_the_train_rows(dirs):
    user, _ = dirs
    write(user, table(entry("cpu", mode="train")))
    assert backends.choose(None, "dw_block", x_of(), "train_no_input_grad", "gelu", 3, 8)[0] == "cpu"
    write(user, table(entry("cpu", mode="train"), entry("reference", mode="train_no_input_grad")))
    assert backends.choose(None, "dw_block", x_of(), "train_no_input_grad", "gelu", 3, 8)[0] == "reference"
    assert backends.choose(None, "dw_block", x_of(), "train", "gelu", 3, 8)[0] == "cpu"
    with pytest.raises(ValueError, match="mode"):
        backends.explain(x_of(), "dw_block", mode="training")


@pytest.mark.parametrize("mode", ["train", "train_no_input_grad"])
def test_tune_times_the_input_gradient_as_recorded(mode):
    from convmixer_kernels.tools import tune

    x, params, _, _ = tune._inputs("patch_embed", (1, 3, 8, 8), 2, 4, torch.float32, "contiguous",
                                   torch.device("cpu"), mode)
    assert x.requires_grad == (mode == "train") and all(p.requires_grad for p in params)


def test_tune_backward_gets_a_dense_gradient_in_the_output_layout(monkeypatch):
    """tune times a training call with a random output gradient in the output's layout, as
    a loss and the benchmark hand it on (not the expanded gradient of out.sum())."""
    from convmixer_kernels import functional
    from convmixer_kernels.tools import tune

    grads = []
    real = functional.pw_block

    def spy(*a, **k):
        out = real(*a, **k)
        if out.requires_grad:
            out.register_hook(lambda g: grads.append(g))
        return out

    monkeypatch.setattr(functional, "pw_block", spy)
    args = tune._inputs("pw_block", (2, 8, 4, 4), 1, 8, torch.float32, "channels_last",
                        torch.device("cpu"), "train")
    tune.time_call("pw_block", "native", "train", "gelu", args)()
    (g,) = grads
    assert g.is_contiguous(memory_format=torch.channels_last) and 0 not in g.stride()
    assert g.std() > 0.5  # random, not ones


def test_tune_ops_keeps_the_other_ops_entries(dirs, tmp_path, capsys):
    import argparse

    from convmixer_kernels.tools import tune

    out = tmp_path / "table.json"
    out.write_text(json.dumps(table(entry("cpu", op="dw_block"), entry("cpu", op="pw_block"))))
    sigs = [("dw_block", "eval", "float32", "contiguous", "gelu", (2, 8, 6, 6), 3, 8),
            ("pw_block", "eval", "float32", "contiguous", "gelu", (2, 8, 6, 6), 1, 8)]
    a = tune.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--device", "cpu", "--out", str(out), "--ops", "pw_block", "--repeats", "1",
         "--min-time", "0"])
    with mock_signatures(tune, sigs):
        t = tune.run_args(a)
    kept = json.loads(out.read_text())["entries"]
    assert [(e["op"], e["n"]) for e in kept] == [("dw_block", 2), ("pw_block", 2)]
    assert kept[0] == entry("cpu", op="dw_block")  # untouched
    assert set(kept[1]["ms"]) >= {"native"} and t["entries"] == kept
    with pytest.raises(SystemExit, match="--ops"):
        tune.run_args(tune.add_arguments(argparse.ArgumentParser()).parse_args(
            ["--device", "cpu", "--out", str(out), "--ops", "conv"]))


def test_tune_confirms_a_close_win_before_keeping_it(dirs):
    """A kernel of ours that beats native by less than CONFIRM_WITHIN is timed again after
    the first pass and kept only if it wins again; a clear win is timed once."""
    from unittest import mock

    from convmixer_kernels.tools import tune

    sigs = [("pw_block", "eval", "float32", "contiguous", "gelu", (2, 8, 6, 6), 1, 8),
            ("pw_block", "eval", "float32", "channels_last", "gelu", (2, 8, 6, 6), 1, 8),
            ("dw_block", "eval", "float32", "contiguous", "gelu", (2, 8, 6, 6), 3, 8)]
    # first pass: close win, close win, clear win; second pass (close ones only, in order):
    # native wins the first, ours wins the second again
    scripted = iter([{"native": 1.10, "cpu": 1.00}, {"native": 1.10, "cpu": 1.00},
                     {"native": 3.00, "cpu": 1.00},
                     {"native": 1.00, "cpu": 1.05}, {"native": 1.20, "cpu": 1.00}])
    calls = []

    def fake_measure(fns, device, repeats, min_s):
        calls.append(sorted(fns))
        return next(scripted)

    with mock_signatures(tune, sigs), mock.patch.object(tune, "_measure", fake_measure):
        t = tune.tune(torch.device("cpu"), ["float32"], False, repeats=1, min_s=0.0, margin=0.03,
                      log=lambda s: None)
    assert len(calls) == 5  # three first-pass timings, two confirmations
    assert [e["best"] for e in t["entries"]] == ["native", "cpu", "cpu"]
    assert t["entries"][0]["ms"] == {"native": 1.05, "cpu": 1.025}  # the two passes' mean
    assert t["entries"][2]["ms"] == {"native": 3.0, "cpu": 1.0}
    tuning.validate(t)


def test_tune_measures_the_host_bound_calls():
    """tune times the overhead tool's tiny block calls in every mode, so a host-bound call
    is looked up in a bucket measured where host time decides."""
    from convmixer_kernels.tools import overhead, tune

    sigs = tune._signatures(torch.device("cpu"), "float32", False)
    tiny = {(s[0], s[1]) for s in sigs if s[5] == tune.HOST_BOUND_SHAPE and s[3] == "contiguous"}
    assert tiny == {(op, mode) for op, _ in tune.HOST_BOUND_CALLS
                    for mode in ("eval", "train", "train_no_input_grad")}
    assert overhead.HOST_BOUND_SHAPE == tune.HOST_BOUND_SHAPE
