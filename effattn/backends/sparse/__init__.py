"""Fixed sparse patterns (Tay class FP): `local`, `strided`, `bigbird`, with their blocked torch
path (``blocked``) and the choice between it and the Triton block-sparse kernel (``dispatch``)."""
