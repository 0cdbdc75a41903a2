"""Instance optimisation redoes a step in float32 when reduced-precision gradients are not finite.

bfloat16 channels-last convolutions on the CPU now and then return NaN weight gradients with a
finite loss; a hook stands in for that failure here, so that the test does not depend on when it happens.
"""

import pytest
import torch

import gradicon_fast.nn as gnn
from gradicon_fast.nn.networks import displacement_fields
from gradicon_fast.train import instance_optimize

SHAPE = (24, 16)


def model_and_pair(amp_dtype):
    torch.manual_seed(0)
    model = gnn.standard_network(SHAPE, steps=3, width=0.25)
    gnn.configure(model, amp_dtype=amp_dtype)
    g = torch.Generator().manual_seed(1)
    return model, torch.rand(1, 1, *SHAPE, generator=g), torch.rand(1, 1, *SHAPE, generator=g)


def poison_gradients_under_autocast(model, always=False):
    """NaN weight gradients of one convolution whenever the U-Nets run under autocast (or always)."""
    steps = displacement_fields(model)
    weight = next(p for name, p in model.named_parameters() if name.endswith("weight") and p.ndim == 4)
    weight.register_hook(lambda g: g * float("nan") if always or steps[0].amp_dtype is not None else g)


def run(model, A, B, use_generator=True):
    """Instance optimisation; returns the result, the losses and the tuned weights (taken just before
    the final registration, since the stored weights are restored afterwards). The penalty's random
    points come from a generator, or from the global random state (seeded here)."""
    tuned, register = {}, model.register

    def register_and_keep_weights(*args, **kwargs):
        tuned.update({k: v.clone() for k, v in model.state_dict().items()})
        return register(*args, **kwargs)

    model.register = register_and_keep_weights
    torch.manual_seed(5)
    generator = torch.Generator().manual_seed(5) if use_generator else None
    result, losses = instance_optimize(model, A, B, steps=3, lr=1e-3, generator=generator, return_losses=True)
    del model.register
    return result, losses, tuned


@pytest.mark.parametrize("use_generator", [True, False])
def test_a_step_with_nan_gradients_is_redone_in_float32(use_generator):
    poisoned, A, B = model_and_pair(torch.bfloat16)
    poison_gradients_under_autocast(poisoned)
    result, losses, tuned = run(poisoned, A, B, use_generator)
    assert displacement_fields(poisoned)[0].amp_dtype is torch.bfloat16  # settings restored
    assert all(torch.isfinite(f).all() for f in result.chain_AB) and all(map(torch.isfinite, map(torch.tensor, losses)))
    # every step was redone in float32 with the same random points: the float32 run's weights, bit for bit
    plain, _, _ = model_and_pair(None)
    _, _, want = run(plain, A, B, use_generator)
    assert any(not torch.equal(v, want[k]) for k, v in poisoned.state_dict().items())  # the steps changed them
    for k, v in tuned.items():
        assert torch.equal(v, want[k]), k


def test_gradients_that_stay_non_finite_raise():
    model, A, B = model_and_pair(torch.bfloat16)
    poison_gradients_under_autocast(model, always=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="non-finite gradients at step 1"):
        run(model, A, B)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_finite_gradients_are_not_recomputed():
    model, A, B = model_and_pair(None)
    calls = {"n": 0}
    original = model.forward

    def counted(*a, **kw):
        calls["n"] += 1
        return original(*a, **kw)

    model.forward = counted
    instance_optimize(model, A, B, steps=3, lr=1e-3, generator=torch.Generator().manual_seed(5))
    assert calls["n"] == 3
