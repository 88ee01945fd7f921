"""Equivalence of two networks on a box (``onnx-exact check``): canonical forms over shared
variables, the unit correspondence, the product MILP, the sampled comparison and the report."""
