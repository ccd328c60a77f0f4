"""Neutral definitions every stage shares: tensor/task specs, targets, the manifest format,
weight provenance, TVM log handling. Imports nothing of gmorph-tvm but :mod:`gmorph_tvm.errors`."""
