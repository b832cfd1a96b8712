"""RPO preference losses against hand-worked values, their limits, and the direction of their gradients.

The expected values are written out with the math module from the definitions in NeMo-Aligner's
``megatron_gpt_dpo_model.py``, not by calling the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from stages.rpo_losses import (
    PREFERENCE_LOSSES,
    dpo_loss,
    preference_loss,
    preference_stats,
    rpo_bwd_kl_loss,
    rpo_sq_loss,
)

BETA, ETA = 0.5, 2.0
DELTA_PI = [1.2, -0.4]
DELTA_R = [0.3, 0.5]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def kl_bernoulli(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def hand_values(name: str, d_pi: float, d_r: float) -> float:
    """The five definitions, written out."""
    return {
        "dpo": math.log(1 + math.exp(-BETA * d_pi)),  # −log σ(βΔπ)
        "ipo": (d_pi - 1 / (2 * BETA)) ** 2,
        "rpo_sq": (BETA * d_pi - ETA * d_r) ** 2,
        "rpo_bwd_kl": kl_bernoulli(sigmoid(ETA * d_r), sigmoid(BETA * d_pi)),
        "rpo_fwd_kl": kl_bernoulli(sigmoid(BETA * d_pi), sigmoid(ETA * d_r)),
    }[name]


def test_registry_holds_the_five_losses_and_rejects_unknown_names():
    assert sorted(PREFERENCE_LOSSES) == ["dpo", "ipo", "rpo_bwd_kl", "rpo_fwd_kl", "rpo_sq"]
    with pytest.raises(ValueError, match="unknown preference loss 'simpo'.*rpo_sq"):
        preference_loss("simpo")


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_loss_matches_hand_worked_values(name):
    losses = preference_loss(name)(torch.tensor(DELTA_PI), torch.tensor(DELTA_R), BETA, ETA)
    expected = [hand_values(name, d_pi, d_r) for d_pi, d_r in zip(DELTA_PI, DELTA_R)]
    assert losses.shape == (2,)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_hand_worked_numbers_themselves():
    """A few of the values above, by hand to the digit: rpo_sq is 0 where βΔπ = ηΔr (0.6 = 0.6)."""
    assert hand_values("rpo_sq", 1.2, 0.3) == pytest.approx(0.0)
    assert hand_values("rpo_sq", -0.4, 0.5) == pytest.approx(1.44)  # (−0.2 − 1.0)²
    assert hand_values("ipo", 1.2, 0.3) == pytest.approx(0.04)  # (1.2 − 1)²
    assert hand_values("rpo_bwd_kl", 1.2, 0.3) == pytest.approx(0.0)  # same Bernoulli on both sides


@pytest.mark.parametrize("scaled_gap", [1e3, -1e3])
def test_losses_are_finite_for_extreme_inputs(scaled_gap):
    d_pi = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)
    d_r = torch.full((3,), scaled_gap)
    for name, loss_fn in PREFERENCE_LOSSES.items():
        losses = loss_fn(d_pi, d_r, 1.0, 1.0)
        (grad,) = torch.autograd.grad(losses.sum(), d_pi)
        assert torch.isfinite(losses).all() and torch.isfinite(grad).all(), name


def test_bwd_kl_tends_to_dpo_as_the_reward_gap_grows():
    """KL(q ‖ p) = −H(q) − q log p − (1 − q) log(1 − p) → −log p (DPO) as q = σ(ηΔr) → 1."""
    d_pi = torch.tensor([-3.0, 0.0, 2.5], dtype=torch.float64)
    dpo = dpo_loss(d_pi, torch.zeros(3), 0.7, 1.0)
    gaps = [
        (rpo_bwd_kl_loss(d_pi, torch.full((3,), scaled), 0.7, 1.0) - dpo).abs().max().item()
        for scaled in (2.0, 5.0, 10.0, 20.0, 50.0)
    ]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 1e-2
    assert gaps[-1] < 1e-12
    # in float32 with a huge gap, q rounds to 1 and the entropy term is exactly 0: the losses coincide
    d_pi32 = d_pi.float()
    assert torch.allclose(rpo_bwd_kl_loss(d_pi32, torch.full((3,), 1e3), 0.7, 1.0),
                          dpo_loss(d_pi32, torch.zeros(3), 0.7, 1.0), atol=1e-6)


@pytest.mark.parametrize("delta_r, argmin", [(0.0, 0.0), (0.4, 0.8)])
def test_rpo_sq_minimum_is_where_beta_delta_pi_equals_eta_delta_r(delta_r, argmin):
    """With Δr = 0 the minimum is Δπ = 0; with β = 0.5, η = 1, Δr = 0.4 it is Δπ = ηΔr/β = 0.8."""
    grid = torch.linspace(-3, 3, 61, dtype=torch.float64)
    losses = rpo_sq_loss(grid, torch.full_like(grid, delta_r), 0.5, 1.0)
    assert grid[losses.argmin()].item() == pytest.approx(argmin)
    at_min = torch.tensor([argmin], dtype=torch.float64, requires_grad=True)
    loss = rpo_sq_loss(at_min, torch.tensor([delta_r], dtype=torch.float64), 0.5, 1.0)
    (grad,) = torch.autograd.grad(loss.sum(), at_min)
    assert grad.item() == pytest.approx(0.0)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_descent_raises_chosen_and_lowers_rejected_log_prob(name):
    """At Δπ = 0 with Δr > 0, ∂L/∂log π(c) < 0 and ∂L/∂log π(l) > 0 for every loss."""
    logp_chosen = torch.tensor([-5.0, -12.0], requires_grad=True)
    logp_rejected = torch.tensor([-6.0, -9.0], requires_grad=True)
    ref_chosen, ref_rejected = logp_chosen.detach().clone(), logp_rejected.detach().clone()
    delta_pi = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)
    assert delta_pi.tolist() == [0.0, 0.0]
    losses = preference_loss(name)(delta_pi, torch.tensor([0.7, 0.2]), 0.5, 1.0)
    grad_chosen, grad_rejected = torch.autograd.grad(losses.sum(), (logp_chosen, logp_rejected))
    assert (grad_chosen < 0).all() and (grad_rejected > 0).all()


def test_stats_on_hand_worked_batch():
    """β = 0.5: implicit rewards c = [0.5, −1, 0.25], l = [0, −0.5, 0.35]; only pair 0 has c above l."""
    stats = preference_stats(
        chosen_logratios=torch.tensor([1.0, -2.0, 0.5]), rejected_logratios=torch.tensor([0.0, -1.0, 0.7]),
        chosen_rewards=torch.tensor([1.0, 0.9, 1.0]), rejected_rewards=torch.tensor([0.0, 0.2, 0.0]), beta=0.5,
    )
    assert stats == pytest.approx({
        "accuracy": 1 / 3,
        "implicit_reward_chosen": (0.5 - 1 + 0.25) / 3,
        "implicit_reward_rejected": (0 - 0.5 + 0.35) / 3,
        "reward_gap": (1.0 + 0.7 + 1.0) / 3,
    })
