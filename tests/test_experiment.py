"""kto-experiment: spec checks, the verdict rules and intervals, the choice of a grid point on
validation only, and the shipped paper_claims experiment end to end on the tiny model (resumed
without training again)."""
import json
import math
from pathlib import Path

import pytest
import yaml

from kto_cli.config import UserError
from kto_cli.experiment import Experiment, load_spec, main, point_name
from kto_cli.experiment_report import verdict
from kto_cli.report import mean_interval


def write_spec(tmp_path: Path, body: dict) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("body, words", [
    ({"arms": {"a": {}}, "seed": [0]}, "spec.yaml: seed: unknown key"),
    ({"arms": {"b": {"start": "a"}, "a": {}}}, "arms.b.start: must name an arm listed before it"),
    ({"arms": {"a": {"train": False}, "b": {"start": "a"}}}, "arms.b.start: arm 'a' trains nothing"),
    ({"arms": {"a": {"grid": {"loss.beta": 0.1}}}}, "arms.a.grid: a mapping of override keys to non-empty lists"),
    ({"arms": {"a": {}}, "claims": [{"claim": "x", "a": "a", "b": "z", "test": "better"}]}, "claims[0]: arms 'a' and 'z'"),
    ({"arms": {"a": {}}, "claims": [{"claim": "x", "a": "a", "b": "a", "test": "wins"}]}, "claims[0].test: one of"),
    ({"arms": {}}, "arms: a mapping of arm names"),
])
def test_a_bad_spec_is_one_line_naming_the_file_and_key(tmp_path, body, words):
    with pytest.raises(UserError, match=None) as e:
        load_spec(write_spec(tmp_path, body))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_wrong_override_fails_before_anything_trains(tmp_path, capsys):
    spec = write_spec(tmp_path, {"arms": {"a": {"overrides": ["loss=kto", "loss.betta=0.1"]}}})
    with pytest.raises(SystemExit) as e:
        main([spec, "--out", str(tmp_path / "out"), "model=tiny"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss.betta" in err[0]
    assert not (tmp_path / "out").exists()


def test_every_run_of_the_shipped_experiment_composes():
    spec = load_spec("paper_claims")
    assert len(spec.seeds) >= 3 and len(spec.arms) == 9
    Experiment(spec, Path("unused"), []).check()


def test_mean_interval_is_students_t():
    # values 0.70, 0.74, 0.72: mean 0.72, sample sd 0.02, t(0.975, 2) = 4.303: half-width 4.303 * 0.02 / sqrt(3)
    mean, low, high = mean_interval([0.70, 0.74, 0.72])
    assert mean == pytest.approx(0.72) and high - mean == pytest.approx(4.303 * 0.02 / math.sqrt(3))
    assert mean - low == pytest.approx(high - mean)
    assert math.isnan(mean_interval([0.5])[1])


@pytest.mark.parametrize("test, low, high, expected", [
    ("better", 0.01, 0.2, "holds"), ("better", -0.01, 0.2, "inconclusive"), ("better", -0.2, 0.0, "does not hold"),
    ("at_least", -0.04, 0.1, "holds"), ("at_least", -0.06, 0.1, "inconclusive"), ("at_least", -0.3, -0.06, "does not hold"),
    ("close", -0.05, 0.05, "holds"), ("close", -0.02, 0.07, "inconclusive"), ("close", 0.06, 0.2, "does not hold"),
    ("better", math.nan, math.nan, "inconclusive (fewer than 2 seeds)"),
])
def test_verdicts_read_the_interval_against_the_margin(test, low, high, expected):
    assert verdict(test, low, high, 0.05) == expected


def test_the_grid_point_is_chosen_on_validation_at_the_first_seed(tmp_path):
    spec = load_spec(write_spec(tmp_path, {"seeds": [3, 4], "arms": {"a": {"grid": {"loss.beta": [0.1, 0.5, 1.0]}}}}))
    exp = Experiment(spec, tmp_path / "out", [])
    arm = spec.arms["a"]
    for beta, score in ((0.1, 0.4), (0.5, 0.6), (1.0, 0.6)):  # a tie: the first listed wins
        where = exp.run_dir(arm, {"loss.beta": beta}, 3) / "validation"
        where.mkdir(parents=True)
        (where / "eval.json").write_text(json.dumps({"gen/score": score}))
    assert exp.chosen(arm) == {"loss.beta": 0.5} and point_name(exp.chosen(arm)) == "loss.beta=0.5"


SMOKE = ["model=tiny", "trainer.progress=false", "trainer.max_steps=2", "dataset.max_train_rows=24",
         "dataset.max_eval_rows=8", "eval.max_prompts=4", "eval.generation.max_new_tokens=3"]


@pytest.mark.slow
def test_paper_claims_runs_end_to_end_on_the_tiny_model_and_resumes(tmp_path, capsys):
    out = tmp_path / "pc"
    main(["paper_claims", "--out", str(out), "--seeds", "0,1", *SMOKE])
    report = json.loads((out / "report.json").read_text())
    spec = load_spec("paper_claims")
    assert [a["arm"] for a in report["arms"]] == list(spec.arms)
    assert len(report["claims"]) == len(spec.claims)
    assert all(c["verdict"] for c in report["claims"]) and all(len(c["differences"]) == 2 for c in report["claims"])
    kto = next(a for a in report["arms"] if a["arm"] == "kto")
    assert set(kto["validation"]) == {"loss.beta=0.1", "loss.beta=1.0"}
    for seed in (0, 1):
        run = out / "kto" / kto["chosen"] / f"seed{seed}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["eval_after"]["gen/score"] == kto["seeds"][str(seed)]["score"]
        # before_training=false, loss_metrics=false: at step 0 only the accuracies the reference pass gives
        assert set(summary["eval_before"]) == {"logps/accuracies", "rewards/accuracies"}
        assert "loss" not in summary["eval_after"] and "rewards/accuracies" in summary["eval_after"]
        config = yaml.safe_load((run / "config.yaml").read_text())
        sft = spec.arms["sft"]
        sft_dir = out / "sft" / point_name(Experiment(spec, out, []).chosen(sft)) / f"seed{seed}" / "final"
        assert config["model"]["name_or_path"] == str(sft_dir) and config["seed"] == seed
        assert not (run / "checkpoints").exists() and not (run / "final").exists()  # only start models are kept
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| kto | sft |" in (out / "report.md").read_text()

    # A second invocation trains nothing: every run's summary is read back, the report is the same.
    stamps = {p: p.stat().st_mtime for p in out.rglob("summary.json")}
    main(["paper_claims", "--out", str(out), "--seeds", "0,1", *SMOKE])
    assert {p: p.stat().st_mtime for p in out.rglob("summary.json")} == stamps
    assert json.loads((out / "report.json").read_text())["claims"] == report["claims"]


def test_online_arith_composes_every_run():
    spec = load_spec("online_arith")
    assert list(spec.arms) == ["sft", "offline", "offline_same_time", "online_kto", "online_dpo", "online_rs_sft"]
    Experiment(spec, Path("unused"), SMOKE).check()  # a wrong override in any arm fails here


@pytest.mark.slow
def test_an_arm_of_online_rounds_is_reported_round_by_round(tmp_path, capsys):
    """An online arm evaluates at each round's end: the report has a by-step table and a third panel."""
    spec = tmp_path / "online.yaml"
    spec.write_text("seeds: [0]\narms:\n  online_kto: {overrides: [recipe=online_arith]}\n")
    out = tmp_path / "oa"
    main([str(spec), "--out", str(out), *SMOKE, "online.prompts=4", "online.generation.n=2",
          "online.generation.max_new_tokens=100", "online.rounds=2", "online.steps_per_round=1", "verifier=regex",
          "verifier.pattern='[aeiou]'", "trainer.sft_steps=0"])
    arm = json.loads((out / "report.json").read_text())["arms"][0]
    assert [step for step, _, _ in arm["curve"]] == [0, 1, 2] and arm["curve"][-1][1] == arm["score"][0]
    md = (out / "report.md").read_text()
    assert "| arm | step 0 | step 1 | step 2 |" in md and f"| online_kto | {100 * arm['curve'][0][1]:.1f} |" in md
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
