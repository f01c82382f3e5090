"""Every verifier on hand-made rows; bad configs and rows are one line; a raising verifier scores 0."""
import time

import pytest

from kto_cli.config import UserError, VerifierConfig
from kto_cli.verifiers import check_rows, last_number, make_verifier, normalise

ARITH = {"prompt": "What is 10 + 11?", "chosen": "21", "rejected": "20"}


def score(name, completion, row, **kw):
    return make_verifier(VerifierConfig(name=name, **kw)).score("p", completion, row)


def test_exact_normalises_and_falls_back_to_chosen():
    assert score("exact", " Odd. ", {"answer": "odd"}) == (1.0, "")
    assert score("exact", "21", ARITH)[0] == 1.0  # no 'answer': the pair's chosen side
    assert score("exact", "The answer is 21", ARITH)[0] == 0.0
    assert normalise('"Hello,  World!"') == "hello, world"


def test_number_takes_the_last_number():
    assert score("number", "10 + 11 = 21.", ARITH)[0] == 1.0
    assert score("number", "21, no wait, 20", ARITH)[0] == 0.0
    assert score("number", "no idea", ARITH)[0] == 0.0
    assert last_number("1,024 items") == 1024.0 and last_number("-3.5") == -3.5


def test_choice_needs_exactly_one_option_named():
    row = {"options": ["even", "odd"], "answer": "odd"}
    assert score("choice", "It is odd.", row)[0] == 1.0
    assert score("choice", "even", row)[0] == 0.0
    assert score("choice", "odd or even", row)[0] == 0.0


def test_regex_with_and_without_the_answer():
    assert score("regex", "Final: 21", ARITH, pattern=r"Final: {answer}$")[0] == 1.0
    assert score("regex", "Final: 211", ARITH, pattern=r"Final: {answer}$")[0] == 0.0
    assert score("regex", "yes", {}, pattern=r"^(yes|no)$")[0] == 1.0
    with pytest.raises(UserError, match="needs verifier.pattern"):
        make_verifier(VerifierConfig(name="regex"))
    with pytest.raises(UserError, match="not a regular expression"):
        make_verifier(VerifierConfig(name="regex", pattern="("))


def always_half(prompt, completion, row):
    return 0.5


def broken(prompt, completion, row):
    raise KeyError("answer")


def out_of_range(prompt, completion, row):
    return 3


def hangs(prompt, completion, row):
    """Passes after 3 s: the test fails, rather than hangs, if nothing stops it sooner."""
    until = time.perf_counter() + 3
    while time.perf_counter() < until:
        time.sleep(0.01)
    return True


def test_a_hanging_python_verifier_times_out_and_scores_zero():
    """verifier.timeout_s stops a check that never returns: that completion scores 0 with the
    reason recorded, and the next one is scored as usual (the timer is disarmed)."""
    started = time.perf_counter()
    value, detail = score("python", "x", {}, target=f"{__name__}:hangs", timeout_s=0.2)
    assert value == 0.0 and detail == "error: VerifierTimeout: took over 0.2 s (verifier.timeout_s)"
    assert time.perf_counter() - started < 2
    assert score("python", "x", {}, target=f"{__name__}:always_half", timeout_s=0.2) == (0.5, "")
    time.sleep(0.3)  # a timer left armed would fire here
    with pytest.raises(UserError, match="verifier.timeout_s must be positive"):
        make_verifier(VerifierConfig(name="python", target=f"{__name__}:always_half", timeout_s=0))


def test_python_target_errors_and_bad_values():
    assert score("python", "x", {}, target=f"{__name__}:always_half") == (0.5, "")
    value, detail = score("python", "x", {}, target=f"{__name__}:broken")
    assert value == 0.0 and detail.startswith("error: KeyError")  # the run goes on
    with pytest.raises(UserError, match="returned 3"):
        score("python", "x", {}, target=f"{__name__}:out_of_range")
    with pytest.raises(UserError, match="cannot import"):
        make_verifier(VerifierConfig(name="python", target="no_such_module:fn"))
    with pytest.raises(UserError, match="unknown verifier 'vibes'"):
        make_verifier(VerifierConfig(name="vibes"))


def test_rows_without_the_reference_are_named_before_any_model_loads():
    exact = make_verifier(VerifierConfig(name="exact"))
    check_rows(exact, [("eval.jsonl: row 1", ARITH), ("eval.jsonl: row 2", {"prompt": "q", "answer": "a"})])
    with pytest.raises(UserError, match=r"eval.jsonl: row 3: field 'answer' is missing \(verifier exact\)"):
        check_rows(exact, [("eval.jsonl: row 1", ARITH), ("eval.jsonl: row 3", {"prompt": "q", "label": True})])


def test_reward_model_scores_with_a_sequence_classifier(tmp_path):
    """The score is the classifier's own sigmoid of its one logit on the rendered conversation; a
    folder that holds no such model is one line at start, before any weights load."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from kto_cli.models import tiny_tokenizer
    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    verifier = make_verifier(VerifierConfig(name="reward_model", model=str(tmp_path / "rm"), threshold=0.3))
    prompt = [{"role": "user", "content": "What is 10 + 11?"}]
    got, detail = verifier.score(prompt, "21", {})
    rm = verifier.fn
    text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "21"}], tokenize=False)
    with torch.no_grad():
        want = torch.sigmoid(rm.model(**tok(text, return_tensors="pt")).logits[0, 0]).item()
    assert detail == "" and 0 < got < 1 and got == pytest.approx(want, abs=1e-6) and verifier.threshold == 0.3
    assert verifier.score(prompt, "20", {})[0] != got  # it reads the completion
    with pytest.raises(UserError, match="needs verifier.model"):
        make_verifier(VerifierConfig(name="reward_model"))
    with pytest.raises(UserError, match="not a sequence-classification model"):
        (tmp_path / "lm").mkdir()
        (tmp_path / "lm" / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
        make_verifier(VerifierConfig(name="reward_model", model=str(tmp_path / "lm")))
    with pytest.raises(UserError, match="verifier.threshold must be in"):
        make_verifier(VerifierConfig(threshold=0))
