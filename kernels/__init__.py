"""Fused Triton kernels of gradicon_fast: the ``triton`` backend (``gradicon_fast.kernels.ops``).

Importing this package needs only torch; ``gradicon_fast.kernels.ops`` needs triton. With
``TRITON_INTERPRET=1`` set before that import the kernels run on CPU tensors (slowly).

Layout of the package, one concept per module:

* ``sampling``          per-point border-clamped (bi/tri)linear sampling: cells, gathers of the
                        2^d corners, gradients, second derivatives, atomic scatter of gradients;
* ``chain``             how a chain reaches a kernel (16 field slots, compile-time slot indices,
                        written once in a kernel's source as ``CHAIN``), the kernels' common
                        prologue, and the chain's evaluation / reverse pass through the fields;
* ``penalty_points``    the penalties' points ``id[::stride] + noise_scale · noise``, the noise
                        read or drawn in the kernel (``tl.randn4x(seed, point index)``);
* ``transform_points``, ``warp``, ``gradicon``, ``gradicon_analytic``, ``icon``, ``noise``:
                        the kernels, forward and backward (backward recomputes, stores nothing);
* ``tuning``            block sizes, autotuning configurations;
* ``ops``               the operators ``torch.ops.gradicon_fast_triton.*`` (``triton_op`` +
                        ``wrap_triton``; fake kernels and autograd from the op table
                        ``gradicon_fast.op_registry``) and the wrappers ``functional.py`` calls;
* ``aot_check``         compiles every kernel variant for a GPU target without a GPU
                        (``python -m gradicon_fast.kernels.aot_check``).
"""
