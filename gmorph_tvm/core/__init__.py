"""Neutral definitions every stage shares: tensor/task specs, targets and the host-architecture
check, the manifest format, weight provenance, Relax IR readers (op name, static shape, dtype,
byte counts, axes), the timing loop, device-code readers, TVM log handling. Imports nothing of
gmorph-tvm but :mod:`gmorph_tvm.errors`."""
