"""torch.compile(fullgraph=True) through the public API on the fused CPU ops: the same values and
gradients as eager (the ops' fake kernels let the whole function trace as one graph)."""

import pytest
import torch

import gradicon_fast as gf
from gradicon_fast import reference as R

from conftest import leaves, rand_uniform, random_field, random_points, requires_cpu_kernels

pytestmark = requires_cpu_kernels


@pytest.mark.parametrize("dtype", [torch.float32])
def test_compiled_equals_eager(rng, dtype):
    torch._dynamo.reset()
    d = 3
    ab = [random_field(rng, 2, (4, 5, 6), 0.05, dtype), random_field(rng, 1, (3, 4, 5), 0.05, dtype)]
    ba = [random_field(rng, 2, (5, 4, 3), 0.05, dtype)]
    shape = (5, 6, 4)
    noise = torch.randn(1, d, *shape, generator=rng, dtype=torch.float64).to(dtype)
    sparse = torch.randn(1, d, *R.loss_points_shape(shape, 2), generator=rng, dtype=torch.float64).to(dtype)
    points = random_points(rng, 2, d, (7, 2), dtype=dtype)
    image = rand_uniform(rng, (1, 2, 6, 5, 4), dtype=dtype)

    def objective(a1, a2, b1, x, img):
        reg = gf.gradicon_loss([a1, a2], [b1], shape=shape, noise=noise, backend="cpu")
        reg = reg + gf.gradicon_loss([a1, a2], [b1], shape=shape, stride=2, noise=sparse, symmetric=True,
                                     backend="cpu")
        reg = reg + gf.icon_loss([a1, a2], [b1], shape=shape, noise=noise, backend="cpu")
        y = gf.transform_points([a1, a2], x, backend="cpu")
        warped = gf.warp(img, [b1], shape=(3, 5, 4), backend="cpu")
        return reg + (y ** 2).mean() + (warped ** 2).mean()

    compiled = torch.compile(objective, fullgraph=True)
    for _ in range(2):  # the second call runs the cached graph
        xs = leaves(ab + ba + [points, image])
        got = compiled(*xs)
        got_grads = torch.autograd.grad(got, xs)
        ys = leaves(ab + ba + [points, image])
        expected = objective(*ys)
        expected_grads = torch.autograd.grad(expected, ys)
        # the same kernels run in both: equal up to the summation order of the graph's adds
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        for g, e in zip(got_grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9)
        ab = [f * 1.1 for f in ab]  # new values, same shapes


# ---- the default backend and the penalty's own noise under torch.compile --------------------------


def _ops_in_graph(seen):
    """A torch.compile backend that records which gradicon_fast ops each compiled graph calls."""
    def backend(gm, example_inputs):
        seen.append(sorted({str(n.target) for n in gm.graph.nodes
                            if n.op == "call_function" and str(n.target).startswith("gradicon_fast.")}))
        return gm.forward
    return backend


def test_default_backend_traces_and_follows_use_backend(rng):
    # No backend= argument: the choice of use_backend is read while tracing, and a call under
    # another choice compiles anew (the graph is guarded on it) instead of reusing a stale graph.
    torch._dynamo.reset()
    ab, ba = [random_field(rng, 1, (4, 5, 6), 0.05, torch.float32)], [random_field(rng, 1, (5, 4, 6), 0.05, torch.float32)]
    noise = torch.randn(1, 3, 4, 5, 6, generator=rng)

    def objective(a, b):
        return gf.gradicon_loss([a], [b], shape=(4, 5, 6), stride=1, noise=noise) + gf.transform_points([a], b).mean()

    seen = []
    compiled = torch.compile(objective, fullgraph=True, backend=_ops_in_graph(seen))
    fused = compiled(ab[0], ba[0])
    with gf.use_backend("torch"):
        reference = compiled(ab[0], ba[0])
        torch.testing.assert_close(reference, objective(ab[0], ba[0]), rtol=0, atol=0)
    again = compiled(ab[0], ba[0])
    assert seen == [["gradicon_fast.gradicon_loss", "gradicon_fast.transform_points"], []]  # the third call reused the first graph
    torch.testing.assert_close(fused, objective(ab[0], ba[0]), rtol=0, atol=0)
    torch.testing.assert_close(again, fused, rtol=0, atol=0)


def _penalties(a1, a2, b1, generator):
    """Every penalty that draws its own noise, on the default backend, twice the same call (two draws)."""
    shape = (5, 6, 4)
    loss = gf.gradicon_loss([a1, a2], [b1], shape=shape, stride=2, symmetric=True, generator=generator)
    loss = loss + 2 * gf.gradicon_loss([a1, a2], [b1], shape=shape, stride=2, symmetric=True, generator=generator)
    loss = loss + gf.gradicon_loss([a1, a2], [b1], shape=shape, mode="analytic", generator=generator)
    return loss + gf.icon_loss([a1, a2], [b1], shape=shape, generator=generator)


def _fields(rng):
    return leaves([random_field(rng, 1, (4, 5, 6), 0.05, torch.float32), random_field(rng, 1, (3, 4, 5), 0.05, torch.float32),
                   random_field(rng, 1, (5, 4, 3), 0.05, torch.float32)])


def test_generator_noise_is_drawn_per_call_like_eager(rng):
    # fullgraph, Inductor, a generator and no noise: each compiled call draws new noise from the
    # generator, the same numbers as the eager calls from the same state, and leaves the generator
    # where eager leaves it (no draw merged, dropped, reordered or baked into the graph).
    torch._dynamo.reset()
    xs = _fields(rng)
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    compiled = torch.compile(_penalties, fullgraph=True)
    gen_compiled, gen_eager = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    got = [compiled(*xs, gen_compiled) for _ in range(3)]
    want = [_penalties(*xs, gen_eager) for _ in range(3)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=0)
    assert len({float(v) for v in want}) == 3  # new noise every call
    assert torch.equal(gen_compiled.get_state(), gen_eager.get_state())
    torch.testing.assert_close(torch.autograd.grad(got[0], xs), torch.autograd.grad(want[0], xs), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_global_and_new_generators_under_compile(rng, backend):
    # Without a generator the draws come from the global generator, as in eager; another
    # generator object compiles anew and is drawn from, never the first one. The reference draws
    # torch.randn noise from the generator the same way (aot_eager: the graph as traced).
    torch._dynamo.reset()
    xs = _fields(rng)

    def loss(a1, a2, b1, generator):
        return gf.gradicon_loss([a1, a2], [b1], shape=(5, 6, 4), stride=2, generator=generator, backend=backend)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with torch.random.fork_rng():
        torch.manual_seed(7)
        got = [compiled(*xs, None) for _ in range(2)]
        torch.manual_seed(7)
        want = [loss(*xs, None) for _ in range(2)]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert got[0] != got[1]
    for seed in (3, 4):
        first, second = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        torch.testing.assert_close(compiled(*xs, first), loss(*xs, second), rtol=1e-6, atol=0)
        assert torch.equal(first.get_state(), second.get_state())


# ---- the networks under torch.compile ----------------------------------------------------------


def _relative_difference(got, want):
    num = sum(((g - w) ** 2).sum() for g, w in zip(got, want)) ** 0.5
    return float(num / sum((w ** 2).sum() for w in want) ** 0.5)


def test_unet_compiles_for_symbolic_sizes(rng):
    # dynamic=True (as one U-Net compiled for several sizes also becomes): the U-Net specialises
    # its spatial sizes, since Inductor's CPU lowering of strided 3-D convolutions fails on
    # symbolic ones ("ValueRangeError: Invalid ranges"). The same values as eager, and a backward.
    from gradicon_fast.nn import TallUNet

    torch._dynamo.reset()
    net = TallUNet(3, 2, 3, encoder_channels=(2, 4), decoder_channels=(4, 2))
    torch.nn.init.normal_(net.lastConv.weight, std=0.1, generator=rng)
    net.eval()
    compiled = torch.compile(net, dynamic=True)
    x = rand_uniform(rng, (2, 2, 5, 6, 7), dtype=torch.float32)
    got = compiled(x)
    torch.testing.assert_close(got, net(x), rtol=1e-5, atol=1e-7)
    grads = torch.autograd.grad(got.square().sum(), list(net.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


def _standard_network_pair(rng, shape):
    import copy

    import gradicon_fast.nn as gnn

    model = gnn.standard_network(shape, width=1 / 16)
    for step in gnn.displacement_fields(model):  # the last layers start at zero: give every U-Net a say
        torch.nn.init.normal_(step.net.lastConv.weight, std=0.01, generator=rng)
    return model, copy.deepcopy(model)


def test_standard_network_training_step_compiled(rng):
    # torch.compile(model) of the standard network, one graph (fullgraph) with the penalty's noise
    # drawn from a generator: two training steps (train mode, SGD) match eager in the loss terms,
    # the gradients and the BatchNorm statistics. aot_eager: Dynamo and AOTAutograd as Inductor gets
    # them (Inductor compiles the whole network in minutes on two cores; it is measured in
    # benchmarks/compile_step.py). The float32 differences come from decomposed ops.
    torch._dynamo.reset()
    shape = (12, 12, 12)
    model, twin = _standard_network_pair(rng, shape)
    model.configure(checkpoint=True)  # recomputation in the compiled backward; BatchNorm stats updated once
    twin.configure(checkpoint=True)
    A, B = (rand_uniform(rng, (2, 1, *shape), dtype=torch.float32) for _ in range(2))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    sides = [(compiled, model, torch.Generator().manual_seed(seed)), (twin, twin, torch.Generator().manual_seed(seed))]
    # SGD: Adam would turn the rounding-level gradients of the biases before BatchNorm into full steps.
    # Before the second step the compiled model gets the eager twin's weights: one step from
    # rounding-level different gradients moves the tiny network's BatchNorm batch statistics enough
    # to change the next gradients by up to 2 % (chaotic, not a compile error), so each step compares
    # the compiled and eager graphs on the same weights. Bound: twenty times the largest difference
    # seen (5e-5); a wrong formula is O(1).
    optimizers = [torch.optim.SGD(m.parameters(), lr=1e-2) for _, m, _ in sides]
    for step in range(2):
        if step:
            with torch.no_grad():
                for mine, theirs in zip(model.parameters(), twin.parameters()):
                    mine.copy_(theirs)
        terms, grads = [], []
        for (run, module, generator), optimizer in zip(sides, optimizers):
            optimizer.zero_grad()
            out = run(A, B, generator=generator)
            out.total.backward()
            terms.append(torch.stack(list(out)).detach())
            grads.append([p.grad for p in module.parameters()])
            optimizer.step()
        torch.testing.assert_close(terms[0], terms[1], rtol=1e-4, atol=1e-5)
        assert _relative_difference(*grads) < 1e-3
    for got, want in zip(model.buffers(), twin.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_instance_optimization_with_compiled_model(rng):
    # instance_optimize takes torch.compile(model): the same losses and registration as eager,
    # and the weights restored afterwards.
    from gradicon_fast.train import instance_optimize

    torch._dynamo.reset()
    shape = (12, 12, 12)
    model, twin = _standard_network_pair(rng, shape)
    before = [p.detach().clone() for p in model.parameters()]
    A, B = (rand_uniform(rng, (1, 1, *shape), dtype=torch.float32) for _ in range(2))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got, got_losses = instance_optimize(compiled, A, B, steps=3, lr=1e-3, generator=torch.Generator().manual_seed(5),
                                        return_losses=True)
    want, want_losses = instance_optimize(twin, A, B, steps=3, lr=1e-3, generator=torch.Generator().manual_seed(5),
                                          return_losses=True)
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-5, atol=0)
    assert len(set(want_losses)) == len(want_losses)  # the weights moved
    assert _relative_difference(got.chain_AB + got.chain_BA, want.chain_AB + want.chain_BA) < 1e-4
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_unet_one_voxel_level_compiles_with_inductor(rng):
    # The paper's widths at 16³ reach a 1-voxel level, where Inductor could not generate the CPU
    # code of the upsampling's backward (with two threads); the U-Net copies that voxel instead.
    from gradicon_fast.nn import TallUNet

    torch._dynamo.reset()
    net = TallUNet(3, 2, 3)
    x = rand_uniform(rng, (1, 2, 16, 16, 16), dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = torch.compile(net)(x)
        got.sum().backward()
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, net(x), rtol=1e-5, atol=1e-6)
