"""Golden values for every loss, each derived by hand in its docstring (KTO from the paper's Eq. 8)."""
import logging
import math

import pytest
import torch

from kto_cli.losses import (dpo_loss, gae, ipo_loss, kl_estimate, kto_zero_loss, orpo_loss, ppo_advantages, ppo_loss,
                            sft_loss, simpo_loss, slic_loss, token_moments)
from kto_cli.losses import kto_loss as _kto_loss

t = torch.tensor


def kto_loss(*args, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """The loss with the paper's hyperparameters unless a test sets them."""
    return _kto_loss(*args, beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_golden_values():
    """beta = 0.1, z = 0.2.
    example 0, desirable:   r = -1.0 - (-1.5) = 0.5;  loss = 1 - sig(0.1 * (0.5 - 0.2)) = 1 - sig(0.03)
                            = 1 - 0.5074994 = 0.4925006
    example 1, undesirable: r = -2.0 - (-1.0) = -1.0; loss = 1 - sig(0.1 * (0.2 + 1.0)) = 1 - sig(0.12)
                            = 1 - 0.5299641 = 0.4700359
    mean = 0.4812682; rewards (beta * r) = 0.05 and -0.1."""
    loss, m = kto_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), torch.tensor([True, False]),
                       torch.tensor(0.2), beta=0.1)
    assert loss.item() == pytest.approx(0.4812682, abs=1e-6)
    assert loss.item() == pytest.approx(((1 - sig(0.03)) + (1 - sig(0.12))) / 2, abs=1e-7)
    assert m["rewards/chosen"].tolist() == pytest.approx([0.05])
    assert m["rewards/rejected"].tolist() == pytest.approx([-0.1])
    assert m["logps/chosen"].tolist() == [-1.0] and m["logps/rejected"].tolist() == [-2.0]
    assert m["kl"].item() == pytest.approx(0.2)


def test_kto_weights_scale_each_side():
    """lambda_D = 2, lambda_U = 0.5 on the same batch: (2 * 0.4925006 + 0.5 * 0.4700359) / 2 = 0.6100096."""
    loss, _ = kto_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), torch.tensor([True, False]),
                       torch.tensor(0.2), beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    assert loss.item() == pytest.approx((2 * (1 - sig(0.03)) + 0.5 * (1 - sig(0.12))) / 2, abs=1e-7)


def test_kto_weight_ratio_warns_below_the_papers_range_and_notes_above(caplog):
    """lambda_D n_D / (lambda_U n_U): 1 * 10 / (1 * 30) = 1/3 is below [1, 4/3] (a warning naming
    lambda_D in [3, 4]); 1 * 60 / (0.25 * 40) = 6 is above it (leaning to the desirable side on
    purpose, as loss=kto_short_answers does): noted at INFO, no warning."""
    from kto_cli.objectives.kto import KTOLossConfig, kto_weights
    caplog.set_level(logging.INFO, logger="kto_cli")
    assert kto_weights(KTOLossConfig(), 10, 30) == (1.0, 1.0)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "between 3.000 and 4.000" in caplog.text
    caplog.clear()
    assert kto_weights(KTOLossConfig(undesirable_weight=0.25), 60, 40) == (1.0, 0.25)
    assert [r.levelname for r in caplog.records] == ["INFO"] and "= 6.000 is outside" in caplog.text


def test_kto_policy_equal_reference_is_one_half():
    """r = 0 and z = 0 give 1 - sig(0) = 0.5 for every example, whatever beta and the labels."""
    logps = torch.tensor([-3.0, -7.0, -1.0])
    loss, m = kto_loss(logps, logps.clone(), torch.tensor([True, False, False]), torch.tensor(0.0), beta=0.7)
    assert loss.item() == pytest.approx(0.5)
    assert m["rewards/chosen"].tolist() == [0.0]


def test_kto_one_sided_batch():
    """No undesirable example: rewards/rejected is empty (the loop skips it), loss = 1 - sig(0.1 * 2) = 0.4501660."""
    loss, m = kto_loss(torch.tensor([0.0]), torch.tensor([-2.0]), torch.tensor([True]), torch.tensor(0.0))
    assert loss.item() == pytest.approx(1 - sig(0.2), abs=1e-7)
    assert m["rewards/rejected"].numel() == 0 and m["logps/rejected"].numel() == 0


def test_kto_gradient_direction():
    """d loss / d logp = -beta * sig'(.) / B for desirable (push up) and +beta * sig'(.) / B for undesirable:
    at r = z = 0, sig' = 1/4, so with B = 2 and beta = 0.1 the gradients are -0.0125 and +0.0125."""
    logps = torch.zeros(2, requires_grad=True)
    loss, _ = kto_loss(logps, torch.zeros(2), torch.tensor([True, False]), torch.tensor(0.0), beta=0.1)
    loss.backward()
    assert logps.grad.tolist() == pytest.approx([-0.0125, 0.0125])


def test_kl_estimate_is_global_mean_and_detached():
    """kl = sum / count over all KL sequences: two ranks with sums 3 and -1 over 2 + 6 sequences give
    2 / 8 = 0.25 (a mean of per-rank means would give (1.5 - 1/6) / 2 = 0.667)."""
    x = torch.tensor(3.0, requires_grad=True)
    kl = kl_estimate(x + torch.tensor(-1.0), torch.tensor(8))
    assert kl.item() == pytest.approx(0.25) and not kl.requires_grad


def test_negative_kl_clamps_the_reference_point_and_is_logged_raw():
    """kl = -5 / 2 = -2.5: z = 0, so the loss equals the z = 0 loss; `kl` logs 0 and `kl/raw` -2.5.
    Desirable r = 0.5: 1 - sig(0.05) = 0.4875026."""
    kl = kl_estimate(torch.tensor(-5.0), torch.tensor(2))
    loss, m = kto_loss(torch.tensor([-1.0]), torch.tensor([-1.5]), torch.tensor([True]), kl, beta=0.1)
    assert loss.item() == pytest.approx(1 - sig(0.05), abs=1e-7)
    assert m["kl"].item() == 0.0 and m["kl/raw"].item() == pytest.approx(-2.5)


def test_dpo_golden():
    """beta 0.1; chosen log-ratio -1 - (-1.5) = 0.5 -> reward 0.05; rejected -2 - (-1) = -1 -> -0.1.
    h = 0.15; loss = -log sigmoid(0.15) = log(1 + e^-0.15) = log(1.860708) = 0.620957."""
    loss, m = dpo_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.0]), beta=0.1, label_smoothing=0.0)
    assert loss.item() == pytest.approx(0.620957, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.05) and m["rewards/rejected"].item() == pytest.approx(-0.1)
    assert m["rewards/accuracies"].item() == 1.0


def test_cdpo_golden():
    """epsilon 0.2 on the same pair: 0.8 * log(1 + e^-0.15) + 0.2 * log(1 + e^0.15)
    = 0.8 * 0.620957 + 0.2 * 0.770957 = 0.496766 + 0.154191 = 0.650957."""
    loss, _ = dpo_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.0]), beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(0.650957, abs=1e-6)


def test_dpo_gradient_matches_closed_form():
    """L = mean_p -log sigmoid(u_p), u = beta (c - c_ref - r + r_ref): dL/dc_p = -beta sigmoid(-u_p) / P
    and dL/dr_p = +beta sigmoid(-u_p) / P."""
    g = torch.Generator().manual_seed(0)
    c, r = torch.randn(5, generator=g, requires_grad=True), torch.randn(5, generator=g, requires_grad=True)
    c_ref, r_ref = torch.randn(5, generator=g), torch.randn(5, generator=g)
    beta = 0.3
    loss, _ = dpo_loss(c, r, c_ref, r_ref, beta=beta, label_smoothing=0.0)
    loss.backward()
    u = beta * ((c - c_ref) - (r - r_ref)).detach()
    torch.testing.assert_close(c.grad, -beta * torch.sigmoid(-u) / 5)
    torch.testing.assert_close(r.grad, beta * torch.sigmoid(-u) / 5)


def test_ipo_golden_averages_log_ratios_per_token():
    """tau 0.1; chosen log-ratio -1 - (-1.5) = 0.5 over 2 tokens -> 0.25 per token; rejected
    -2 - (-1) = -1 over 4 tokens -> -0.25. h = 0.5, target 1 / (2 tau) = 5, loss (0.5 - 5)^2 = 20.25
    (summed log-ratios would give (1.5 - 5)^2 = 12.25). rewards: tau * per-token log-ratio."""
    loss, m = ipo_loss(t([-1.0]), t([-2.0]), t([-1.5]), t([-1.0]), t([2.0]), t([4.0]), tau=0.1)
    assert loss.item() == pytest.approx(20.25)
    assert m["rewards/chosen"].item() == pytest.approx(0.025) and m["rewards/rejected"].item() == pytest.approx(-0.025)


def test_slic_golden_uses_the_sequence_nll():
    """beta 1, lambda 0.1; chosen -1.5, rejected -1: hinge max(0, 1 + 1.5 - 1) = 1.5, sequence NLL
    1.5, loss 1.5 + 0.15 = 1.65. A well-separated pair (chosen -1, rejected -3): hinge 0, loss
    0.1 * 1 = 0.1. Mean 0.875."""
    loss, m = slic_loss(t([-1.5, -1.0]), t([-1.0, -3.0]), beta=1.0, lambda_coef=0.1)
    assert loss.item() == pytest.approx(0.875)
    assert m["nll"].tolist() == pytest.approx([1.5, 1.0])


def test_simpo_is_length_normalised():
    """beta 2, gamma 0.5; chosen -2 over 4 tokens -> 2 * -0.5 = -1; rejected -3 over 2 tokens -> 2 * -1.5 = -3.
    loss = -log sigmoid(-1 + 3 - 0.5) = log(1 + e^-1.5) = 0.201413. Summed log-probs would have given
    -log sigmoid(2 * (-2 + 3) - 0.5) = log(1 + e^-1.5) too, so check a pair where they differ:
    chosen -4 over 4 tokens (-2 -> reward -2), rejected -3 over 1 token (reward -6):
    -log sigmoid(4 - 0.5) = log(1 + e^-3.5) = 0.029750 (summed: -log sigmoid(-2.5) = 2.578889)."""
    loss, m = simpo_loss(t([-2.0, -4.0]), t([-3.0, -3.0]), t([4.0, 4.0]), t([2.0, 1.0]), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx((0.201413 + 0.029750) / 2, abs=1e-6)
    assert m["rewards/chosen"].tolist() == pytest.approx([-1.0, -2.0])


def test_orpo_golden():
    """lambda 0.1; chosen mean token log-prob log 0.5 (odds 1, log odds 0) over 3 tokens; rejected
    log 0.2 (odds 0.25) over 2 tokens. log odds ratio = 0 - log 0.25 = 1.386294;
    -log sigmoid(1.386294) = log(1 + 0.25) = 0.223144; NLL = -log 0.5 = 0.693147;
    loss = 0.693147 + 0.1 * 0.223144 = 0.715461."""
    loss, m = orpo_loss(t([3 * math.log(0.5)]), t([2 * math.log(0.2)]), t([3.0]), t([2.0]), lam=0.1)
    assert loss.item() == pytest.approx(0.715461, abs=1e-5)
    assert m["log_odds_ratio"].item() == pytest.approx(1.386294, abs=1e-5)


def test_sft_is_mean_token_nll():
    """Log-probs -2 over 1 token and -4 over 3 tokens: 6 nats over 4 tokens = 1.5 (not the mean of
    per-sequence means, (2 + 4/3) / 2)."""
    loss, _ = sft_loss(t([-2.0, -4.0]), t([1.0, 3.0]))
    assert loss.item() == pytest.approx(1.5)


def test_sft_over_two_ranks_averages_to_the_whole_batch():
    """Rank 0 holds (-2 over 1 token), rank 1 (-4 over 3): 4 tokens in all, 2 per rank on average.
    Rank losses 2 / 2 = 1 and 4 / 2 = 2 average to 1.5, the one-process value (per-rank token means,
    2 and 4/3, would average to 1.667)."""
    ranks = [sft_loss(t([-2.0]), t([1.0]), num_tokens=t(4.0) / 2)[0], sft_loss(t([-4.0]), t([3.0]), num_tokens=t(4.0) / 2)[0]]
    assert [x.item() for x in ranks] == pytest.approx([1.0, 2.0]) and sum(ranks).item() / 2 == pytest.approx(1.5)


def test_kto_zero_equals_apo_zero_unpaired_form():
    """z = 0: desirable r = 0.5 -> 1 - sigmoid(0.05); undesirable r = -1 -> 1 - sigmoid(0.1) = sigmoid(-0.1),
    the apo_zero_unpaired form; mean = (0.487503 + 0.475021) / 2."""
    loss, m = kto_zero_loss(t([-1.0, -2.0]), t([-1.5, -1.0]), t([True, False]), beta=0.1, desirable_weight=1.0,
                            undesirable_weight=1.0)
    assert loss.item() == pytest.approx(((1 - sig(0.05)) + sig(-0.1)) / 2, abs=1e-7)
    assert m["kl"].item() == 0


def test_kto_batch_without_desirable():
    """All undesirable, z = 0.5, beta 0.1: r = 1 - 0 = 1 -> 1 - sigmoid(0.1 * (0.5 - 1)) = 1 - sigmoid(-0.05)
    = 0.512497; chosen metrics are empty."""
    loss, m = kto_loss(t([1.0]), t([0.0]), t([False]), t(0.5), beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    assert loss.item() == pytest.approx(1 - sig(-0.05), abs=1e-7)
    assert m["rewards/chosen"].numel() == 0


def test_gae_hand_computed():
    """gamma 0.9, lambda 0.5 (gamma * lambda = 0.45).
    Row 0, values (0.5, 0.2, 0.1), reward +1 on the last token:
      t=2: delta = 1 - 0.1 = 0.9                    A = 0.9
      t=1: delta = 0.9 * 0.1 - 0.2 = -0.11          A = -0.11 + 0.45 * 0.9 = 0.295
      t=0: delta = 0.9 * 0.2 - 0.5 = -0.32          A = -0.32 + 0.45 * 0.295 = -0.18725
    Row 1, two real tokens, values (0.3, 0.4, pad 9), reward -1 on token 1 (the pad is masked out):
      t=1: delta = -1 + 0 - 0.4 = -1.4              A = -1.4
      t=0: delta = 0.9 * 0.4 - 0.3 = 0.06           A = 0.06 + 0.45 * -1.4 = -0.57
    returns = A + V."""
    values = t([[0.5, 0.2, 0.1], [0.3, 0.4, 9.0]])
    rewards = t([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(values, rewards, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, t([[-0.18725, 0.295, 0.9], [-0.57, -1.4, 0.0]]))
    torch.testing.assert_close(ret, t([[0.31275, 0.495, 1.0], [-0.27, -1.0, 0.0]]))


PPO = dict(cliprange=0.5, kl_coef=0.1, critic_coef=0.01)  # the KTO paper's (HALOs') values
GAE = dict(gamma=0.99, lam=0.95)


def ppo(logps, ref, values, mask, desirable, **kw):
    """ppo_loss over one process's batch, as kto_cli.objectives feeds it."""
    adv, ret = ppo_advantages(values, mask, desirable, **GAE)
    return ppo_loss(logps, ref, values, mask, desirable, adv, ret, token_moments(adv, mask), **{**PPO, **kw})


def test_ppo_pushes_desirable_up_and_undesirable_down():
    """At ratio 1 with zero values, advantages follow the sign of each sequence's reward, so the
    gradient on the last token is negative (raise it) for the desirable and positive for the
    undesirable sequence; KL and clip fraction start at 0."""
    logps = torch.zeros(2, 3, requires_grad=True)
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    values = torch.zeros(2, 3, requires_grad=True)
    loss, m = ppo(logps, torch.zeros(2, 3), values, mask, t([True, False]))
    loss.backward()
    assert logps.grad[0, 2] < 0 and logps.grad[1, 1] > 0 and logps.grad[1, 2] == 0
    assert m["kl"].item() == 0 and m["clipfrac"].item() == 0
    assert values.grad is not None and values.grad.abs().sum() > 0  # the critic learns


def test_ppo_kl_term_is_policy_minus_reference():
    """The KL penalty is mean(log pi - log pi_ref) per token (HALOs' sign since May 2025): a policy
    0.5 nats above the reference on every one of 5 tokens logs kl = 0.5, and the term adds
    kl_coef / 5 = 0.02 to the gradient of every real token (it pulls log-probs back down, for
    desirable and undesirable sequences alike)."""
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    grads = {}
    for coef in (0.0, 0.1):
        logps = torch.full((2, 3), 0.5, requires_grad=True)
        loss, m = ppo(logps, torch.zeros(2, 3), torch.zeros(2, 3), mask, t([True, False]), kl_coef=coef)
        loss.backward()
        grads[coef] = logps.grad
    assert m["kl"].item() == pytest.approx(0.5)
    torch.testing.assert_close(grads[0.1] - grads[0.0], 0.02 * mask)


def test_ppo_over_two_ranks_averages_to_the_whole_batch():
    """Advantages whitened with moments summed over both ranks and token means over (all tokens) /
    2: the two ranks' mean loss and summed gradients / 2 equal one process with both micro-batches."""
    g = torch.Generator().manual_seed(0)
    logps, ref, values = (torch.randn(4, 5, generator=g) * 0.3 for _ in range(3))
    mask = t([[1.0] * 5, [1.0] * 2 + [0.0] * 3, [1.0] * 4 + [0.0], [1.0] + [0.0] * 4])
    desirable = t([True, False, False, True])
    whole = logps.clone().requires_grad_(True)
    loss, _ = ppo(whole, ref, values, mask, desirable)
    loss.backward()
    halves = [logps[:2].clone().requires_grad_(True), logps[2:].clone().requires_grad_(True)]
    adv = [ppo_advantages(values[s], mask[s], desirable[s], **GAE) for s in (slice(0, 2), slice(2, 4))]
    moments = token_moments(adv[0][0], mask[:2]) + token_moments(adv[1][0], mask[2:])
    total = 0
    for x, s, (a, r) in zip(halves, (slice(0, 2), slice(2, 4)), adv):
        part, _ = ppo_loss(x, ref[s], values[s], mask[s], desirable[s], a, r, moments, 2, **PPO)
        (part / 2).backward()
        total = total + part.item() / 2
    assert total == pytest.approx(loss.item(), abs=1e-6)
    torch.testing.assert_close(torch.cat([h.grad for h in halves]), whole.grad)
