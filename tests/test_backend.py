"""Plain-PyTorch parameter updates: the schedule, accumulation arithmetic, clipping, and a saved
state that resumes exactly. (The DeepSpeed engine is tested for real in test_deepspeed.py.)"""
import math

import pytest
import torch

from kto_cli.backend import Policy, TorchBackend, accumulation, lr_lambda
from kto_cli.config import Schedule, UserError
from kto_cli.models import tiny_model

from conftest import make_config


def test_schedules():
    """Warm-up 2 of 10 steps: 1/2, 2/2, then the schedule over the remaining 8."""
    assert [lr_lambda(s, 2, 10, Schedule.constant) for s in (0, 1, 5)] == [0.5, 1.0, 1.0]
    assert lr_lambda(6, 2, 10, Schedule.linear) == pytest.approx(0.5)
    assert lr_lambda(6, 2, 10, Schedule.cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_lambda(10, 2, 10, Schedule.cosine) == pytest.approx(0.0, abs=1e-12)


def test_accumulation_counts_global_batches():
    cfg = make_config("model=tiny", "trainer.batch_size=16", "trainer.micro_batch_size=4")
    assert accumulation(cfg, 1) == 4 and accumulation(cfg, 2) == 2 and accumulation(cfg, 4) == 1
    with pytest.raises(UserError, match="not a multiple"):
        accumulation(cfg, 3)


def backend_and_data(seed: int = 0):
    cfg = make_config("model=tiny", "trainer.lr=1e-2", "trainer.max_grad_norm=0.1", "trainer.warmup_ratio=0")
    lm = tiny_model(cfg.model, 259, 256)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    return TorchBackend(Policy(lm), cfg, steps=10), ids


def step(backend, ids, poison: float = 1.0) -> float:
    loss = backend(lambda lm, x: lm(input_ids=x, labels=x).loss, ids)
    backend.backward(loss * poison, accum=1)
    norm, applied = backend.step()
    assert applied == (poison == 1.0)
    return norm


def test_step_clips_and_reports_the_norm_before_clipping():
    backend, ids = backend_and_data()
    before = [p.detach().clone() for p in backend.params]
    norm = step(backend, ids)
    assert norm > 0.1  # clipped to 0.1: the reported norm is the one before
    assert all(p.grad is None for p in backend.params)  # zeroed for the next step
    assert any(not torch.equal(a, b) for a, b in zip(before, backend.params))


def test_a_non_finite_gradient_skips_the_update_but_not_the_schedule():
    """Weights and Adam's moments stay as they were; the next step is the one a run without the bad
    step would have taken, at the next step's learning rate."""
    a, ids = backend_and_data()
    step(a, ids)
    weights = [p.detach().clone() for p in a.params]
    moments = {k: v.clone() for k, v in a.optimizer.state[a.params[0]].items()}
    assert math.isnan(step(a, ids, poison=math.nan))
    assert all(torch.equal(w, p) for w, p in zip(weights, a.params)) and all(p.grad is None for p in a.params)
    assert all(torch.equal(v, a.optimizer.state[a.params[0]][k]) for k, v in moments.items())
    assert a.scheduler.last_epoch == 2


def test_saved_state_resumes_exactly(tmp_path):
    """Two steps, save, a third; a fresh backend loading the save and stepping once lands on the
    same weights (optimizer moments and schedule restored, not only the weights)."""
    a, ids = backend_and_data()
    step(a, ids), step(a, ids)
    a.save(tmp_path)
    step(a, ids)
    b, _ = backend_and_data()
    b.load(tmp_path)
    assert b.scheduler.last_epoch == 2 and b.lr() != a.lr()  # the schedule resumed at step 2, not 0 or 3
    step(b, ids)
    for pa, pb in zip(a.params, b.params):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_loading_something_else_is_one_line(tmp_path):
    backend, _ = backend_and_data()
    with pytest.raises(UserError, match="not a checkpoint of a deepspeed=none run"):
        backend.load(tmp_path)


class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint file could hold."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_deepspeed_checkpoint_files_that_would_run_code_are_refused_before_loading(tmp_path):
    """DeepSpeed unpickles its files with weights_only=False: each is read for the globals it names
    first. DeepSpeed's own state classes pass; a file naming os.system is one line, and never runs."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from kto_cli.backend import check_runs_no_code
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                         "state": {0: {"exp_avg": torch.zeros(3)}}}}, tmp_path / "optim_states.pt")
    check_runs_no_code(tmp_path)
    marker = tmp_path / "ran"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": RunsCode(marker)}, tmp_path / "model_states.pt")
    with pytest.raises(UserError, match=r"model_states\.pt: names posix\.system, which loading would call"):
        check_runs_no_code(tmp_path)
    assert not marker.exists()
