"""Golden values for KTO, derived by hand from the paper's Eq. 8."""
import math

import pytest
import torch

from kto_cli.losses import kl_estimate, kto_loss as _kto_loss


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
