"""Instance optimisation (docs/conventions.md §5): fine-tune all network weights on one pair at test time.

Adam (lr 2e-5) for ``steps`` (default 50) steps of the full objective on the pair, with the
network in eval mode (BatchNorm uses its running statistics); the registration of the pair is
computed with the tuned weights, and the stored weights (and optimiser-free module state,
train/eval mode included) are restored afterwards, also when an exception interrupts it.
"""

from __future__ import annotations

import copy

import torch

from ..nn import GradICON
from ..nn.networks import full_precision
from .checkpoint import rng_state, set_rng_state
from .gradient_check import non_finite_gradients


def instance_optimize(model: GradICON, image_A: torch.Tensor, image_B: torch.Tensor, *, steps: int = 50,
                      lr: float = 2e-5, generator: torch.Generator | None = None,
                      return_losses: bool = False, mask_A: torch.Tensor | None = None,
                      mask_B: torch.Tensor | None = None):
    """Register (A, B) after ``steps`` Adam steps of ``model``'s loss on this pair; ``model`` is left unchanged.

    Returns the :class:`RegistrationResult` (detached), or ``(result, losses)`` with
    ``return_losses=True`` (the total loss before each step, then after the last).
    ``generator`` fixes the penalty's random points; ``mask_A``/``mask_B`` mask the similarity (see
    :meth:`GradICON.forward`).
    """
    model = getattr(model, "module", model)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    saved_state = copy.deepcopy(model.state_dict())
    saved_modes = {m: m.training for m in model.modules()}
    saved_grads = {p: p.grad for p in model.parameters()}
    losses = []
    try:
        model.eval()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=lr)
        for p in params:
            p.grad = None
        with torch.enable_grad():
            for _ in range(steps):
                random_state = generator.get_state() if generator is not None else rng_state()
                losses.append(_loss_and_gradients(model, optimizer, image_A, image_B, generator, mask_A, mask_B,
                                                  len(losses)))
                if non_finite_gradients(model.named_parameters()):
                    # a low-precision backward went wrong with a finite loss (gradient_check): the step is
                    # redone in float32 with the same random points
                    if generator is not None:
                        generator.set_state(random_state)
                    else:
                        set_rng_state(random_state)
                    with full_precision(model):
                        _loss_and_gradients(model, optimizer, image_A, image_B, generator, mask_A, mask_B,
                                            len(losses) - 1)
                    if non_finite_gradients(model.named_parameters()):
                        raise FloatingPointError(f"instance optimisation: non-finite gradients at step "
                                                 f"{len(losses)} although the loss is finite ({losses[-1]})")
                optimizer.step()
        with torch.no_grad():
            result = model.register(image_A, image_B).detach()
            if return_losses:
                losses.append(float(model(image_A, image_B, generator=generator, mask_A=mask_A, mask_B=mask_B).total))
    finally:
        model.load_state_dict(saved_state)
        for m, mode in saved_modes.items():
            m.training = mode
        for p, g in saved_grads.items():
            p.grad = g
    return (result, losses) if return_losses else result


def _loss_and_gradients(model, optimizer, image_A, image_B, generator, mask_A, mask_B, done: int) -> float:
    """Zeroes the gradients, then one forward and backward pass of the objective; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    terms = model(image_A, image_B, generator=generator, mask_A=mask_A, mask_B=mask_B)
    if not torch.isfinite(terms.total):
        raise FloatingPointError(f"instance optimisation: non-finite loss after {done} steps "
                                 f"(similarity {float(terms.similarity.detach())}, "
                                 f"regularization {float(terms.regularization.detach())})")
    terms.total.backward()
    return float(terms.total.detach())

