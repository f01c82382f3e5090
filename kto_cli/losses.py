"""Alignment losses as pure functions of log-prob tensors.

No model, no I/O, no distributed calls: the training loop passes in any cross-rank statistic.
Each loss returns (loss, metrics): the scalar to minimise and a dict of 1-D tensors of
per-example (or per-batch) values that the loop averages over micro-batches and ranks.
Rewards in metrics are beta-scaled log-ratios, as TRL and HALOs log them.
"""
import torch
import torch.nn.functional as F


def kto_reference_point(kl_sum: torch.Tensor, kl_count: torch.Tensor) -> torch.Tensor:
    """z: the mean policy/reference log-ratio over the KL sequences (x_i, y_j), clamped at 0 and
    detached. Pass the sum and count over every rank's KL sequences, not a mean of means."""
    return (kl_sum / kl_count.clamp(min=1)).clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,  # (B,) summed completion log-probs under the policy
    ref_logps: torch.Tensor,  # (B,) the same under the reference model
    desirable: torch.Tensor,  # (B,) bool
    z: torch.Tensor,  # () from kto_reference_point
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple:
    """KTO (Ethayarajh et al. 2024, Eq. 8), averaged over the examples of the batch:
        desirable:   lambda_D * (1 - sigmoid(beta * (r - z)))
        undesirable: lambda_U * (1 - sigmoid(beta * (z - r)))
    with r = log pi(y|x) - log pi_ref(y|x)."""
    r = policy_logps - ref_logps  # (B,)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - F.sigmoid(beta * (r - z))),
        undesirable_weight * (1 - F.sigmoid(beta * (z - r))),
    )  # (B,)
    rewards = beta * r.detach()  # (B,)
    metrics = {
        "loss": losses.detach().mean().reshape(1),
        "kl": z.detach().reshape(1),
        "rewards/chosen": rewards[desirable],
        "rewards/rejected": rewards[~desirable],
        "logps/chosen": policy_logps.detach()[desirable],
        "logps/rejected": policy_logps.detach()[~desirable],
    }
    return losses.mean(), metrics
