"""Workloads: what `dcn-tvm tune` tunes, written as strings, named by presets or recorded from a model.

A workload is the static shape of one operator call, e.g.

    deform_conv2d:n=1,c=64,h=32,w=32,o=64,k=3,stride=1,pad=1,dil=1,groups=1,offset_groups=1,mask=0,dtype=float32
    deform_roi_pool:r=300,n=1,c=1029,h=38,w=63,k=7,group_size=7,part_size=7,sampling_ratio=4,classes=21,spatial_scale=0.0625,gamma=0.1,dtype=float32

(kernel/stride/pad/dil take `3` or `3x5`; omitted keys take the defaults in FIELDS; `deterministic=1`
names a call under torch.use_deterministic_algorithms, whose CUDA input-gradient scatter has no atomics,
and `precision=high` or `medium` one under that torch.set_float32_matmul_precision, whose float32 CUDA
GEMMs run on TF32 tensor cores; both are written only when set). Its tasks are
the KernelSpecs of its tunable stages, exactly as the ops ask for them: deform_conv2d's forward,
backward_data and backward_weight; deform_roi_pool's forward and backward. The input-gradient
scatters are shape-generic and keep their default schedules. deform_roi_pool kernels serve every RoI
count, so `r` is only the count they are measured with.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass

from dcn_tvm.geometry.conv import ConvGeometry, conv_geometry
from dcn_tvm.geometry.dcnv3 import DCNv3Geometry, dcnv3_geometry
from dcn_tvm.geometry.dtypes import DTYPES
from dcn_tvm.geometry.ms_deform_attn import Levels, ms_deform_attn_geometry, parse_levels
from dcn_tvm.geometry.roi_pool import RoIPoolGeometry, roi_pool_geometry
from dcn_tvm.kernels.spec import KernelSpec
from dcn_tvm.kernels.targets import target_kind


def _int(minimum: int, maximum: int | None = None):
    """A parser of decimal integers in [minimum, maximum]; raises ValueError describing what it expects."""
    kind = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"

    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text) or int(text) < minimum or (maximum is not None and int(text) > maximum):
            raise ValueError(kind)
        return int(text)

    return parse


def _pair(minimum: int):
    """A parser of `A` or `AxB` (integers >= minimum) into (A, A) or (A, B)."""
    number = _int(minimum)

    def parse(text: str) -> tuple[int, int]:
        parts = text.split("x")
        try:
            if len(parts) > 2:
                raise ValueError
            pair = [number(part) for part in parts]
        except ValueError:
            raise ValueError(f"an integer or AxB, each >= {minimum}") from None
        return pair[0], pair[-1]

    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("a number") from None


def _flag(text: str) -> int | None:
    """`1` -> 1; `0` -> None, so that an unset flag is left out of the canonical string."""
    if text not in ("0", "1"):
        raise ValueError("0 or 1")
    return int(text) or None


def _precision(text: str) -> str | None:
    """torch's float32 matmul precision; "highest" (exact) -> None, left out of the canonical string."""
    if text not in ("highest", "high", "medium"):
        raise ValueError("one of highest, high, medium")
    return None if text == "highest" else text


def _pair_text(pair) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


_size = _int(1)

#: Per operator: key -> (parse, default or None when required), in the canonical order.
FIELDS = {
    "deform_conv2d": {
        "n": (_size, None), "c": (_size, None), "h": (_size, None), "w": (_size, None), "o": (_size, None),
        "k": (_pair(1), None), "stride": (_pair(1), "1"), "pad": (_pair(0), "0"), "dil": (_pair(1), "1"),
        "groups": (_size, "1"), "offset_groups": (_size, "1"), "mask": (_int(0, 1), "0"), "dtype": (str, "float32"),
        "deterministic": (_flag, "0"), "precision": (_precision, "highest"),
    },
    "deform_roi_pool": {
        "r": (_size, None), "n": (_size, None), "c": (_size, None), "h": (_size, None), "w": (_size, None),
        "k": (_size, None), "group_size": (_size, "1"), "part_size": (_size, ""), "sampling_ratio": (_size, "4"),
        "classes": (_int(0), "0"), "spatial_scale": (_number, "1.0"), "gamma": (_number, "0.1"),
        "dtype": (str, "float32"), "deterministic": (_flag, "0"),
    },
}
STAGES = {"deform_conv2d": ("forward", "backward_data", "backward_weight"), "deform_roi_pool": ("forward", "backward")}


@dataclass(frozen=True)
class OperatorWorkloads:
    """What the workloads need to know of one operator, so that adding an operator adds an entry here
    and no branch below: its FIELDS, its tunable STAGES, the geometry a workload's values describe
    (built by the op's own checks), the sizes of the kernels the op asks for (None: the kernel serves
    every size) and those the tuner measures them with, and a geometry's values (but the sizes)."""

    fields: dict
    stages: tuple[str, ...]
    geometry: Callable[[dict], object]
    sizes: Callable[[dict], tuple]
    measured_sizes: Callable[[dict], tuple]
    values: Callable[[object], dict]


def _ms_deform_attn_geometry(v: dict):
    n, q, heads, head_dim, levels, points = v["n"], v["q"], v["heads"], v["head_dim"], v["levels"], v["points"]
    starts = [sum(h * w for h, w in levels[:index]) for index in range(len(levels))]
    return ms_deform_attn_geometry((n, sum(h * w for h, w in levels), heads, head_dim), levels, starts,
                                   (n, q, heads, len(levels), points, 2), (n, q, heads, len(levels), points),
                                   v["dtype"])


def _ms_deform_attn_sizes(v: dict) -> tuple:
    return ("n", v["n"]), ("q", v["q"])


def _dcnv3_geometry(v: dict) -> DCNv3Geometry:
    window = DCNv3Geometry(v["group"], v["group_channels"], v["k"], v["stride"], v["pad"], v["dil"], 1.0,
                           bool(v["remove_center"]), bool(v["packed"]), v["dtype"])
    out_h, out_w = (max(size, 1) for size in window.output_size(v["h"], v["w"]))
    return dcnv3_geometry((v["n"], v["h"], v["w"], window.channels), window.sampling_shapes(v["n"], out_h, out_w),
                          v["k"], v["stride"], v["pad"], v["dil"], v["group"], v["group_channels"],
                          v["offset_scale"], bool(v["remove_center"]), bool(v["packed"]), v["dtype"])


def _dcnv3_values(geo: DCNv3Geometry) -> dict:
    return dict(group=geo.group, group_channels=geo.group_channels, k=geo.kernel, stride=geo.stride,
                pad=geo.padding, dil=geo.dilation, offset_scale=geo.offset_scale,
                remove_center=int(geo.remove_center), packed=int(geo.packed))


def _dcnv3_sizes(v: dict) -> tuple:
    return ("n", v["n"]), ("h", v["h"]), ("w", v["w"])


#: The operators described by an OperatorWorkloads entry (deform_conv2d and deform_roi_pool are still
#: handled inline below).
OPERATORS = {
    # value [n, sum(H*W), heads, head_dim] over the levels `HxW+HxW+...`; q queries of `points` samples per level
    "ms_deform_attn": OperatorWorkloads(
        fields={"n": (_size, None), "q": (_size, None), "levels": (parse_levels, None), "heads": (_size, "8"),
                "head_dim": (_size, "32"), "points": (_size, "4"), "dtype": (str, "float32")},
        stages=("forward", "backward"),
        geometry=_ms_deform_attn_geometry,
        sizes=_ms_deform_attn_sizes,
        measured_sizes=_ms_deform_attn_sizes,
        values=lambda geo: dict(levels=Levels(geo.levels), heads=geo.heads, head_dim=geo.head_dim,
                                points=geo.points),
    ),
    # DCNv3 / DCNv4 (packed=1): input [n, h, w, group*group_channels], channels-last
    "dcnv3": OperatorWorkloads(
        fields={
            "n": (_size, None), "h": (_size, None), "w": (_size, None), "group": (_size, None),
            "group_channels": (_size, None), "k": (_pair(1), "3"), "stride": (_pair(1), "1"), "pad": (_pair(0), "1"),
            "dil": (_pair(1), "1"), "offset_scale": (_number, "1.0"), "remove_center": (_int(0, 1), "0"),
            "packed": (_int(0, 1), "0"), "dtype": (str, "float32"),
        },
        stages=("forward", "backward", "scatter"),
        geometry=_dcnv3_geometry,
        sizes=_dcnv3_sizes,
        measured_sizes=_dcnv3_sizes,
        values=_dcnv3_values,
    ),
}
FIELDS.update({op: entry.fields for op, entry in OPERATORS.items()})
STAGES.update({op: entry.stages for op, entry in OPERATORS.items()})
#: Every operator's tunable stages, by name (what `--stage` takes).
STAGE_NAMES = tuple(sorted({stage for stages in STAGES.values() for stage in stages}))
#: Deformable DETR's feature levels for an 800x1333 image: strides 8, 16, 32 and 64.
_DETR_LEVELS = "100x167+50x84+25x42+13x21"

PRESETS = {
    "tiny": (
        "deform_conv2d:n=1,c=64,h=32,w=32,o=64,k=3,stride=1,pad=1,dil=1,groups=1,offset_groups=1,mask=0,dtype=float32",
        "deform_conv2d:n=2,c=32,h=20,w=20,o=48,k=3,stride=1,pad=1,dil=1,groups=1,offset_groups=2,mask=1,dtype=float32",
    ),
    # ResNet-101's deformable conv5 (res5a/b/c branch2b, dilation 2 at stride 16) on a 600x1000 image:
    # the three layers share this shape.
    "resnet101-dcn": (
        "deform_conv2d:n=1,c=512,h=38,w=63,o=512,k=3,stride=1,pad=2,dil=2,groups=1,offset_groups=1,mask=0,"
        "dtype=float32",
    ),
    # Deformable R-FCN's class score pooling: 300 RoIs, 7x7 bins of 21 classes, class-aware offsets.
    "rfcn-dcn": (
        "deform_roi_pool:r=300,n=1,c=1029,h=38,w=63,k=7,group_size=7,part_size=7,sampling_ratio=4,classes=21,"
        "spatial_scale=0.0625,gamma=0.1,dtype=float32",
    ),
    # Deformable DETR's encoder layer (every one of the S = 22223 positions a query) and decoder layer
    # (300 object queries), M=8 heads of 32 channels, 4 points per level.
    "deformable-detr-encoder": (f"ms_deform_attn:n=1,q=22223,levels={_DETR_LEVELS},heads=8,head_dim=32,points=4,"
                                f"dtype=float32",),
    "deformable-detr-decoder": (f"ms_deform_attn:n=1,q=300,levels={_DETR_LEVELS},heads=8,head_dim=32,points=4,"
                                f"dtype=float32",),
}
# InternImage-T / -B's DCNv3 layers (3x3, pad 1; groups of 16 channels), stages 1-4 at 224x224 and at an
# 800x1216 detection image (strides 4-32); packed=1 is FlashInternImage's DCNv4 on the same shapes.
_INTERNIMAGE = {"t": (64, 4), "b": (112, 7)}
for _name, (_channels, _groups) in _INTERNIMAGE.items():
    PRESETS[f"internimage-{_name}"] = tuple(
        f"dcnv3:n=1,h={side_h // stride},w={side_w // stride},group={_groups * 2**level},group_channels=16,"
        f"k=3,pad=1,dtype=float32"
        for side_h, side_w in ((224, 224), (800, 1216)) for level, stride in enumerate((4, 8, 16, 32)))
PRESETS["flashinternimage-t"] = tuple(text + ",packed=1" for text in PRESETS["internimage-t"])



@dataclass(frozen=True)
class Task:
    """One tunable kernel: `spec` is what the library asks for (and names the record), `measured`
    the same kernel with every size concrete, which the tuner builds and times."""

    workload: Workload
    spec: KernelSpec
    measured: KernelSpec


@dataclass(frozen=True)
class Workload:
    op: str
    values: tuple[tuple[str, object], ...]  # parsed FIELDS values, canonical order

    @classmethod
    def parse(cls, text: str) -> Workload:
        """Parse `op:key=value,...`; raises ValueError naming the bad part."""
        op, _, body = text.strip().partition(":")
        if op not in FIELDS:
            raise ValueError(f"workload {text!r}: unknown operator {op!r}; expected one of {sorted(FIELDS)}")
        given = {}
        for item in filter(None, body.split(",")):
            key, eq, value = item.partition("=")
            if not eq or key.strip() not in FIELDS[op]:
                raise ValueError(f"workload {text!r}: bad item {item!r}; keys are {', '.join(FIELDS[op])}")
            given[key.strip()] = value.strip()
        missing = [key for key, (_, default) in FIELDS[op].items() if default is None and key not in given]
        if missing:
            raise ValueError(f"workload {text!r}: missing {', '.join(missing)}")
        values = []
        for key, (parse, default) in FIELDS[op].items():
            raw = given.get(key, default)
            try:
                values.append((key, parse(raw) if raw != "" else None))
            except ValueError as kind:
                raise ValueError(f"workload {text!r}: {key}={raw!r} is not {kind}") from None
        workload = cls(op, tuple(values))
        if dict(values)["dtype"] not in DTYPES:
            raise ValueError(f"workload {text!r}: dtype must be one of {DTYPES}")
        workload.geometry()  # the ops' own shape checks
        return workload

    def __str__(self) -> str:
        text = {tuple: _pair_text, type(None): lambda _: ""}
        return f"{self.op}:" + ",".join(f"{k}={text.get(type(v), str)(v)}" for k, v in self.values if v is not None)

    def geometry(self) -> ConvGeometry | RoIPoolGeometry | DCNv3Geometry:
        """The layer's geometry, built by the ops' own shape checks (dcn_tvm.geometry; ValueError/TypeError
        on bad shapes)."""
        v = dict(self.values)
        if self.op in OPERATORS:
            return OPERATORS[self.op].geometry(v)
        n, c, h, w, dtype = v["n"], v["c"], v["h"], v["w"], v["dtype"]
        if self.op == "deform_conv2d":
            (kh, kw), og, groups = v["k"], v["offset_groups"], v["groups"]
            if groups < 1 or og < 1 or c % groups or v["o"] % groups:
                raise ValueError(f"workload {self}: groups and offset_groups must be >= 1, and c ({c}) and o "
                                 f"({v['o']}) multiples of groups ({groups})")
            # Only the window arithmetic of this geometry is used, for the offset's shape (an empty
            # output is left to the op's check, which names the sizes).
            window = ConvGeometry(c, v["o"], (kh, kw), v["stride"], v["pad"], v["dil"], groups, og, False, dtype)
            oh, ow = (max(size, 1) for size in window.output_size(h, w))
            mask = (n, og * kh * kw, oh, ow) if v["mask"] else None
            return conv_geometry((n, c, h, w), (n, 2 * og * kh * kw, oh, ow), (v["o"], c // groups, kh, kw), mask,
                                 v["stride"], v["pad"], v["dil"], dtype)
        k, r, parts = v["k"], v["r"], v["part_size"] or v["k"]
        offset = (r, 2 * v["classes"], parts, parts) if v["classes"] else None
        return roi_pool_geometry((n, c, h, w), r, offset, k, v["spatial_scale"], v["group_size"], v["part_size"],
                                 v["sampling_ratio"], v["gamma"], dtype)

    def tasks(self, target: str) -> list[Task]:
        """The tunable kernels of this workload for a target key."""
        v, geo = dict(self.values), self.geometry()
        tasks = []
        for stage in STAGES[self.op]:
            if self.op in OPERATORS:
                spec = KernelSpec(self.op, stage, geo, OPERATORS[self.op].sizes(v), target, acc_dtype=geo.acc_dtype)
                measured = dataclasses.replace(spec, sizes=OPERATORS[self.op].measured_sizes(v))
            elif self.op == "deform_conv2d":
                exact = v["precision"] is None or v["dtype"] != "float32" or target_kind(target) != "cuda"
                spec = KernelSpec(self.op, stage, geo, (("n", v["n"]), ("h", v["h"]), ("w", v["w"])), target,
                                  precision="highest" if exact else v["precision"])
                measured = spec
            else:
                sizes = (("r", None), ("n", v["n"]), ("h", v["h"]), ("w", v["w"]))
                spec = KernelSpec(self.op, stage, geo, sizes, target, acc_dtype=geo.acc_dtype)
                measured = dataclasses.replace(spec, sizes=(("r", v["r"]),) + sizes[1:])
            tasks.append(Task(self, spec, measured))
        return tasks


def tunable(spec: KernelSpec) -> bool:
    """Whether `spec` is a kernel of some workload: a tunable stage at static sizes (but RoI count); the
    deterministic scatters keep their default schedules."""
    sizes = [value for name, value in spec.sizes if (spec.op, name) != ("deform_roi_pool", "r")]
    return spec.stage in STAGES.get(spec.op, ()) and None not in sizes and not spec.deterministic


def from_geometry(op: str, geo, deterministic: bool = False, precision: str = "highest", **sizes) -> Workload:
    """The workload of an `op` call with geometry `geo` and sizes (n, h, w; and r for deform_roi_pool),
    `deterministic` under torch.use_deterministic_algorithms, at a float32 matmul `precision`."""
    if op in OPERATORS:
        values = OPERATORS[op].values(geo)
    elif op == "deform_conv2d":
        values = dict(c=geo.in_channels, o=geo.out_channels, k=geo.kernel, stride=geo.stride, pad=geo.padding,
                      dil=geo.dilation, groups=geo.groups, offset_groups=geo.offset_groups, mask=int(geo.with_mask))
    else:
        values = dict(c=geo.in_channels, k=geo.output_size, group_size=geo.group_size,
                      part_size=geo.part_size or None, sampling_ratio=geo.sampling_ratio, classes=geo.num_classes,
                      spatial_scale=geo.spatial_scale, gamma=geo.gamma)
    values.update(sizes, dtype=geo.dtype, deterministic=int(deterministic) or None, precision=_precision(precision))
    return Workload(op, tuple((key, values[key]) for key in FIELDS[op]))


def of_spec(spec: KernelSpec, rois: int = 300) -> Workload:
    """The workload whose tasks include `spec` (a deform_roi_pool spec is measured with `rois` RoIs)."""
    sizes = {name: rois if value is None else value for name, value in spec.sizes}
    return from_geometry(spec.op, spec.geometry, spec.deterministic, spec.precision, **sizes)


def resolve(presets=(), strings=()) -> list[Workload]:
    """The workloads of `presets` and workload `strings`, each once, in order."""
    unknown = [name for name in presets if name not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; expected some of {sorted(PRESETS)}")
    texts = [text for name in presets for text in PRESETS[name]] + list(strings)
    return list(dict.fromkeys(Workload.parse(text) for text in texts))
