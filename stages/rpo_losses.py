"""Preference losses of reward-aware preference optimization (RPO), as plain functions on tensors.

Every loss maps a batch of pairs (chosen c, rejected l) to one loss per pair. Its inputs are

- ``delta_pi`` = [log π(c) − log π_ref(c)] − [log π(l) − log π_ref(l)], shape (pairs,). Whether the
  log-probs are summed over the response tokens or averaged per token is the caller's choice;
- ``delta_r`` = r(c) − r(l), the rewards' gap, shape (pairs,);
- ``beta`` (β, the strength of the KL tie to the reference) and ``eta`` (η, the reward scale).

The definitions follow NeMo-Aligner's ``megatron_gpt_dpo_model.py`` (``preference_loss`` ∈ dpo, ipo,
rpo_sq, rpo_bwd_kl, rpo_fwd_kl), the reference implementation of RPO in the Nemotron-4 340B report:
RPO fits the policy's implicit reward gap β·Δπ to the scaled reward gap η·Δr, so a pair whose rewards
are close pushes the policy less than one with a clear winner. Losses are looked up by name in
``PREFERENCE_LOSSES``; a new variant is a new function and a new entry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

PreferenceLoss = Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]


def dpo_loss(delta_pi: torch.Tensor, delta_r: torch.Tensor, beta: float, eta: float) -> torch.Tensor:
    """−log σ(β·Δπ): the rewards are ignored, only which response won counts."""
    return -F.logsigmoid(beta * delta_pi)


def ipo_loss(delta_pi: torch.Tensor, delta_r: torch.Tensor, beta: float, eta: float) -> torch.Tensor:
    """(Δπ − 1/(2β))²: DPO with a finite target margin; Δπ is not scaled by β here (as in NeMo-Aligner)."""
    return (delta_pi - 1 / (2 * beta)) ** 2


def rpo_sq_loss(delta_pi: torch.Tensor, delta_r: torch.Tensor, beta: float, eta: float) -> torch.Tensor:
    """(β·Δπ − η·Δr)²: the squared distance between the implicit and the given reward gap."""
    return (beta * delta_pi - eta * delta_r) ** 2


def bernoulli_kl(logit_p: torch.Tensor, logit_q: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(σ(logit_p)) ‖ Bernoulli(σ(logit_q))) from logits.

    Written with logsigmoid, so a probability of 0 or 1 (a very large logit) gives no log(0): its term
    is a product of an underflowed probability and a finite log, which is 0.
    """
    log_p, log_not_p = F.logsigmoid(logit_p), F.logsigmoid(-logit_p)
    log_q, log_not_q = F.logsigmoid(logit_q), F.logsigmoid(-logit_q)
    return log_p.exp() * (log_p - log_q) + log_not_p.exp() * (log_not_p - log_not_q)


def rpo_bwd_kl_loss(delta_pi: torch.Tensor, delta_r: torch.Tensor, beta: float, eta: float) -> torch.Tensor:
    """KL(Bern(σ(η·Δr)) ‖ Bern(σ(β·Δπ))): tends to the DPO loss as η·Δr grows."""
    return bernoulli_kl(eta * delta_r, beta * delta_pi)


def rpo_fwd_kl_loss(delta_pi: torch.Tensor, delta_r: torch.Tensor, beta: float, eta: float) -> torch.Tensor:
    """KL(Bern(σ(β·Δπ)) ‖ Bern(σ(η·Δr))): the same divergence with its arguments swapped."""
    return bernoulli_kl(beta * delta_pi, eta * delta_r)


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "rpo_sq": rpo_sq_loss,
    "rpo_bwd_kl": rpo_bwd_kl_loss,
    "rpo_fwd_kl": rpo_fwd_kl_loss,
}


def preference_loss(name: str) -> PreferenceLoss:
    """The loss registered under ``name``; an unknown name is an error listing the known ones."""
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"unknown preference loss {name!r}; known: {sorted(PREFERENCE_LOSSES)}")
    return PREFERENCE_LOSSES[name]


def preference_stats(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
                     chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, beta: float) -> dict[str, float]:
    """What to log for a batch of pairs; every argument has shape (pairs,).

    ``*_logratios`` are log π − log π_ref of each response (reduced as for the loss). The policy's
    implicit reward of a response is β times its log-ratio; ``accuracy`` is the share of pairs whose
    chosen response has the higher implicit reward, ``reward_gap`` the mean given Δr.
    """
    implicit_chosen, implicit_rejected = beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
    return {
        "accuracy": (implicit_chosen > implicit_rejected).float().mean().item(),
        "implicit_reward_chosen": implicit_chosen.mean().item(),
        "implicit_reward_rejected": implicit_rejected.mean().item(),
        "reward_gap": (chosen_rewards - rejected_rewards).float().mean().item(),
    }
