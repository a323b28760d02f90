"""Device code only (installed as ``qlty_gpu.kernels``).

One file per op family and implementation, paired with its launcher in ``qlty_gpu/ops/``:
``quilt_numba`` (numba CPU kernels) <-> ``ops/quilt_numba.py``, ``quilt_triton`` (Triton
kernels) <-> ``ops/quilt_triton.py``; ``_triton_common`` holds the @triton.jit helpers
the Triton files share (bf16 bits, load/cast, IEEE division, tile index). Nothing here
imports torch or qlty_gpu, allocates outputs or registers ops: the ops layer does that.
(``numba_quilt`` / ``triton_quilt`` are the old module names, kept importable.)
"""
