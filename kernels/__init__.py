"""Fused Triton kernels of gradicon_fast (the ``triton`` backend): ``gradicon_fast.kernels.ops``.

Importing this package needs only torch; ``gradicon_fast.kernels.ops`` needs triton. Set
``TRITON_INTERPRET=1`` before importing it to run the kernels on CPU tensors.
"""
