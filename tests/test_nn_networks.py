"""Structure and semantics of the networks: tall U-Net, steps, TwoStep/Downsample, results, grow, I/O."""

import pytest
import torch
import torch.nn.functional as F

import gradicon_fast as gf
import gradicon_fast.nn as gnn
from gradicon_fast.nn.networks import RegistrationModule


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb(model, std=0.01, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for step in gnn.displacement_fields(model):
            step.net.lastConv.weight.normal_(0, std)
            step.net.lastConv.bias.normal_(0, std)
    return model


# ---- tall U-Net -----------------------------------------------------------------------------


def test_unet_channels_follow_the_paper():
    net = gnn.TallUNet(3)
    assert [c.out_channels for c in net.downConvs] == [16, 32, 64, 256, 512]
    assert [c.in_channels for c in net.downConvs] == [2, 16, 32, 64, 256]
    # decoder, deepest first: 256, 128, 64, 32, 16, each followed by concatenation of the skip
    assert [net.upConvs[i].out_channels for i in reversed(range(5))] == [256, 128, 64, 32, 16]
    assert [net.upConvs[i].in_channels for i in reversed(range(5))] == [512, 512, 192, 96, 48]
    assert all(c.kernel_size == (3, 3, 3) and c.stride == (2, 2, 2) and c.padding == (1, 1, 1) for c in net.downConvs)
    assert all(c.kernel_size == (4, 4, 4) and c.stride == (2, 2, 2) and c.padding == (1, 1, 1) for c in net.upConvs)
    assert [b.num_features for b in net.batchNorms] == [16, 32, 64, 128, 256]
    assert net.lastConv.in_channels == 18 and net.lastConv.out_channels == 3 and net.lastConv.kernel_size == (3, 3, 3)
    assert not net.lastConv.weight.any() and not net.lastConv.bias.any()


@pytest.mark.parametrize("shape", [(13, 7), (1, 5), (64, 33), (5, 9, 3), (11, 2, 1)])
def test_unet_any_input_size(shape):
    net = gnn.TallUNet(len(shape), encoder_channels=(4, 4, 8, 8, 8), decoder_channels=(8, 8, 4, 4, 4))
    x = torch.rand(2, 2, *shape)
    assert net(x).shape == (2, len(shape), *shape)
    assert not net(x).any()  # zero-initialised last layer


def _reference_unet_forward(net, x):
    """docs/conventions.md §5 written out step by step, independently of TallUNet.forward (inputs with even sizes)."""
    d = x.ndim - 2
    pool = F.avg_pool2d if d == 2 else F.avg_pool3d
    skips = []
    for i, conv in enumerate(net.downConvs):
        skips.append(x)
        y = conv(F.leaky_relu(x, 0.01))
        r = pool(x, 2, ceil_mode=True)
        r = torch.cat([r.new_zeros(r.shape[0], y.shape[1] - r.shape[1], *r.shape[2:]), r], 1)
        x = y + r
    for i in reversed(range(len(net.upConvs))):
        y = net.upConvs[i](F.leaky_relu(x, 0.01))
        up = F.interpolate(x[:, :y.shape[1]], scale_factor=2, mode="bilinear" if d == 2 else "trilinear",
                           align_corners=False)
        x = net.batchNorms[i](y + up)
        x = torch.cat([x, skips[i]], 1)
    return net.lastConv(x) / 10


def test_unet_matches_the_written_out_spec():
    torch.manual_seed(0)
    net = gnn.TallUNet(2)
    torch.nn.init.normal_(net.lastConv.weight, std=0.1)
    x = torch.rand(2, 2, 64, 32)
    assert torch.allclose(net(x), _reference_unet_forward(net, x), atol=1e-6)


# ---- TwoStep / Downsample / chains ----------------------------------------------------------


class Recorder(RegistrationModule):
    """Returns a fixed field (at the input's resolution) and records what it was fed."""

    def __init__(self, value):
        super().__init__()
        self.value = value
        self.calls = []

    def chain(self, moving, fixed):
        self.calls.append((moving.clone(), fixed.clone()))
        d = moving.ndim - 2
        field = torch.zeros(moving.shape[0], d, *moving.shape[2:])
        field[:, 0] = self.value
        return [field]


def test_twostep_warps_moving_by_the_first_chain():
    P, Q = Recorder(0.1), Recorder(-0.05)
    net = gnn.TwoStep(P, Q)
    A, B = torch.rand(1, 1, 16, 12), torch.rand(1, 1, 16, 12)
    chain = net.chain(A, B)
    assert len(chain) == 2 and chain[0][0, 0, 0, 0] == pytest.approx(0.1) and chain[1][0, 0, 0, 0] == pytest.approx(-0.05)
    fed_moving, fed_fixed = Q.calls[0]
    assert torch.equal(fed_fixed, B)
    assert torch.allclose(fed_moving, gf.warp(A, [P.calls[0][0].new_zeros(1, 2, 16, 12) + chain[0]]))


def test_downsample_pools_with_ceil_and_keeps_fields():
    child = Recorder(0.2)
    net = gnn.Downsample(child)
    A, B = torch.rand(1, 1, 15, 10), torch.rand(1, 1, 15, 10)
    chain = net.chain(A, B)
    moving, fixed = child.calls[0]
    assert moving.shape == (1, 1, 8, 5)
    assert torch.allclose(moving, F.avg_pool2d(A, 2, ceil_mode=True))
    assert chain[0].shape == (1, 2, 8, 5)  # used as is: sampled at full-resolution [0, 1] coordinates


@pytest.mark.parametrize("steps", [3, 4])
def test_standard_network_chain_layout(steps):
    model = gnn.standard_network((32, 24), steps=steps, width=0.25)
    result = model.register(torch.rand(2, 1, 32, 24), torch.rand(2, 1, 32, 24))
    shapes = [tuple(f.shape) for f in result.chain_AB]
    expected = [(2, 2, 8, 6), (2, 2, 16, 12), (2, 2, 32, 24), (2, 2, 32, 24)][:steps]
    assert shapes == expected
    assert len(result.chain_BA) == steps
    assert all(f.dtype == torch.float32 for f in result.chain_AB)
    assert not any(f.any() for f in result.chain_AB)  # zero-initialised: the identity at first


def test_directions_are_the_network_run_both_ways():
    model = perturb(gnn.standard_network((24, 16), width=0.25)).eval()
    A, B = torch.rand(1, 1, 24, 16), torch.rand(1, 1, 24, 16)
    result = model.register(A, B)
    swapped = model.register(B, A)
    for f, g in zip(result.chain_AB, swapped.chain_BA):
        assert torch.allclose(f, g)


# ---- RegistrationResult ---------------------------------------------------------------------


def test_registration_result_methods():
    model = perturb(gnn.standard_network((24, 16), width=0.25), std=0.03).eval()
    A, B = torch.rand(2, 1, 24, 16), torch.rand(2, 1, 24, 16)
    with torch.no_grad():
        r = model.register(A, B)
    assert torch.allclose(r.warp(A), gf.warp(A, r.chain_AB))
    assert torch.allclose(r.warp(B, "BA"), gf.warp(B, r.chain_BA))
    # full-resolution image of the same field of view: same chains, output on B's finer grid
    assert r.warp(torch.rand(2, 1, 47, 31), shape=(47, 31)).shape == (2, 1, 47, 31)
    disp = r.displacement("AB")
    identity = gf.identity_map((24, 16))
    assert torch.allclose(r.map("AB"), disp + identity)
    assert torch.allclose(disp, gf.compose(r.chain_AB, (24, 16)))
    points = torch.rand(2, 2, 7)
    assert torch.allclose(r.transform_points(points), gf.transform_points(r.chain_AB, points))
    labels = torch.randint(0, 4, (2, 1, 24, 16))
    warped = r.warp_labels(labels)
    assert warped.dtype == torch.int64 and set(warped.unique().tolist()) <= {0, 1, 2, 3}
    assert torch.equal(warped.float(), gf.warp(labels.float(), r.chain_AB, mode="nearest"))
    assert float(r.fold_percentage()) == float(gf.fold_percentage(r.map()))
    assert r.swapped().chain_AB is r.chain_BA


# ---- grow, precision, checkpointing, I/O ----------------------------------------------------


def test_grow_keeps_weights_and_output():
    model3 = perturb(gnn.standard_network((24, 16), steps=3, width=0.25))
    model4 = gnn.grow(model3)
    assert model4.config["steps"] == 4 and len(gnn.displacement_fields(model4)) == 4
    assert model4.regis_net.netPhi is model3.regis_net  # shared, not copied
    p3 = {id(p) for p in model3.parameters()}
    assert p3 < {id(p) for p in model4.parameters()}
    A, B = torch.rand(2, 1, 24, 16), torch.rand(2, 1, 24, 16)
    noise = torch.randn(model3.noise_shape())
    t3, t4 = model3(A, B, noise=noise), model4(A, B, noise=noise)
    assert torch.allclose(t3.total, t4.total, rtol=1e-6)  # the new U4 starts as the identity
    with pytest.raises(ValueError):
        gnn.grow(model4)


def test_checkpointing_gives_the_same_loss_grads_and_batchnorm_stats():
    torch.manual_seed(0)
    A, B = torch.rand(2, 1, 24, 16), torch.rand(2, 1, 24, 16)
    noise = torch.randn(1, 2, 12, 8)
    results = []
    for checkpoint in (False, True):
        torch.manual_seed(1)
        model = perturb(gnn.standard_network((24, 16), width=0.25)).configure(checkpoint=checkpoint)
        terms = model(A, B, noise=noise)
        terms.total.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        stats = torch.cat([b.flatten().float() for n, b in model.named_buffers()])
        results.append((terms.total.detach(), grads, stats))
    (t0, g0, s0), (t1, g1, s1) = results
    assert torch.allclose(t0, t1) and torch.allclose(g0, g1, atol=1e-6) and torch.equal(s0, s1)


def test_bf16_autocast_runs_the_unets_only():
    model = perturb(gnn.standard_network((24, 16), width=0.25)).configure(amp_dtype=torch.bfloat16)
    A, B = torch.rand(1, 1, 24, 16), torch.rand(1, 1, 24, 16)
    seen = []
    hook = gnn.displacement_fields(model)[0].net.downConvs[0].register_forward_hook(
        lambda m, i, o: seen.append(o.dtype))
    result = model.register(A, B)
    hook.remove()
    assert seen and seen[0] == torch.bfloat16
    assert all(f.dtype == torch.float32 for f in result.chain_AB)
    terms = model(A, B, generator=torch.Generator().manual_seed(0))
    assert terms.total.dtype == torch.float32 and torch.isfinite(terms.total)
    terms.total.backward()


def test_save_and_load_model(tmp_path):
    model = perturb(gnn.standard_network((24, 16), steps=3, width=0.25, lmbda=0.7, similarity="mse"))
    path = tmp_path / "m.pt"
    gnn.save_model(model, path)
    loaded = gnn.load_model(path)
    assert loaded.config == model.config and loaded.lmbda == 0.7 and loaded.similarity.name == "mse"
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
