"""Kernelized attention (Tay class KR): softmax replaced by a feature map, so attention is
computed as phi(Q) (phi(K)^T V) in time linear in N: `performer` (FAVOR+) and `linear`
(elu + 1). Helpers: ``features`` (the feature maps, FAVOR+'s random features) and ``product``
(the normalised product, bidirectional and chunked causal, and its dense form). Not to be
confused with effattn.kernels (Triton)."""
