"""Spec -> kernel: naming, resolution (in-process cache, disk cache, compile), and the DLPack call."""
