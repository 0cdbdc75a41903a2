"""Sums and means whose rounding does not depend on the number of threads.

torch's CPU reduction of a whole tensor to one value splits the elements among the threads and
adds the per-thread results (two passes), so the rounded result changes with
``torch.set_num_threads``: by a few ulps, which an optimiser such as Adam grows, over hundreds of
steps, into visibly different registrations. A reduction along the rows of a 2D tensor instead
gives each row to one thread whole, however many threads there are. So these functions sum
fixed-size chunks, then the chunk sums (again in chunks, until few enough remain for one serial
sum): the same bits for any thread count, at the cost of one more pass over the chunk sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Elements per chunk: below torch's parallel grain (32768), so the last, single-row sum is serial.
CHUNK = 4096


def fixed_order_sum(x: Tensor) -> Tensor:
    """The sum of all elements of ``x`` (a 0-d tensor), added in an order independent of the thread count."""
    flat = x.reshape(-1)
    while flat.numel() > CHUNK:
        pad = (-flat.numel()) % CHUNK
        if pad:
            flat = F.pad(flat, (0, pad))
        flat = flat.view(-1, CHUNK).sum(dim=1)
    return flat.sum()


def fixed_order_mean(x: Tensor) -> Tensor:
    """The mean of all elements of ``x``, as :func:`fixed_order_sum`."""
    return fixed_order_sum(x) / x.numel()
