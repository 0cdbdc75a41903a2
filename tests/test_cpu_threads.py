"""The CPU backward passes add to gradients from several threads without atomics: each thread owns
rows of every gradient (cpu_common.h, for_each_item_owning_rows) and defers points that would
leave them. A lost or doubled update would show here as a gradient off by one point's share, far
above the tolerances; thread counts above the core count interleave the threads arbitrarily, and
small fields make many points cross their slab and take the deferred path."""

import pytest
import torch

import gradicon_fast as gf
from gradicon_fast import reference as R

from conftest import leaves, random_points, relative_error, requires_cpu_kernels, smooth_field

pytestmark = requires_cpu_kernels

THREADS = [1, 2, 3, 7]


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield lambda n: torch.set_num_threads(n)
    torch.set_num_threads(before)


def _chain(rng, dtype, batch=2):
    sizes = [(23, 17, 19), (9, 12, 10), (31, 26, 29)]
    return leaves([smooth_field(rng, batch, s, 0.08, dtype, control=5) for s in sizes])


@pytest.mark.parametrize("n_threads", THREADS)
def test_gradicon_gradients_any_thread_count_float64(rng, threads, n_threads):
    ab, ba = _chain(rng, torch.float64), _chain(rng, torch.float64)
    shape = (21, 24, 18)
    noise = torch.randn((1, 3, *shape), generator=rng, dtype=torch.float64)
    ref = gf.gradicon_loss(ab, ba, shape=shape, noise=noise, backend="torch")
    want = torch.autograd.grad(ref, ab + ba)
    threads(n_threads)
    for _ in range(3):  # a race shows only in some runs
        loss = gf.gradicon_loss(ab, ba, shape=shape, noise=noise, backend="cpu")
        got = torch.autograd.grad(loss, ab + ba)
        assert abs(loss.item() - ref.item()) <= 1e-10 * abs(ref.item())
        for g, w in zip(got, want):
            assert relative_error(g, w) < 1e-10


@pytest.mark.parametrize("n_threads", THREADS[1:])
def test_gradicon_gradients_float32_match_one_thread(rng, threads, n_threads):
    # float32 through the default (vector) kernel: more threads only reorder the additions.
    ab, ba = _chain(rng, torch.float32), _chain(rng, torch.float32)
    shape = (30, 28, 33)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))

    def grads():
        gen = torch.Generator().manual_seed(seed)
        loss = gf.gradicon_loss(ab, ba, shape=shape, stride=2, generator=gen, backend="cpu")
        return [loss] + list(torch.autograd.grad(loss, ab + ba))

    threads(1)
    one = grads()
    threads(n_threads)
    many = grads()
    for g, w in zip(many, one):
        assert relative_error(g, w) < 1e-5


@pytest.mark.parametrize("n_threads", THREADS[1:])
def test_transform_points_gradients_any_thread_count(rng, threads, n_threads):
    chain = _chain(rng, torch.float64)
    points = random_points(rng, 2, 3, (17, 20, 15)).requires_grad_()
    grad_out = torch.randn((2, 3, 17, 20, 15), generator=rng, dtype=torch.float64)
    threads(n_threads)
    got = torch.autograd.grad(gf.transform_points(chain, points, backend="cpu"), chain + [points], grad_out)
    threads(1)
    want = torch.autograd.grad(R.transform_points(chain, points), chain + [points], grad_out)
    for g, w in zip(got, want):
        assert relative_error(g, w) < 1e-10
