"""Alignment losses as pure functions of log-prob tensors.

No model, no I/O, no distributed calls: the training loop passes in any cross-rank statistic.
Each loss returns (loss, metrics): the scalar to minimise and a dict of 1-D tensors of
per-example (or per-batch) values that the loop averages over micro-batches and ranks.
Rewards in metrics are beta-scaled log-ratios, as TRL and HALOs log them. Hyperparameters are
required keywords: their defaults are written once, in each loss's schema (kto_cli/objectives/).
"""
import torch
import torch.nn.functional as F


def kl_estimate(kl_sum: torch.Tensor, kl_count: torch.Tensor) -> torch.Tensor:
    """The mean policy/reference log-ratio over the KL sequences (x_i, y_j), detached. Pass the sum
    and count over every rank's KL sequences, not a mean of means. kto_loss clamps it at 0 to
    make the reference point z."""
    return (kl_sum / kl_count.clamp(min=1)).detach()


def kto_loss(
    policy_logps: torch.Tensor,  # (B,) summed completion log-probs under the policy
    ref_logps: torch.Tensor,  # (B,) the same under the reference model
    desirable: torch.Tensor,  # (B,) bool
    kl: torch.Tensor,  # () from kl_estimate
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple:
    """KTO (Ethayarajh et al. 2024, Eq. 8), averaged over the examples of the batch:
        desirable:   lambda_D * (1 - sigmoid(beta * (r - z)))
        undesirable: lambda_U * (1 - sigmoid(beta * (z - r)))
    with r = log pi(y|x) - log pi_ref(y|x) and z = max(0, kl), detached. Logs z as `kl` and the
    estimate before clamping as `kl/raw` (negative when the policy moved away from the KL
    sequences, which a clamped value hides)."""
    z = kl.detach().clamp(min=0)
    r = policy_logps - ref_logps  # (B,)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - F.sigmoid(beta * (r - z))),
        undesirable_weight * (1 - F.sigmoid(beta * (z - r))),
    )  # (B,)
    rewards = beta * r.detach()  # (B,)
    metrics = {
        "loss": losses.detach().mean().reshape(1),
        "kl": z.reshape(1),
        "kl/raw": kl.detach().reshape(1),
        "rewards/chosen": rewards[desirable],
        "rewards/rejected": rewards[~desirable],
        "logps/chosen": policy_logps.detach()[desirable],
        "logps/rejected": policy_logps.detach()[~desirable],
    }
    return losses.mean(), metrics


def kto_zero_loss(policy_logps, ref_logps, desirable, *, beta, desirable_weight, undesirable_weight):
    """KTO with the reference point fixed at z = 0 (the paper's ablation of the KL term). The same
    objective is TRL's `apo_zero_unpaired`: 1 - sigmoid(beta r) for desirable, sigmoid(beta r) for
    undesirable examples, since 1 - sigmoid(-x) = sigmoid(x)."""
    return kto_loss(policy_logps, ref_logps, desirable, policy_logps.new_zeros(()), beta=beta,
                    desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)


TIE = 1e-4  # scores closer than this count as a tie: float noise when the policy is the reference


def pair_wins(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1 where chosen scores above rejected, 0 below, 1/2 for a tie. (P,)"""
    d = (chosen - rejected).detach().float()
    return (d > TIE).float() + 0.5 * (d.abs() <= TIE).float()


def _paired_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    return {
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "rewards/accuracies": pair_wins(chosen_rewards, rejected_rewards),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, label_smoothing):
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * h), h = (log-ratio of chosen) - (log-ratio of
    rejected), over (P,) pairs. label_smoothing = epsilon > 0 gives conservative DPO (cDPO):
    (1 - eps) * -log sigmoid(beta h) + eps * -log sigmoid(-beta h)."""
    chosen_r = beta * (chosen_logps - ref_chosen_logps)  # (P,)
    rejected_r = beta * (rejected_logps - ref_rejected_logps)  # (P,)
    h = chosen_r - rejected_r
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)  # (P,)
    metrics = {"loss": losses.detach(), **_paired_metrics(chosen_r, rejected_r, chosen_logps, rejected_logps)}
    return losses.mean(), metrics


def ipo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths,
             *, tau):
    """IPO (Azar et al. 2023): (h - 1 / (2 tau))^2, where h is the difference of the chosen and
    rejected log-ratios, each averaged over its completion tokens (as TRL, confirmed with the IPO
    authors, and HALOs compute it), over (P,) pairs."""
    chosen_r = (chosen_logps - ref_chosen_logps) / chosen_lengths.clamp(min=1)  # (P,) per-token log-ratio
    rejected_r = (rejected_logps - ref_rejected_logps) / rejected_lengths.clamp(min=1)  # (P,)
    losses = (chosen_r - rejected_r - 1 / (2 * tau)) ** 2  # (P,)
    metrics = {"loss": losses.detach(), **_paired_metrics(tau * chosen_r, tau * rejected_r, chosen_logps, rejected_logps)}
    return losses.mean(), metrics


def slic_loss(chosen_logps, rejected_logps, *, beta, lambda_coef):
    """SLiC-HF (Zhao et al. 2023), reference-free, on summed log-probs:
    max(0, beta - log pi(y_w|x) + log pi(y_l|x)) + lambda * (-log pi(y_w|x)), the regulariser being
    the chosen completion's sequence NLL (the paper's, and HALOs')."""
    calibration = torch.clamp(beta - chosen_logps + rejected_logps, min=0)  # (P,)
    nll = -chosen_logps  # (P,)
    losses = calibration + lambda_coef * nll
    metrics = {"loss": losses.detach(), "nll": nll.detach(),
               **_paired_metrics(chosen_logps, rejected_logps, chosen_logps, rejected_logps)}
    return losses.mean(), metrics


def simpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, beta, gamma):
    """SimPO (Meng et al. 2024), reference-free and length-normalised:
    -log sigmoid(beta * logp_w / |y_w| - beta * logp_l / |y_l| - gamma)."""
    chosen_r = beta * chosen_logps / chosen_lengths.clamp(min=1)  # (P,)
    rejected_r = beta * rejected_logps / rejected_lengths.clamp(min=1)  # (P,)
    losses = -F.logsigmoid(chosen_r - rejected_r - gamma)  # (P,)
    metrics = {"loss": losses.detach(), **_paired_metrics(chosen_r, rejected_r, chosen_logps, rejected_logps)}
    return losses.mean(), metrics


def orpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, lam):
    """ORPO (Hong et al. 2024), reference-free: NLL of the chosen completion (per token) plus
    lambda * -log sigmoid(log odds(y_w) - log odds(y_l)), where odds(y) = p / (1 - p) and
    p = exp(mean token log-prob)."""
    chosen_avg = chosen_logps / chosen_lengths.clamp(min=1)  # (P,)
    rejected_avg = rejected_logps / rejected_lengths.clamp(min=1)  # (P,)
    log_odds = (chosen_avg - rejected_avg) - (torch.log1p(-torch.exp(chosen_avg).clamp(max=1 - 1e-6))
                                              - torch.log1p(-torch.exp(rejected_avg).clamp(max=1 - 1e-6)))
    ratio_loss = -F.logsigmoid(log_odds)  # (P,)
    nll = -chosen_avg
    losses = nll + lam * ratio_loss
    metrics = {"loss": losses.detach(), "nll": nll.detach(), "log_odds_ratio": log_odds.detach(),
               **_paired_metrics(lam * chosen_avg, lam * rejected_avg, chosen_logps, rejected_logps)}
    return losses.mean(), metrics


def sft_loss(logps, lengths, num_tokens=None):
    """Token-mean negative log-likelihood: sum(-logp) / num_tokens, num_tokens defaulting to the
    batch's completion tokens sum(|y|). Under W ranks the loop passes num_tokens = (tokens of every
    rank's micro-batch) / W, so the ranks' mean loss (and gradient) is the token mean of their
    union, as one process with the whole batch computes it."""
    num_tokens = lengths.sum() if num_tokens is None else num_tokens
    loss = -logps.sum() / num_tokens.clamp(min=1)
    return loss, {"loss": loss.detach().reshape(1), "logps/chosen": logps.detach()}


def masked_mean(x: torch.Tensor, mask: torch.Tensor, count=None) -> torch.Tensor:
    """sum(x * mask) / count, count defaulting to sum(mask)."""
    return (x * mask).sum() / (mask.sum() if count is None else count).clamp(min=1e-8)


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple:
    """Generalised advantage estimation over (B, L) completion tokens (mask 1 on real tokens):
        delta_t = r_t + gamma * V_{t+1} - V_t  (V after the last token is 0)
        A_t = delta_t + gamma * lam * A_{t+1}
    Returns (advantages, returns = advantages + values), both zero on padding."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def ppo_advantages(values, mask, desirable, *, gamma, lam) -> tuple:
    """(advantages, returns) of offline PPO as in the KTO paper (HALOs): reward +1 (desirable) or -1
    (undesirable) on the last completion token, GAE from the value head's detached values. (B, L)"""
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & mask.bool()  # (B, L) the last real token
    rewards = torch.where(last, torch.where(desirable, 1.0, -1.0)[:, None], 0.0)  # (B, L)
    return gae(values.detach(), rewards, mask, gamma, lam)


def token_moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(sum, sum of squares, count) of x over the masked tokens: summed over ranks by the loop. (3,)"""
    return torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).detach()


def ppo_loss(token_logps, ref_token_logps, values, mask, desirable, advantages, returns, moments, ranks=1, *,
             cliprange, kl_coef, critic_coef):
    """Offline PPO as in the KTO paper (HALOs): one step per batch, the reference model as the
    behaviour ("old") policy, advantages from ppo_advantages whitened with `moments` (token_moments
    of the advantages, summed over every rank's micro-batch), the policy ratio clipped to
    [cliprange, 1 / cliprange], a KL penalty mean(log pi - log pi_ref) per token, and a squared
    error critic loss toward the GAE returns. Token means divide by the tokens of every rank's
    micro-batch / ranks, so W ranks average to what one process with their union computes. All
    token tensors are (B, L) over completion tokens."""
    total, total_sq, count = moments
    mean = total / count.clamp(min=1)
    var = (total_sq / count.clamp(min=1) - mean ** 2).clamp(min=0)
    per_rank = count / ranks  # the token count each rank's mean divides by
    advantages = ((advantages - mean) * torch.rsqrt(var + 1e-8) * mask).detach()
    log_ratio = (token_logps - ref_token_logps) * mask  # (B, L)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, cliprange, 1 / cliprange)
    policy_loss = masked_mean(torch.max(unclipped, clipped), mask, per_rank)
    critic_loss = 0.5 * masked_mean((values - returns.detach()) ** 2, mask, per_rank)
    kl = masked_mean(log_ratio, mask, per_rank)
    loss = policy_loss + critic_coef * critic_loss + kl_coef * kl
    seq_ratio = log_ratio.sum(1).detach()  # (B,) sequence log-ratio
    seq_logps = (token_logps.detach() * mask).sum(1)  # (B,)
    metrics = {
        "loss": loss.detach().reshape(1), "loss/policy": policy_loss.detach().reshape(1),
        "loss/critic": critic_loss.detach().reshape(1), "kl": kl.detach().reshape(1),
        "clipfrac": masked_mean((clipped > unclipped).float(), mask, per_rank).detach().reshape(1),
        "values": masked_mean(values.detach(), mask, per_rank).reshape(1),
        "rewards/chosen": seq_ratio[desirable], "rewards/rejected": seq_ratio[~desirable],
        "logps/chosen": seq_logps[desirable], "logps/rejected": seq_logps[~desirable],
    }
    return loss, metrics
