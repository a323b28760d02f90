"""Device code only (installed as ``qlty_gpu.kernels``).

Numba CPU kernels (``numba_quilt``) and Triton kernels (``triton_quilt``). Nothing here
imports torch or qlty_gpu, allocates outputs or registers ops: the ops layer does that.
"""
