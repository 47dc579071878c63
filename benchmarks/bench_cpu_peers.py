"""Deformable convolution on the CPU beside its real peers: OpenVINO, onnxruntime, torchvision, dense oneDNN.

    pip install -e '.[peers]'
    python benchmarks/bench_cpu_peers.py [--repeats 15] [--threads 1 2] [--layers a b c d]

Every library computes the same float32 layer on the same fresh random inputs (offsets of about ±2 pixels,
some outside the image); their outputs are first checked against dcn_tvm's (max relative error printed), then
each is timed with the methods interleaved round by round, and the medians are reported. Each thread count
runs in a fresh process of its own (TVM's thread pool reads TVM_NUM_THREADS once), with torch, oneDNN,
OpenVINO and onnxruntime given the same count and their idle workers told not to spin (PASSIVE_WAIT). OpenVINO runs `opset8.deformable_convolution` with
`bilinear_interpolation_pad=True` (torchvision's border rule); onnxruntime runs the ONNX opset-19 `DeformConv`.
Forward+backward has no peer but torchvision and the dense conv. Ratios are last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_deform_conv2d import device_name  # noqa: E402

import dcn_tvm  # noqa: E402

LAYERS = {
    # key: (label, N, C, H, W, O, kernel, padding, dilation, mask)
    "a": ("ResNet-101 conv5 1x512x38x50, 3x3, pad 2, dil 2", 1, 512, 38, 50, 512, 3, 2, 2, False),
    "b": ("2x64x56x56, 3x3, pad 1", 2, 64, 56, 56, 64, 3, 1, 1, False),
    "c": ("DCNv2 mask 2x256x64x64, 3x3, pad 1", 2, 256, 64, 64, 256, 3, 1, 1, True),
    "d": ("8x128x32x32, 3x3, pad 1", 8, 128, 32, 32, 128, 3, 1, 1, False),
}


#: Idle worker threads sleep instead of spinning, in every library's pool: interleaved, one library's
#: spinning workers would take the cores from the next one's (measured: on 2 cores the dense conv took
#: up to 5.7x its time alone, dcn_tvm 2x).
PASSIVE_WAIT = {"OMP_WAIT_POLICY": "PASSIVE", "TVM_THREAD_POOL_SPIN_COUNT": "0"}


def make_inputs(layer):
    _, n, c, h, w, o, k, pad, dil, with_mask = layer
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen)
    offset = torch.randn(n, 2 * k * k, h, w, generator=gen) * 2
    weight = torch.randn(o, c, k, k, generator=gen) / (c * k * k) ** 0.5
    bias = torch.randn(o, generator=gen)
    mask = torch.rand(n, k * k, h, w, generator=gen) if with_mask else None
    return x, offset, weight, bias, mask


def openvino_forward(layer, weight, bias, threads):
    """A compiled OpenVINO model (input, offset[, mask]) -> output; None without openvino."""
    if importlib.util.find_spec("openvino") is None:
        return None
    import openvino as ov
    import openvino.opset8 as ops

    _, n, c, h, w, o, k, pad, dil, with_mask = layer
    data = ops.parameter([n, c, h, w], ov.Type.f32)
    offset = ops.parameter([n, 2 * k * k, h, w], ov.Type.f32)
    mask = ops.parameter([n, k * k, h, w], ov.Type.f32) if with_mask else None
    conv = ops.deformable_convolution(data, offset, ops.constant(weight.numpy()), [1, 1], [pad, pad], [pad, pad],
                                      [dil, dil], mask=mask, bilinear_interpolation_pad=True)
    out = ops.add(conv, ops.constant(bias.numpy().reshape(1, o, 1, 1)))
    model = ov.Model([out], [p for p in (data, offset, mask) if p is not None])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()

    def forward(x, off, m):
        request.infer([t.numpy() for t in (x, off, m) if t is not None])
        return torch.from_numpy(request.get_output_tensor(0).data)

    return forward


def onnxruntime_forward(layer, weight, bias, threads):
    """An onnxruntime session of one opset-19 DeformConv node; None without onnx/onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return None
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    _, n, c, h, w, o, k, pad, dil, with_mask = layer
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [n, c, h, w]),
              helper.make_tensor_value_info("offset", TensorProto.FLOAT, [n, 2 * k * k, h, w])]
    if with_mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [n, k * k, h, w]))
    node = helper.make_node("DeformConv", ["X", "W", "offset", "B"] + (["mask"] if with_mask else []), ["Y"],
                            kernel_shape=[k, k], pads=[pad] * 4, dilations=[dil, dil], strides=[1, 1])
    graph = helper.make_graph([node], "deform_conv", inputs,
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, o, h, w])],
                              [numpy_helper.from_array(weight.numpy(), "W"), numpy_helper.from_array(bias.numpy(), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see PASSIVE_WAIT
    onnx.checker.check_model(model)
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in inputs]

    def forward(x, off, m):
        feeds = dict(zip(names, [t.numpy() for t in (x, off, m) if t is not None]))
        return torch.from_numpy(session.run(None, feeds)[0])

    return forward


def forward_methods(layer, weight, bias, threads):
    """name -> forward(input, offset, mask): dcn_tvm first (the reference of the agreement check)."""
    _, _, _, _, _, _, _, pad, dil, _ = layer
    found = {"dcn_tvm": lambda x, off, m: dcn_tvm.deform_conv2d(x, off, weight, bias, padding=pad, dilation=dil,
                                                                mask=m)}
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision

        found["torchvision"] = lambda x, off, m: torchvision.ops.deform_conv2d(x, off, weight, bias, padding=pad,
                                                                               dilation=dil, mask=m)
    for name, build in (("OpenVINO", openvino_forward), ("onnxruntime", onnxruntime_forward)):
        forward = build(layer, weight, bias, threads)
        if forward is not None:
            found[name] = forward
    found["dense conv"] = lambda x, off, m: F.conv2d(x, weight, bias, padding=pad, dilation=dil)
    return found


def interleaved_medians(functions: dict, repeats: int) -> dict:
    """Median ms of each function, timed round-robin (one call of each per round) after one warm-up."""
    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            begin = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - begin) * 1e3)
    return {name: float(np.median(values)) for name, values in times.items()}


def measure(layer, repeats: int, threads: int) -> dict:
    """{"forward": {method: ms}, "forward_backward": {method: ms}, "agreement": {method: max rel. error}}."""
    x, offset, weight, bias, mask = make_inputs(layer)
    forwards = forward_methods(layer, weight, bias, threads)
    with torch.no_grad():
        reference = forwards["dcn_tvm"](x, offset, mask)
        agreement = {name: ((fn(x, offset, mask) - reference).abs().max() / reference.abs().max()).item()
                     for name, fn in forwards.items() if name != "dense conv"}
    with torch.no_grad():
        forward = interleaved_medians({name: (lambda fn=fn: fn(x, offset, mask)) for name, fn in forwards.items()},
                                      repeats)
    leaves = [t.requires_grad_() for t in (x, offset, weight, bias)]
    grad = torch.randn_like(reference)
    _, _, _, _, _, _, _, pad, dil, _ = layer

    def backward_of(fn):
        return lambda: torch.autograd.grad(fn(), leaves, grad, allow_unused=True)

    trainable = {"dcn_tvm": lambda: dcn_tvm.deform_conv2d(x, offset, weight, bias, padding=pad, dilation=dil, mask=mask),
                 "dense conv": lambda: F.conv2d(x, weight, bias, padding=pad, dilation=dil)}
    if "torchvision" in forwards:
        import torchvision

        trainable["torchvision"] = lambda: torchvision.ops.deform_conv2d(x, offset, weight, bias, padding=pad,
                                                                         dilation=dil, mask=mask)
    forward_backward = interleaved_medians({name: backward_of(fn) for name, fn in trainable.items()}, repeats)
    return {"forward": forward, "forward_backward": forward_backward, "agreement": agreement}


def table(results: dict) -> str:
    """Markdown: per (layer, threads) forward ms of every method, fwd+bwd ms, and the ratios last."""
    peers = ["dense conv", "OpenVINO", "onnxruntime", "torchvision", "dcn_tvm"]
    lines = ["| layer | threads | " + " | ".join(f"{p} fwd ms" for p in peers) + " | dcn_tvm / dense | dcn_tvm / OpenVINO"
             " | dcn_tvm / onnxruntime | fwd+bwd ms: dense, torchvision, dcn_tvm | fwd+bwd dcn_tvm / dense |",
             "|---|---:|" + "---:|" * (len(peers) + 5)]
    for (key, threads), r in results.items():
        fwd, both = r["forward"], r["forward_backward"]
        cell = lambda d, name: f"{d[name]:.2f}" if name in d else "-"  # noqa: E731
        ratio = lambda d, name: f"{d['dcn_tvm'] / d[name]:.2f}x" if name in d else "-"  # noqa: E731
        lines.append(f"| ({key}) {LAYERS[key][0]} | {threads} | " + " | ".join(cell(fwd, p) for p in peers)
                     + f" | {ratio(fwd, 'dense conv')} | {ratio(fwd, 'OpenVINO')} | {ratio(fwd, 'onnxruntime')}"
                     + f" | {cell(both, 'dense conv')}, {cell(both, 'torchvision')}, {cell(both, 'dcn_tvm')}"
                     + f" | {ratio(both, 'dense conv')} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # one thread count, in this process: print the measurements as JSON
        threads = args.threads[0]
        torch.set_num_threads(threads)
        out = {key: measure(LAYERS[key], args.repeats, threads) for key in args.layers}
        print(json.dumps(out))
        return
    results = {}
    for threads in args.threads:
        env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), **PASSIVE_WAIT)
        command = [sys.executable, __file__, "--worker", "--repeats", str(args.repeats), "--threads", str(threads),
                   "--layers", *args.layers]
        measured = json.loads(subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
                              .strip().splitlines()[-1])
        for key, r in measured.items():
            results[(key, threads)] = r
            print(f"({key}) {threads} thread(s): max |peer - dcn_tvm| / max |dcn_tvm| = "
                  + ", ".join(f"{name} {err:.1e}" for name, err in r["agreement"].items()), file=sys.stderr)
    print(f"device: {device_name(torch.device('cpu')).rsplit(',', 1)[0]} | torch {torch.__version__} | float32 | "
          f"median of {args.repeats} interleaved rounds")
    print()
    print(table(results))


if __name__ == "__main__":
    main()
