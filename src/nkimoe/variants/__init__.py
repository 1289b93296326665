"""Variant families: the torch references and, per op family, the Trn2 and Trn3 NKI kernels."""
