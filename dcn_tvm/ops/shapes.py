"""The shape policy: which sizes a kernel is compiled for. Every op's specs go through `choose`.

DCN_TVM_SHAPES (dcn_tvm.env.shapes_policy):

- `auto` (default), torch.compile's "automatic dynamic": a layer (op, geometry, target, accumulation
  dtype) gets kernels for the exact sizes of its first call; once it meets other sizes it switches
  to the shape-generic kernels (every size symbolic), which serve every later size. A stage whose
  exact-size kernel was already chosen keeps it; a kernel tuned or prebuilt for the exact sizes is
  still used. So a layer costs at most one extra compile per stage, however many sizes it meets.
- `static`: a kernel per exact size (every new size compiles).
- `dynamic`: the shape-generic kernel from the first call.

Thread-safe (one lock, recreated in a forked child); decisions are remembered per spec, so a call
costs one dictionary lookup.
"""

from __future__ import annotations

from dcn_tvm import env
from dcn_tvm.forksafe import ForkSafeLock
from dcn_tvm.kernels import prebuilt
from dcn_tvm.kernels.records import Records
from dcn_tvm.kernels.spec import KernelSpec

_GENERIC = "generic"
_lock = ForkSafeLock()  # unheld again in a forked child
_layers: dict[tuple, object] = {}  # layer -> the sizes of its first call, or _GENERIC once it met others
_chosen: dict[tuple[str, KernelSpec], KernelSpec] = {}  # (policy, exact spec) -> the spec to run


def choose(spec: KernelSpec) -> KernelSpec:
    """The spec to run for `spec`, whose sizes are the call's exact ones (None where a size is always
    symbolic): `spec` itself or `spec.symbolic()`, by the policy above.

    Ops build their specs with exact sizes and pass them through this function, e.g.
    `get_kernel(shapes.choose(KernelSpec(OP, stage, geo, (("n", n), ("h", h), ("w", w)), target)))`.
    """
    key = (env.shapes_policy(), spec)
    chosen = _chosen.get(key)
    if chosen is None:
        with _lock:
            chosen = _chosen.get(key)
            if chosen is None:
                chosen = _chosen[key] = _decide(key[0], spec)
    return chosen


def _decide(policy: str, spec: KernelSpec) -> KernelSpec:
    if policy == "static" or spec.geometry is None:
        return spec
    if policy == "dynamic":
        return spec.symbolic()
    layer = (spec.op, spec.geometry, spec.target, spec.acc_dtype)
    first = _layers.setdefault(layer, spec.sizes)
    if first == spec.sizes:
        return spec
    _layers[layer] = _GENERIC
    return spec if _exact_kernel_exists(spec) else spec.symbolic()


def _exact_kernel_exists(spec: KernelSpec) -> bool:
    """Whether a prebuilt package has a kernel for exactly `spec`'s sizes, or a usable tuned record does."""
    if any(spec.workload_key in package.manifest["kernels"] for package in prebuilt.packages()):
        return True
    store = Records(spec.target, spec.op)
    entry = store.kernel(spec.key) if store.exists() else None
    return entry is not None and entry.get("schedule") == "tuned" and store.version_error() is None


def forget() -> None:
    """Forget every layer's sizes and every decision (tests, benchmarks)."""
    with _lock:
        _layers.clear()
        _chosen.clear()
