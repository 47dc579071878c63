"""The static geometry of each operator's layer: the types compute, kernels and ops share, and the
checks that build them from sizes (no torch, no TVM: the bottom of the package, above `_tvm.py`).

    dtypes.py     the dtypes kernels exist for, and what each accumulates in
    arguments.py  checks of the scalar arguments (ints, pairs, finite numbers) and of shapes
    conv.py       ConvGeometry, and the checks of a deform_conv2d call's shapes that build it
    roi_pool.py   RoIPoolGeometry, and the checks of a deform_roi_pool call's shapes that build it
"""
