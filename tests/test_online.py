"""Online rounds on the tiny model: each round trains on the answers of the policy as the round
starts, labelled by the verifier, against the reference that online.reference names; a run
stopped mid-round or while sampling resumes to the numbers of an uninterrupted one."""
import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from kto_cli.config import GenerationConfig, UserError
from kto_cli.generate import generate
from kto_cli.logprobs import plain_logps
from kto_cli.metrics import read_metrics
from kto_cli.models import load_model
from kto_cli.files import read_jsonl
from kto_cli.online import OnlineTrainer, chosen_prompts
from kto_cli.preemption import Preempted
from kto_cli.train import train

from conftest import TINY_RUN, make_config

pytestmark = pytest.mark.slow

ONLINE = (*TINY_RUN, "trainer.lr=2e-3", "trainer.warmup_ratio=0", "trainer.schedule=constant",
          "dataset.max_train_rows=16", "dataset.max_eval_rows=8", "eval.max_prompts=2", "trainer.max_steps=null",
          "online.prompts=6", "online.generation.n=2", "online.generation.max_new_tokens=100", "online.rounds=2",
          "online.steps_per_round=3", "verifier=regex", "verifier.pattern='[aeiou]'")


def read_round(run_dir, r: int) -> list:
    """Round r's (1-based) trained-on answers of a run."""
    return read_jsonl(run_dir / "rounds" / str(r) / "samples.jsonl")


def losses(run_dir) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


def answers_of(model, cfg, tr, r: int) -> list:
    """The completions round r (1-based) trains on, made here from `model` directly."""
    picked = chosen_prompts(tr.prompts, cfg.online.prompts, cfg.trainer.seed + r - 1)
    gen = GenerationConfig(temperature=1.0, n=2, max_new_tokens=100, seed=r - 1)
    samples = generate(model, tr.tokenizer, [tr.prompts.sequence(i)[0] for i in picked], gen)
    return [s.text for s in samples if s.finished and s.text]


@pytest.mark.parametrize("reference", ["initial", "round"])
def test_each_round_trains_on_the_answers_of_the_policy_as_it_starts(tmp_path, reference):
    """Round 1 answers with the initial policy, round 2 with the policy after round 1's steps; each
    round's reference log-probs are the initial policy's (initial) or the round's first policy's
    (round), computed by the one model held with those weights swapped in."""
    cfg = make_config(*ONLINE, "trainer.save_every=3", f"online.reference={reference}")
    summary = train(cfg, tmp_path)
    tr = OnlineTrainer(cfg, tmp_path / "x")
    tr.load_inputs()
    initial = load_model(cfg.model, tr.tokenizer)
    after_round_1 = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "step_0000003" / "model")
    for r, model in ((1, initial), (2, after_round_1)):
        rows = read_round(tmp_path, r)
        assert [row["completion"] for row in rows] == answers_of(model, cfg, tr, r)
        assert [row["label"] for row in rows] == [any(c in row["completion"] for c in "aeiou") for row in rows]
        split = tr.round_split(tmp_path / "rounds" / str(r) / "samples.jsonl")
        ref_model = initial if reference == "initial" else model
        want = plain_logps(ref_model, [split.sequence(i) for i in range(len(split))])
        got = load_file(str(tmp_path / "rounds" / str(r) / "reference_logps.safetensors"))["train"]
        assert torch.allclose(got, want, atol=1e-4)
    assert read_round(tmp_path, 1) != read_round(tmp_path, 2)
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_metrics(tmp_path, "eval")] == [0, 3, 6]  # before, each round's end
    rounds = read_metrics(tmp_path, "online")
    assert [(r["step"], r["round"]) for r in rounds] == [(0, 1), (3, 2)]
    assert [r["kept"] for r in rounds] == [len(read_round(tmp_path, k)) for k in (1, 2)]
    assert all(r["answers"] == 12 for r in rounds) and summary["rounds"] == [
        {k: v for k, v in r.items() if k not in ("step", "time")} for r in rounds]


def test_resume_in_the_middle_of_round_two_equals_an_uninterrupted_run(tmp_path):
    """A copy of a run stopped after step 4 (round 2's first step) resumes with round 2's answers
    and reference as they were written (the policy has moved since: neither can be made again),
    without sampling, and ends with the uninterrupted run's losses and weights."""
    args = (*ONLINE, "trainer.save_every=4", "online.reference=round")
    a, b = tmp_path / "a", tmp_path / "b"
    train(make_config(*args), a)
    b.mkdir()
    shutil.copytree(a / "checkpoints" / "step_0000004", b / "checkpoints" / "step_0000004")
    shutil.copytree(a / "rounds", b / "rounds")
    lines = (a / "metrics.jsonl").read_text().splitlines()
    (b / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= 4))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("kto_cli.online.generate", lambda *a, **k: pytest.fail("a finished round was sampled again"))
        train(make_config(*args, "trainer.resume=auto"), b)
    assert sorted(losses(b)) == [1, 2, 3, 4, 5, 6]
    for step, loss in losses(a).items():
        assert losses(b)[step] == pytest.approx(loss, abs=1e-6)
    assert [r["round"] for r in read_metrics(b, "online")] == [1, 2]
    wa = AutoModelForCausalLM.from_pretrained(a / "final").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b / "final").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # resumed again when finished, it samples no third round; under other online settings its rounds are refused
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("kto_cli.online.generate", lambda *a, **k: pytest.fail("a finished run sampled"))
        train(make_config(*args, "trainer.resume=auto"), b)
    assert sorted(p.name for p in (b / "rounds").iterdir()) == ["1", "2"]
    with pytest.raises(UserError, match=r"written under other settings: online.generation.top_p 1.0 -> 0.9\."):
        train(make_config(*args, "trainer.resume=auto", "online.generation.top_p=0.9"), b)  # the checkpoint's check
    with pytest.raises(UserError, match=r"rounds/2: written by a run with other .* settings"):
        train(make_config(*args, "trainer.resume=auto", "trainer.resume_force=true", "online.generation.top_p=0.9"), b)


def test_a_signal_while_sampling_stops_with_the_rounds_answers_and_resumes(tmp_path, monkeypatch):
    """SIGUSR1 while round 2 samples: its answers are written, the run stops with the checkpoint of
    step 3 (round 2's start), and resuming trains round 2 on those answers as an uninterrupted run does."""
    from kto_cli import online
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train(make_config(*ONLINE), full)
    real, calls = online.generate, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args, **kwargs)
    monkeypatch.setattr(online, "generate", signalled)
    with pytest.raises(Preempted, match="after step 3"):
        train(make_config(*ONLINE), stopped)
    assert (stopped / "checkpoints" / "step_0000003").is_dir() and read_round(stopped, 2) == read_round(full, 2)
    train(make_config(*ONLINE, "trainer.resume=auto"), stopped)
    assert len(calls) == 2
    for step, loss in losses(full).items():
        assert losses(stopped)[step] == pytest.approx(loss, abs=1e-6)


def always(prompt, completion, row):
    return True


def test_a_round_where_every_answer_passes(tmp_path, caplog):
    """KTO trains on it (z from the KL partners; the imbalance warned of); dpo has no pairs in
    it, says so in one line per round and skips its steps, and the run goes on to its end."""
    pass_all = ("verifier=python", f"verifier.target={__name__}:always")
    kto = train(make_config(*ONLINE, *pass_all), tmp_path / "kto")
    assert sorted(losses(tmp_path / "kto")) == [1, 2, 3, 4, 5, 6] and all(r["pass_rate"] == 1 for r in kto["rounds"])
    assert "0 undesirable examples" in caplog.text
    caplog.clear()
    dpo = train(make_config(*ONLINE, *pass_all, "loss=dpo"), tmp_path / "dpo")
    said = [r.message for r in caplog.records if "online round" in r.message and "skipped" in r.message]
    assert said == [f"online round {r}: no pairs of a passing and a failing answer to one prompt among its answers: "
                    "its 3 steps are skipped" for r in (1, 2)]
    assert losses(tmp_path / "dpo") == {} and dpo["steps"] == 6 and (tmp_path / "dpo" / "final").is_dir()


def test_prompt_only_rows_train_and_a_row_missing_the_verifiers_field_is_one_line(tmp_path):
    """Rows with a prompt and an answer are enough; a row without the verifier's field is named
    (file, row, field) before any model loads."""
    rows = [{"prompt": f"What is {k} + 1?", "answer": str(k + 1)} for k in range(6)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = (*ONLINE, f"dataset.train={path}", "dataset.eval=null", "verifier=exact", "online.rounds=1")
    summary = train(make_config(*args), tmp_path / "run")
    assert summary["rounds"][0]["prompts"] == 6
    del rows[3]["answer"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("kto_cli.train.load_model", lambda *a: pytest.fail("a model loaded"))
        with pytest.raises(UserError, match=rf"^{path}: row 4: field 'answer' is missing \(verifier exact\)$"):
            train(make_config(*args), tmp_path / "bad")


def test_sampling_prompts_carry_no_control_tokens(tmp_path, monkeypatch):
    """With loss=csft the training prompts end with <|good|> or <|bad|> by label; the policy answers
    them without either (it has not learned them yet)."""
    from kto_cli import online
    from kto_cli.models import load_tokenizer
    seen, real = [], online.generate
    monkeypatch.setattr(online, "generate", lambda model, tok, prompts, cfg, **kw: seen.extend(prompts) or real(
        model, tok, prompts, cfg, **kw))
    train(make_config(*ONLINE, "loss=csft", "online.rounds=1"), tmp_path)
    plain = load_tokenizer(make_config(*TINY_RUN).model)
    assert len(seen) == 6 and all(max(p) < len(plain) for p in seen)  # control tokens come after the vocabulary


def test_answers_all_cut_at_the_limit_are_one_line(tmp_path):
    with pytest.raises(UserError, match="online: all 12 answers were empty or cut at online.generation.max_new_tokens=1"):
        train(make_config(*ONLINE, "online.generation.max_new_tokens=1"), tmp_path)
