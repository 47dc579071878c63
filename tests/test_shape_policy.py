"""The shape policy (dcn_tvm.ops.shapes): a layer's first size gets static kernels, its second switches it
to the shape-generic ones for good, exact tuned or prebuilt kernels are still used; compile counts, not times."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import dcn_tvm
from dcn_tvm.geometry.conv import conv_geometry
from dcn_tvm.kernels import cache
from dcn_tvm.kernels.records import version
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.ops import shapes
from reference import deform_conv2d_loops
from reference_roi_pool import deform_roi_pool_loops

SIZES = [(1, 9, 11), (2, 9, 11), (1, 12, 7), (1, 7, 14), (2, 10, 10), (1, 8, 9)]


@pytest.fixture(autouse=True)
def fresh_policy(monkeypatch):
    monkeypatch.delenv("DCN_TVM_SHAPES", raising=False)
    shapes.forget()
    yield
    shapes.forget()


def spec(n, h, w, stage="forward", channels=4):
    geo = conv_geometry((n, channels, h, w), (n, 18, h, w), (4, channels, 3, 3), None, 1, 1, 1, "float32")
    return KernelSpec("deform_conv2d", stage, geo, (("n", n), ("h", h), ("w", w)), "llvm-test")


def test_first_size_static_then_generic_for_every_later_size():
    first, *others = [spec(*size) for size in SIZES]
    assert shapes.choose(first) == first
    assert shapes.choose(spec(*SIZES[0], stage="backward_data")) == spec(*SIZES[0], stage="backward_data")
    assert [shapes.choose(s) for s in others] == [s.symbolic() for s in others]
    assert shapes.choose(first) == first  # already compiled: kept
    # A stage first met after the switch goes generic, at the first size too.
    weight = spec(*SIZES[0], stage="backward_weight")
    assert shapes.choose(weight) == weight.symbolic()
    # Another layer (geometry) has a policy of its own.
    other_layer = spec(*SIZES[1], channels=8)
    assert shapes.choose(other_layer) == other_layer


@pytest.mark.parametrize("policy", ["static", "dynamic"])
def test_overrides(policy, monkeypatch):
    monkeypatch.setenv("DCN_TVM_SHAPES", policy)
    for size in SIZES:
        assert shapes.choose(spec(*size)) == (spec(*size) if policy == "static" else spec(*size).symbolic())


def test_unknown_policy_is_refused(monkeypatch):
    monkeypatch.setenv("DCN_TVM_SHAPES", "sometimes")
    with pytest.raises(ValueError, match=r"DCN_TVM_SHAPES must be one of \('auto', 'static', 'dynamic'\), "
                                         r"got 'sometimes'"):
        shapes.choose(spec(*SIZES[0]))


def test_exact_tuned_and_prebuilt_kernels_are_still_used(tmp_path, monkeypatch):
    tuned, packaged, other = spec(*SIZES[1]), spec(*SIZES[2]), spec(*SIZES[3])
    folder = tmp_path / tuned.target / tuned.op
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps({"tvm": version("apache-tvm"), "kernels": {
        tuned.key: {"schedule": "tuned"}, other.key: {"schedule": "default"}}}))
    monkeypatch.setenv("DCN_TVM_TUNING_LOGS", str(tmp_path))
    package = SimpleNamespace(manifest={"kernels": {packaged.workload_key: {}}})
    monkeypatch.setattr(shapes.prebuilt, "packages", lambda: (package,))
    shapes.choose(spec(*SIZES[0]))
    assert shapes.choose(tuned) == tuned
    assert shapes.choose(packaged) == packaged
    assert shapes.choose(other) == other.symbolic()  # recorded, but its default schedule won


def test_threads_agree_on_one_switch():
    """Many threads meeting a layer at once: every size is decided once, the first size static."""
    specs = [spec(*size) for size in SIZES] * 8
    chosen = []
    threads = [threading.Thread(target=lambda s=s: chosen.append((s, shapes.choose(s)))) for s in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    static = {s for s, c in chosen if c == s}
    assert len(static) == 1 and all(c == s.symbolic() for s, c in chosen if s not in static)


def test_a_forked_child_does_not_inherit_a_held_lock():
    with shapes._lock:  # held by this thread while the child is forked
        pid = os.fork()
        if pid == 0:
            shapes.choose(spec(*SIZES[0]))
            os._exit(0)
    for _ in range(200):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the child hung on the lock it inherited")


@pytest.fixture
def compiled(monkeypatch):
    """The keys of the kernels compiled during the test (no disk cache: every kernel is compiled)."""
    monkeypatch.setenv("DCN_TVM_NO_DISK_CACHE", "1")
    keys = []
    original = cache._compile
    monkeypatch.setattr(cache, "_compile", lambda spec: keys.append(spec.key) or original(spec))
    return keys


@pytest.mark.slow
def test_six_sizes_cost_one_extra_compile(compiled):
    """deform_conv2d forward at six sizes in turn, then RoI pooling at six sizes and RoI counts: two kernels
    each (the first size's, then the generic one), every result right."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(5, 3, 3, 3, generator=gen)
    for n, h, w in SIZES:
        x, offset = torch.randn(n, 3, h, w, generator=gen), 2 * torch.randn(n, 18, h, w, generator=gen)
        out = dcn_tvm.deform_conv2d(x, offset, weight, padding=1)
        torch.testing.assert_close(out, deform_conv2d_loops(x, offset, weight, padding=(1, 1)).float())
    assert len(compiled) == 2 and "_nany_hany_wany_" in compiled[1], compiled
    for r, (n, h, w) in enumerate(SIZES, 1):
        x = torch.randn(n, 2, h, w, generator=gen)
        boxes = torch.rand(r, 4, generator=gen) * 8
        rois = torch.cat([torch.randint(0, n, (r, 1), generator=gen).float(), boxes.sort(1).values], 1)
        out = dcn_tvm.deform_roi_pool(x, rois, output_size=2, spatial_scale=1.0, sampling_ratio=2)
        expected = deform_roi_pool_loops(x, rois, output_size=2, spatial_scale=1.0, sampling_ratio=2)
        torch.testing.assert_close(out, expected.float())
    assert len(compiled) == 4 and "_nany_hany_wany_" in compiled[3], compiled
