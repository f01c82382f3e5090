"""End-to-end runs of the loop on the tiny model and the shipped data (seconds each)."""
import logging
import shutil
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kto_cli.evaluate import read_samples
from kto_cli.metrics import read_metrics
from kto_cli.train import train

from conftest import TINY_RUN, boolean_mask_added, make_config

TINY = [*TINY_RUN, "trainer.lr=2e-3", "trainer.warmup_ratio=0",
        "trainer.schedule=constant", "dataset.max_train_rows=16", "dataset.max_eval_rows=8"]


@pytest.mark.slow
def test_tiny_run_learns_and_exports(tmp_path):
    summary = train(make_config(*TINY, "trainer.max_steps=40"), tmp_path)
    losses = [r["loss"] for r in read_metrics(tmp_path, "train")]
    assert len(losses) == 40 and losses[0] == pytest.approx(0.5, abs=1e-6)  # policy == reference at step 1
    assert sum(losses[-5:]) / 5 < 0.4  # it learns to tell the 16 pairs apart
    assert summary["eval_after"]["rewards/margins"] > summary["eval_before"]["rewards/margins"] == 0
    evals = read_metrics(tmp_path, "eval")
    assert [r["step"] for r in evals] == [0, 40]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert ids.shape[1] < model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] <= ids.shape[1] + 3
    assert (tmp_path / "checkpoints" / "step_0000040" / "trainer_state.json").is_file()
    assert not list(tmp_path.rglob("*.tmp-*"))  # no temp files left behind


@pytest.mark.slow
def test_same_seed_same_losses_and_resume_continues_them(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(make_config(*TINY, "trainer.max_steps=6", "trainer.save_every=3", "trainer.batch_size=4",
                      "trainer.micro_batch_size=2"), a)
    # b is a copy of a interrupted right after its step-3 checkpoint
    b.mkdir()
    shutil.copytree(a / "checkpoints" / "step_0000003", b / "checkpoints" / "step_0000003")
    shutil.copy(a / "reference_logps.safetensors", b)
    train(make_config(*TINY, "trainer.max_steps=6", "trainer.save_every=3", "trainer.batch_size=4",
                      "trainer.micro_batch_size=2", "trainer.resume=auto"), b)
    full = {r["step"]: r["loss"] for r in read_metrics(a, "train")}
    resumed = {r["step"]: r["loss"] for r in read_metrics(b, "train")}
    assert sorted(resumed) == [4, 5, 6]
    # resuming a again from its step-3 checkpoint drops the logged steps 4-6 before running them again
    shutil.rmtree(a / "checkpoints" / "step_0000006")
    train(make_config(*TINY, "trainer.max_steps=6", "trainer.save_every=3", "trainer.batch_size=4",
                      "trainer.micro_batch_size=2", "trainer.resume=auto"), a)
    assert [r["step"] for r in read_metrics(a, "train")] == [1, 2, 3, 4, 5, 6]
    for step, loss in resumed.items():
        assert loss == pytest.approx(full[step], abs=1e-6)
    wa = AutoModelForCausalLM.from_pretrained(a / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b / "final").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.slow
def test_resume_refuses_other_settings_and_falls_back_over_a_damaged_checkpoint(tmp_path, caplog, monkeypatch):
    """Other batch sizes or other data contents are one line naming them, before the model loads; a damaged newest
    checkpoint is a warning, and the run resumes from the one before with the uninterrupted losses."""
    from importlib import resources
    from kto_cli.config import UserError
    from kto_cli.train import Trainer
    data = tmp_path / "train.jsonl"
    src = resources.files("kto_cli").joinpath("assets/arith_train.jsonl").read_text().splitlines()[:16]
    data.write_text("\n".join(src) + "\n")
    args = [*TINY, f"dataset.train={data}", "trainer.max_steps=4", "trainer.save_every=1", "eval.generate=false"]
    run = tmp_path / "run"
    train(make_config(*args), run)
    # trainer.keep_checkpoints=3 (the default): the oldest went once the newest was complete
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_000000{s}" for s in (2, 3, 4)]
    monkeypatch.setattr(Trainer, "load_model", lambda self: pytest.fail("the model loaded"))  # refused before it
    with pytest.raises(UserError, match=r"step_0000004: written under other settings: trainer.batch_size 8 -> 4\."):
        train(make_config(*args, "trainer.resume=auto", "trainer.batch_size=4", "trainer.micro_batch_size=4"), run)
    data.write_text("\n".join(src[:-1] + [src[-1].replace('"chosen": "', '"chosen": "9')]) + "\n")
    with pytest.raises(UserError, match=r"written under other settings: the training examples"):
        train(make_config(*args, "trainer.resume=auto"), run)
    monkeypatch.undo()
    data.write_text("\n".join(src) + "\n")
    weights = run / "checkpoints" / "step_0000004" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    before = {r["step"]: r["loss"] for r in read_metrics(run, "train")}
    with caplog.at_level(logging.WARNING, logger="kto_cli"):
        train(make_config(*args, "trainer.resume=auto"), run)
    assert "step_0000004 is damaged" in caplog.text and "resuming from" in caplog.text
    after = {r["step"]: r["loss"] for r in read_metrics(run, "train")}
    assert after[4] == pytest.approx(before[4], abs=1e-6)


@pytest.mark.slow
def test_a_resumed_run_computes_what_its_evaluation_now_needs(tmp_path):
    """A KTO run checkpointed under eval.loss_metrics=false saved no held-out KL partners: resumed
    with the loss metrics, its reference pass is incomplete and runs again. An sft run that
    evaluated nothing at step 0 reports nothing before training when resumed."""
    short = [*TINY, "trainer.max_steps=2", "trainer.save_every=1", "eval.generate=false"]
    first = train(make_config(*short, "eval.loss_metrics=false"), tmp_path / "kto")
    assert "loss" not in first["eval_after"]
    shutil.rmtree(tmp_path / "kto" / "checkpoints" / "step_0000002")
    again = train(make_config(*short, "trainer.resume=auto"), tmp_path / "kto")
    assert "kl" in again["eval_after"] and again["eval_after"]["logps/accuracies"] == first["eval_after"]["logps/accuracies"]
    sft = [*short, "loss=sft", "eval.before_training=false"]
    train(make_config(*sft), tmp_path / "sft")
    shutil.rmtree(tmp_path / "sft" / "checkpoints" / "step_0000002")
    assert train(make_config(*sft, "trainer.resume=auto"), tmp_path / "sft")["eval_before"] == {}

@pytest.mark.slow
def test_imbalanced_data_warns_and_auto_weight_fixes_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kto_cli")
    imbalanced = [*TINY, "dataset.max_train_rows=40", "dataset.desirable_fraction=0.25", "trainer.max_steps=1"]
    train(make_config(*imbalanced), tmp_path / "a")
    assert "outside [1, 4/3]" in caplog.text and "between 4.000 and 5.333" in caplog.text
    caplog.clear()
    train(make_config(*imbalanced, "loss.auto_desirable_weight=true"), tmp_path / "b")
    assert "lambda_D = 4.0000" in caplog.text and "outside" not in caplog.text


@pytest.mark.slow
def test_start_up_check_passes_and_stops_a_wrong_layout(tmp_path, caplog, monkeypatch):
    """Eager attention with the shared-prompt rows (the KL sequence in the example's row): the check
    logs agreement; with the old bug
    (the boolean mask added to the scores) put back on purpose, the run stops before the reference
    pass with one line naming the layout and the override."""
    from kto_cli import logprobs
    from kto_cli.config import UserError
    caplog.set_level(logging.INFO, logger="kto_cli")
    eager = [*TINY, "trainer.max_steps=1", "model.attn_implementation=eager", "trainer.kl_prefix=false"]
    train(make_config(*eager), tmp_path / "a")
    assert "start-up check: log-probs as trained equal a plain forward" in caplog.text
    monkeypatch.setattr(logprobs, "attention_inputs", boolean_mask_added)
    with pytest.raises(UserError) as e:
        train(make_config(*eager), tmp_path / "b")
    message = str(e.value)
    assert "shared-prompt/packed rows" in message and "trainer.shared_prompt=false" in message and "\n" not in message
    assert not (tmp_path / "b" / "reference_logps.safetensors").exists()
    train(make_config(*eager, "trainer.shared_prompt=false"), tmp_path / "c")  # the named fix works


@pytest.mark.slow
def test_group_by_length_run(tmp_path):
    summary = train(make_config(*TINY, "trainer.max_steps=4", "trainer.group_by_length=true"), tmp_path)
    assert summary["steps"] == 4 and (tmp_path / "final" / "config.json").is_file()


def flaky_verifier(prompt, completion, row):
    """Raises on every other question, scores 1 on the rest."""
    if "odd" in str(prompt):
        raise ValueError("cannot judge parity")
    return True


@pytest.mark.slow
def test_generation_eval_writes_samples_and_survives_a_raising_verifier(tmp_path):
    """Before and after training the model answers every held-out prompt; samples.jsonl holds each
    answer with its score, and a verifier raising on some answers scores them 0 without ending the run."""
    from kto_cli.evaluate import read_samples
    summary = train(make_config(*TINY, "trainer.max_steps=2", "eval.generation.max_new_tokens=4", "verifier=python",
                                f"verifier.target={__name__}:flaky_verifier"), tmp_path)
    samples = read_samples(tmp_path / "samples.jsonl")
    assert sorted({s["step"] for s in samples}) == [0, 2] and len(samples) == 2 * 8  # 8 held-out prompts
    raised = [s for s in samples if s["detail"].startswith("error: ValueError")]
    assert raised and all(s["score"] == 0 for s in raised) and all(s["score"] == 1 for s in samples if s not in raised)
    after = summary["eval_after"]
    assert after["gen/errors"] == len(raised) / 2 and after["gen/score"] == pytest.approx(1 - len(raised) / 16)
    assert after["gen/score_low"] <= after["gen/score"] <= after["gen/score_high"]
    assert all(1 <= s["tokens"] <= 4 for s in samples) and len(summary["examples_after"]) == 3
    assert read_metrics(tmp_path, "eval")[0]["gen/score"] == summary["eval_before"]["gen/score"]


@pytest.mark.slow
def test_a_run_nobody_resumes_skips_the_first_answers_and_the_last_checkpoint(tmp_path):
    """eval.before_training=false: no generation at step 0 (the log-prob metrics the reference
    pass holds stay; a loss without a reference evaluates nothing at step 0);
    trainer.final_checkpoint=false: final/ but no optimizer state."""
    from kto_cli.evaluate import read_samples
    summary = train(make_config(*TINY, "trainer.max_steps=2", "eval.generation.max_new_tokens=2",
                                "eval.before_training=false", "trainer.final_checkpoint=false"), tmp_path)
    assert {s["step"] for s in read_samples(tmp_path / "samples.jsonl")} == {2}
    assert "gen/score" not in summary["eval_before"] and "rewards/margins" in summary["eval_before"]
    assert "gen/score" in summary["eval_after"]
    assert (tmp_path / "final" / "config.json").is_file() and not (tmp_path / "checkpoints").exists()
    sft = train(make_config(*TINY, "loss=sft", "trainer.max_steps=1", "eval.generation.max_new_tokens=2",
                            "eval.before_training=false"), tmp_path / "sft")
    assert sft["eval_before"] == {} and "logps/chosen" in sft["eval_after"]
    assert [m["step"] for m in read_metrics(tmp_path / "sft", "eval")] == [1]


@pytest.mark.slow
def test_a_nan_step_is_skipped_and_max_bad_steps_in_a_row_stop_the_run(tmp_path, monkeypatch, caplog):
    """A NaN loss at step 3 (KTO_CLI_INJECT_NAN): one line, no update (step 3's checkpoint holds step
    2's weights), the run goes on and exports final/. At steps 2-4 with max_bad_steps=3: the run
    stops (Diverged) at step 4, naming its last checkpoint, with no final/."""
    from safetensors.torch import load_file
    from kto_cli.checkpoint import Diverged
    monkeypatch.setenv("KTO_CLI_INJECT_NAN", "3")
    with caplog.at_level(logging.WARNING, logger="kto_cli"):
        train(make_config(*TINY, "trainer.max_steps=5", "trainer.save_every=1", "trainer.keep_checkpoints=0"),
              tmp_path / "a")
    assert "step 3: loss=nan, grad_norm=nan, skipped (1 in a row)" in caplog.text
    train_log = {r["step"]: r for r in read_metrics(tmp_path / "a", "train")}
    assert [s for s, r in train_log.items() if "skipped" in r] == [3] and train_log[4]["loss"] == train_log[4]["loss"]
    weights = [load_file(tmp_path / "a" / "checkpoints" / f"step_{s:07d}" / "model" / "model.safetensors")
               for s in (2, 3, 4)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[1][k], weights[2][k]) for k in weights[0])
    assert (tmp_path / "a" / "final" / "config.json").is_file()
    monkeypatch.setenv("KTO_CLI_INJECT_NAN", "2,3,4")
    with pytest.raises(Diverged, match=r"steps 2-4: 3 in a row .* the last checkpoint is .*step_0000003"):
        train(make_config(*TINY, "trainer.max_steps=6", "trainer.save_every=1"), tmp_path / "b")
    assert not (tmp_path / "b" / "final").exists()


@pytest.mark.slow
def test_a_disk_too_full_for_a_checkpoint_stops_before_writing_it(tmp_path, small_disk):
    """The checkpoint folder on a small disk: one line naming it, before anything is written."""
    from kto_cli.config import UserError
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    disk = small_disk(256 * 1024)
    subprocess.run(["mount", "--bind", str(disk), str(run / "checkpoints")], check=True)
    try:
        with pytest.raises(UserError, match=r"checkpoints: not enough free space for a checkpoint \(about \d+ MiB.*"
                                            r"no checkpoint was written before"):
            train(make_config(*TINY, "trainer.max_steps=2", "trainer.save_every=1", "eval.generate=false"), run)
        assert list((run / "checkpoints").iterdir()) == []
    finally:
        subprocess.run(["umount", str(run / "checkpoints")])


PHASED = [*TINY, "trainer.sft_steps=2", "trainer.max_steps=3", "trainer.eval_every=2", "eval.generation.max_new_tokens=3",
          "eval.generation.batch_size=2"]  # 4 batches of the 8 held-out prompts


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    train(make_config(*PHASED), run)
    return run


# where the signal comes: (function, which call of it), what the run says when it stops (None: it
# finishes, the signal coming when only the export is left)
PHASES = {
    "sft phase, its export": ("kto_cli.train.export_final", 1, "after the SFT phase"),
    "reference pass": ("kto_cli.reference.compute", 1, "after loading the model and the reference log-probs"),
    "sft phase, its first evaluation": ("kto_cli.generate.generate_batch", 1, "in the evaluation before training"),
    "evaluation between steps": ("kto_cli.generate.generate_batch", 14, "in the evaluation after step 2; checkpoint"),
    "last step": ("kto_cli.train.Trainer.optimizer_step", 5, "after step 3"),
    "final evaluation": ("kto_cli.generate.generate_batch", 17, "in the final evaluation; the final checkpoint is kept"),
    "export": ("kto_cli.train.export_final", 2, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(PHASES))
def test_a_signal_in_any_phase_stops_resumable_and_resuming_ends_as_an_uninterrupted_run(
        tmp_path, monkeypatch, uninterrupted, phase):
    """SIGUSR1 in each phase of a job with an SFT phase: the job stops at the next point that keeps
    its work (Preempted, exit 75 from kto-train), and `trainer.resume=auto` ends with the losses and
    held-out answers of a run nobody stopped."""
    import importlib
    import os
    import signal
    from kto_cli.preemption import Preempted
    target, nth, stops = PHASES[phase]
    where, name = target.rsplit(".", 1)
    owner = importlib.import_module(where) if not where.endswith("Trainer") else \
        importlib.import_module(where.rsplit(".", 1)[0]).Trainer
    real, calls = getattr(owner, name), []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, signalled)
    if stops is None:
        train(make_config(*PHASED), tmp_path)
    else:
        with pytest.raises(Preempted, match=stops):
            train(make_config(*PHASED), tmp_path)
        assert not (tmp_path / "final").exists()
        monkeypatch.setattr(owner, name, real)
        train(make_config(*PHASED, "trainer.resume=auto"), tmp_path)
    for sub in ("sft", "."):
        want, got = read_metrics(uninterrupted / sub), read_metrics(tmp_path / sub)
        assert [r["step"] for r in got] == [r["step"] for r in want], sub
        for w, g in zip(want, got):
            for k in w:
                if k.startswith(("train/loss", "eval/gen/score", "eval/rewards", "eval/logps")):
                    assert g[k] == pytest.approx(w[k], abs=1e-6), (sub, w["step"], k)
    samples = [(r["step"], r["completion"]) for r in read_samples(tmp_path / "samples.jsonl")]
    assert samples == [(r["step"], r["completion"]) for r in read_samples(uninterrupted / "samples.jsonl")]


def test_a_row_without_what_the_verifier_needs_stops_before_the_model_loads(tmp_path, monkeypatch):
    """verifier=choice needs each held-out row's options: one line naming file, row and field."""
    from kto_cli import train as train_mod
    from kto_cli.config import UserError
    monkeypatch.setattr(train_mod.Trainer, "load_model", lambda self: pytest.fail("the model loaded"))
    with pytest.raises(UserError, match=r"arith_eval.jsonl: row 1: field 'options' is missing \(verifier choice\)"):
        train(make_config(*TINY, "verifier=choice"), tmp_path)


@pytest.mark.slow
def test_an_sft_phase_equals_two_runs_and_is_the_reference(tmp_path):
    """trainer.sft_steps=3 gives the losses of `loss=sft max_steps=3` then the loss trained from
    its final/; the loss phase starts where the SFT phase ended, with it as the reference; a
    resumed job does not train its finished SFT phase again."""
    job, sft, kto = tmp_path / "job", tmp_path / "sft", tmp_path / "kto"
    summary = train(make_config(*TINY, "trainer.sft_steps=3", "trainer.max_steps=3", "eval.max_prompts=2"), job)
    train(make_config(*TINY, "loss=sft", "trainer.max_steps=3", "eval.max_prompts=2"), sft)
    train(make_config(*TINY, "trainer.max_steps=3", "eval.max_prompts=2", "model.source=hf",
                      f"model.name_or_path={sft / 'final'}"), kto)
    for ours, theirs in ((job / "sft", sft), (job, kto)):
        a, b = read_metrics(ours, "train"), read_metrics(theirs, "train")
        assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)
    assert read_metrics(job, "train")[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference
    phase = summary["sft_phase"]
    assert phase["steps"] == 3 and summary["eval_before"]["logps/chosen"] == pytest.approx(
        phase["eval_after"]["logps/chosen"], abs=1e-5)
    assert summary["eval_before"]["gen/score"] == phase["eval_after"]["gen/score"]
    train(make_config(*TINY, "trainer.sft_steps=3", "trainer.max_steps=3", "eval.max_prompts=2",
                      "trainer.resume=auto"), job)
    assert [r["step"] for r in read_metrics(job / "sft", "train")] == [1, 2, 3]
