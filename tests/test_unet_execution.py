"""How the U-Net steps run (gradicon_fast.nn.configure): checkpointing modes, channels-last, "auto" autocast."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradicon_fast.nn as gnn
from gradicon_fast.nn import unet_execution
from gradicon_fast.nn.unet import TallUNet

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (24, 20, 28)


def _model(**settings) -> gnn.GradICON:
    torch.manual_seed(0)
    model = gnn.standard_network(SHAPE, width=0.25)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lastConv" in name:  # non-zero fields, so that every step moves points
                p.normal_(0, 1e-2)
    return model.configure(**settings).train()


def _step(model: gnn.GradICON):
    gen = torch.Generator().manual_seed(1)
    A, B = torch.rand((2, 1, 1, *SHAPE), generator=gen)
    terms = model(A, B, generator=torch.Generator().manual_seed(3))
    terms.total.backward()
    stats = [t.clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)
             for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
    return terms.total.detach(), [p.grad.clone() for p in model.parameters()], stats


@pytest.mark.parametrize("mode", [True, "full", "selective"])
def test_checkpointing_equals_the_plain_step(mode):
    """Recomputation changes nothing: loss, every gradient and the BatchNorm statistics are bit-identical."""
    plain = _step(_model())
    checkpointed = _step(_model(checkpoint=mode))
    assert torch.equal(plain[0], checkpointed[0])
    for reference, other in zip(plain[1] + plain[2], checkpointed[1] + checkpointed[2]):
        assert torch.equal(reference, other)


class _OpsSeen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode, convolutions_rerun", [("full", True), ("selective", False)])
def test_selective_checkpointing_keeps_convolutions_and_recomputes_the_rest(mode, convolutions_rerun):
    net = gnn.unet_step(3, width=0.25)
    gnn.configure(net, checkpoint=mode)
    x = torch.rand((1, 1, 16, 16, 16), requires_grad=True)
    field = net.chain(x, x.detach() * 0.5)[0]
    seen = _OpsSeen()
    with seen:
        field.square().sum().backward()
    assert "leaky_relu" in seen.ops and "native_batch_norm" in seen.ops  # the cheap ops are recomputed
    assert ("convolution" in seen.ops) == convolutions_rerun


class _OutputDtypes(TorchDispatchMode):
    """The dtypes of each op's (first) output, by op name (BatchNorm's saved statistics stay float32)."""

    def __init__(self):
        super().__init__()
        self.dtypes = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(first, torch.Tensor) and first.is_floating_point():
            self.dtypes.setdefault(func.overloadpacket.__name__, set()).add(first.dtype)
        return out


# The ops of the U-Net's residual stream, skips and decoder (not the convolutions' own casts).
_STREAM_OPS = {"leaky_relu", "add", "cat", "upsample_trilinear3d", "upsample_bilinear2d"}


@pytest.mark.parametrize("dimension, shape", [(3, (1, 2, 13, 8, 10)), (2, (2, 2, 11, 14))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_autocast_runs_the_whole_unet_in_its_dtype(dimension, shape, channels_last):
    """Under bfloat16 autocast every op of the stream (sums, activations, upsampling, BatchNorm,
    concatenations) outputs bfloat16, as the convolutions do; without autocast nothing does."""
    torch.manual_seed(0)
    net = TallUNet(dimension, 2, dimension, encoder_channels=(4, 8, 8), decoder_channels=(8, 4, 4)).train()
    torch.nn.init.normal_(net.lastConv.weight, 0, 0.1)
    memory_format = torch.channels_last_3d if dimension == 3 else torch.channels_last
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=memory_format) if channels_last else x
    plain = _OutputDtypes()
    with plain:
        reference = net(x)
    low = _OutputDtypes()
    with low, torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x.clone().requires_grad_())
    assert reference.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert all(torch.bfloat16 not in dtypes for dtypes in plain.dtypes.values())
    stream = {name: dtypes for name, dtypes in low.dtypes.items()
              if name in _STREAM_OPS or "batch_norm" in name}
    assert "add" in stream and "cat" in stream and any("batch_norm" in name for name in stream)
    assert all(dtypes == {torch.bfloat16} for dtypes in stream.values()), stream
    # bfloat16 keeps 8 significant bits: the result agrees with float32 to a few of its ulps
    scale = float(reference.detach().abs().max())
    torch.testing.assert_close(out.detach().float(), reference.detach(), rtol=0, atol=0.05 * scale)
    out.float().square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("dimension, shape", [(3, (1, 2, 6, 5, 2)), (2, (1, 2, 6, 2))])
def test_low_precision_weight_gradients_of_one_voxel_long_inputs_are_sound(dimension, shape):
    """A strided convolution whose input is one voxel long on its last axis (here the second
    level's) gets a weight gradient close to float32's on every pass: oneDNN's bfloat16 one held
    garbage in the taps that see only padding (NaN or up to 1e37, in most passes)."""
    torch.manual_seed(0)
    net = TallUNet(dimension, 2, dimension, encoder_channels=(16, 64), decoder_channels=(16, 16)).eval()
    torch.nn.init.normal_(net.lastConv.weight, 0, 0.1)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))

    def weight_gradient(autocast: bool) -> torch.Tensor:
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = net(x)
        (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        return net.downConvs[1].weight.grad.clone()

    reference = weight_gradient(False)
    for _ in range(12):
        got = weight_gradient(True)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, reference, rtol=0, atol=0.05 * float(reference.abs().max()))


def test_channels_last_agrees_with_contiguous():
    def run(channels_last):
        torch.manual_seed(0)
        net = TallUNet(3, 2, 3, encoder_channels=(4, 8, 16, 32, 64), decoder_channels=(32, 16, 8, 4, 4)).train()
        torch.nn.init.normal_(net.lastConv.weight, 0, 0.1)
        step = gnn.DisplacementField(net)
        gnn.configure(step, channels_last=channels_last)
        x = torch.rand((1, 1, *SHAPE), generator=torch.Generator().manual_seed(2))
        field = step.chain(x, x.flip(2))[0]
        weights = torch.arange(field.numel(), dtype=torch.float32).reshape(field.shape).sin()
        (field * weights).sum().backward()
        return field, {n: p.grad for n, p in net.named_parameters()}, net

    field, grads, _ = run(False)
    field_cl, grads_cl, net_cl = run(True)
    assert field_cl.is_contiguous()  # the fused ops get the usual layout
    assert net_cl.downConvs[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    field, field_cl = field.detach(), field_cl.detach()
    torch.testing.assert_close(field_cl, field, rtol=1e-5, atol=1e-6 * float(field.abs().max()))
    for name, grad in grads.items():
        if name.startswith(("downConvs", "upConvs")) and name.endswith("bias"):
            continue  # biases before a BatchNorm: zero up to rounding
        torch.testing.assert_close(grads_cl[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()))


def test_auto_precision_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(unet_execution, "_cpu_has_native_bfloat16", lambda: True)
    assert unet_execution.autocast_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(unet_execution, "_cpu_has_native_bfloat16", lambda: False)
    assert unet_execution.autocast_dtype("auto", cpu) is None
    # without native bf16 "auto" is the float32 step, bit for bit
    plain = _step(_model())
    auto = _step(_model(amp_dtype="auto"))
    assert torch.equal(plain[0], auto[0])
    assert unet_execution.autocast_dtype(torch.float16, cpu) == torch.float16
    assert unet_execution.autocast_dtype(None, cpu) is None


def test_fast_defaults_and_grow_carry_the_settings():
    model = gnn.fast_defaults(gnn.standard_network((16, 16, 16), steps=3, width=0.25))
    grown = gnn.grow(model)
    for step in gnn.displacement_fields(grown):
        assert (step.amp_dtype, step.checkpoint, step.channels_last) == ("auto", "selective", True)
        assert step.net.lastConv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    gnn.configure(grown, channels_last=False, checkpoint=False, amp_dtype=None)
    for step in gnn.displacement_fields(grown):
        assert (step.amp_dtype, step.checkpoint, step.channels_last) == (None, False, False)
        assert step.net.lastConv.weight.is_contiguous()


@pytest.mark.parametrize("settings, message", [(dict(checkpoint="some"), "checkpoint must be one of"),
                                               (dict(amp_dtype="bf16"), "amp_dtype must be")])
def test_configure_rejects_unknown_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        gnn.standard_network((16, 16), width=0.25).configure(**settings)


def test_fast_defaults_while_plain_applies_to_plain_models_only_and_restores():
    from gradicon_fast.nn.networks import fast_defaults_while_plain

    model = gnn.standard_network((16, 16, 16), width=0.25)
    with fast_defaults_while_plain(model):
        settings = {(s.amp_dtype, s.checkpoint, s.channels_last) for s in gnn.displacement_fields(model)}
        assert settings == {("auto", "selective", True)}
    for step in gnn.displacement_fields(model):
        assert (step.amp_dtype, step.checkpoint, step.channels_last) == (None, False, False)
        assert step.net.lastConv.weight.is_contiguous()
    model.configure(checkpoint=True)  # the caller's own choice stays
    with fast_defaults_while_plain(model):
        assert {(s.amp_dtype, s.checkpoint, s.channels_last) for s in gnn.displacement_fields(model)} == \
            {(None, "full", False)}


def test_the_trainer_passes_the_execution_settings(tmp_path):
    from gradicon_fast.data import SyntheticPairDataset
    from gradicon_fast.train import TrainConfig, Trainer

    model = gnn.standard_network((16, 16), width=0.25)
    config = TrainConfig(steps=0, amp="auto", checkpoint_activations="selective", channels_last=True, progress=False,
                         tensorboard=False, device="cpu")
    Trainer(model, SyntheticPairDataset(2, (16, 16)), tmp_path, config)
    for step in gnn.displacement_fields(model):
        assert (step.amp_dtype, step.checkpoint, step.channels_last) == ("auto", "selective", True)
