"""Verifiers: turn (prompt, completion, row) into a score in [0, 1], judging what a model says.

    score, detail = make_verifier(VerifierConfig(name="exact")).score(prompt, completion, row)

Each needs some field of the row (the reference answer); `check_rows` says which row lacks it
before any model loads. A verifier that raises on one completion scores it 0 and records why; one
that returns something other than a bool or a number in [0, 1] is a mistake named in one line.
"""
import contextlib
import importlib
import math
import re
import signal
import threading
from dataclasses import dataclass, replace
from typing import Callable, Optional

from .config import UserError, VerifierConfig

NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def normalise(text) -> str:
    """Lower case, single spaces, no surrounding quotes or final punctuation."""
    text = " ".join(str(text).lower().split())
    return text.strip(" \"'`").rstrip(".!?;:,").strip()


def last_number(text: str) -> Optional[float]:
    found = NUMBER.findall(str(text).replace(",", ""))
    return float(found[-1]) if found else None


def reference(row: dict, field: str):
    """The reference answer: the row's `field`, else a preference pair's chosen completion."""
    if row.get(field) is not None:
        return row[field]
    chosen = row.get("chosen")
    if isinstance(chosen, list):  # a list of messages: the assistant's text
        chosen = "\n".join(m.get("content", "") for m in chosen if isinstance(m, dict))
    return chosen


class VerifierTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    """Raises VerifierTimeout in the block once `seconds` pass (Python code only: a call blocked in
    C returns first). No limit off the main thread or where SIGALRM does not exist."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise VerifierTimeout(f"took over {seconds:g} s (verifier.timeout_s)")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Verifier:
    name: str
    fn: Callable  # (prompt, completion, row) -> bool | float
    needs: tuple = ()  # row fields one of which must be present (the reference)
    threshold: float = 0.5  # a score at or above it passes (pass@k, labels)
    timeout_s: Optional[float] = None  # a call that takes longer raises VerifierTimeout

    def score(self, prompt, completion: str, row: dict) -> tuple:
        """(score in [0, 1], detail): a raising (or timed-out) verifier scores 0 and the detail says why."""
        try:
            with time_limit(self.timeout_s):
                value = self.fn(prompt, completion, row)
        except Exception as e:  # one bad completion must not end the run
            return 0.0, f"error: {type(e).__name__}: {e}"
        if isinstance(value, bool):
            return float(value), ""
        if isinstance(value, (int, float)) and not math.isnan(value) and 0 <= value <= 1:
            return float(value), ""
        raise UserError(f"verifier {self.name} returned {value!r}: it must return a bool or a number in [0, 1]")


def exact(field: str) -> Callable:
    return lambda prompt, completion, row: normalise(completion) == normalise(reference(row, field))


def number(field: str) -> Callable:
    def check(prompt, completion, row):
        got, want = last_number(completion), last_number(reference(row, field))
        return got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)
    return check


def choice(field: str, options_field: str) -> Callable:
    """The completion names exactly one of the row's options, and it is the reference."""
    def check(prompt, completion, row):
        said = normalise(completion)
        named = [o for o in row[options_field] if re.search(rf"\b{re.escape(normalise(o))}\b", said)]
        return len(named) == 1 and normalise(named[0]) == normalise(reference(row, field))
    return check


def regex(pattern: str, field: str) -> Callable:
    """re.search of the pattern in the completion; {answer} in the pattern stands for the reference."""
    def check(prompt, completion, row):
        filled = pattern.replace("{answer}", re.escape(str(reference(row, field)))) if "{answer}" in pattern else pattern
        return re.search(filled, completion) is not None
    return check


def imported(target: str) -> Callable:
    """`module:function`, any importable callable (prompt, completion, row) -> bool | float."""
    module, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"verifier.target={target}: cannot import it ({e})") from None
    if not callable(fn):
        raise UserError(f"verifier.target={target}: not callable")
    return fn


class RewardModel:
    """A sequence-classification model's probability that a completion is good: sigmoid of its one
    logit, or softmax over its labels, the last label read as "good". Its config is read when
    built (a mistake is one line at start); the weights load at the first completion."""

    def __init__(self, name: str):
        from transformers import AutoConfig
        try:
            config = AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise UserError(f"verifier.model={name}: cannot read its config ({str(e).splitlines()[0]})") from None
        if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
            raise UserError(f"verifier.model={name}: not a sequence-classification model "
                            f"(architectures: {config.architectures})")
        self.name, self.model, self.tokenizer = name, None, None

    def load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(self.name)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForSequenceClassification.from_pretrained(self.name).to(device).eval()

    def text(self, prompt, completion: str) -> str:
        """The conversation as the reward model reads it: its chat template where it has one."""
        if isinstance(prompt, list) and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}],
                                                      tokenize=False)
        if isinstance(prompt, list):
            prompt = "\n".join(m.get("content", "") for m in prompt)
        return f"{prompt}\n{completion}"

    def __call__(self, prompt, completion: str, row: dict) -> float:
        import torch
        if self.model is None:
            self.load()
        batch = self.tokenizer(self.text(prompt, completion), return_tensors="pt", truncation=True)
        with torch.no_grad():
            logits = self.model(**batch.to(self.model.device)).logits[0].float()  # (labels,)
        return float(torch.sigmoid(logits[0]) if logits.numel() == 1 else torch.softmax(logits, -1)[-1])


def make_verifier(cfg: VerifierConfig) -> Verifier:
    """The verifier a config names; mistakes (no pattern, an unimportable target) are one line."""
    if not 0 < cfg.threshold <= 1:
        raise UserError(f"verifier.threshold must be in (0, 1], got {cfg.threshold}")
    return replace(named_verifier(cfg), threshold=cfg.threshold)


def named_verifier(cfg: VerifierConfig) -> Verifier:
    field = cfg.field
    if cfg.name == "exact":
        return Verifier("exact", exact(field), (field, "chosen"))
    if cfg.name == "number":
        return Verifier("number", number(field), (field, "chosen"))
    if cfg.name == "choice":
        return Verifier("choice", choice(field, cfg.options_field), (cfg.options_field,))
    if cfg.name == "regex":
        if not cfg.pattern:
            raise UserError("verifier=regex needs verifier.pattern")
        try:
            re.compile(cfg.pattern.replace("{answer}", "x"))
        except re.error as e:
            raise UserError(f"verifier.pattern={cfg.pattern!r}: not a regular expression ({e})") from None
        return Verifier("regex", regex(cfg.pattern, field), (field, "chosen") if "{answer}" in cfg.pattern else ())
    if cfg.name == "python":
        if not cfg.target:
            raise UserError("verifier=python needs verifier.target=module:function")
        if cfg.timeout_s is not None and cfg.timeout_s <= 0:
            raise UserError(f"verifier.timeout_s must be positive (or null: no limit), got {cfg.timeout_s}")
        return Verifier(f"python {cfg.target}", imported(cfg.target), (), timeout_s=cfg.timeout_s)
    if cfg.name == "reward_model":
        if not cfg.model:
            raise UserError("verifier=reward_model needs verifier.model=FOLDER_OR_HUB_NAME")
        return Verifier(f"reward_model {cfg.model}", RewardModel(cfg.model), ())
    raise UserError(f"unknown verifier '{cfg.name}' (known: exact, number, choice, regex, python, reward_model)")


def check_rows(verifier: Verifier, rows: list) -> None:
    """One line naming the first row that lacks what the verifier needs, before any model loads.
    rows: (where, row dict), where is "file: row N"."""
    if not verifier.needs:
        return
    for where, row in rows:
        if not any(isinstance(row, dict) and row.get(f) is not None for f in verifier.needs):
            raise UserError(f"{where}: field '{verifier.needs[0]}' is missing (verifier {verifier.name})")
