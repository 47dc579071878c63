"""Prebuilt kernel packages: built once by `dcn-tvm build`, loaded anywhere without the TVM compiler.

A package holds one shared library per target variant (CPU ISA level or CUDA arch), TVM's small
runtime library, a manifest (kernel -> function, versions, target, sha256 of every file) and a tiny
loader module. `loader` (runtime side, no compiler) finds and verifies packages; `build` (compiler
side) makes them.
"""
