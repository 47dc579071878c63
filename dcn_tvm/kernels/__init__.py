"""Spec -> kernel: naming, resolution (in-process cache, prebuilt packages, disk cache, compile), and
the DLPack call. Below the torch-facing ops, above compute/ and schedules/.

    spec.py       KernelSpec: one readable key per kernel
    targets.py    target keys ("llvm-znver5", "cuda-sm_90") and their TVM target dicts
    workloads.py  workload strings, presets, the kernels (KernelSpecs) of a workload
    records.py    reading tuning_logs/ (the tuned schedule of a spec); the tuner writes them
    manifest.py   a prebuilt package's manifest, and the machine facts it is checked against
    prebuilt.py   finding, verifying and loading prebuilt packages (tvm_ffi only)
    runtime.py    loading a compiled library with tvm_ffi and TVM's runtime library
    resources.py  the CUDA launch limits every CUDA build is checked against
    build.py      compiling a spec: compute + tuned or default schedule
    cache.py      resolution: in-process -> prebuilt -> disk cache -> compile
"""
