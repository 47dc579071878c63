"""Prebuilt kernel packages: built once by `dcn-tvm build`, loaded anywhere without the TVM compiler.

A package holds one shared library per target variant (CPU ISA level or CUDA arch), TVM's small
runtime library, a manifest (kernel -> function, versions, target, sha256 of every file) and a tiny
loader module. `build` and `cli` (compiler side, tools) make them; kernel resolution finds, verifies
and loads them (runtime side, no compiler: dcn_tvm.kernels.prebuilt and dcn_tvm.kernels.manifest).
"""
