"""Makes the shipped feedback data: small number questions, each with a correct and a wrong answer.

    python scripts/make_arith_data.py            # writes kto_cli/assets/arith_{train,eval,val,test}.jsonl

Labels are honest and checkable by the code below: `chosen` is the right answer, `rejected` a
plausible mistake. Four kinds of question (a sum, the larger of two numbers, the number after n,
parity), easy enough that a 135M model's prior knowledge can be sharpened in a few minutes of CPU
training, so the default run shows what KTO changes. No question appears in two files.
"""
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "kto_cli" / "assets"
# A short system message replaces the chat template's default one, which would double each sequence.
SYSTEM = "Reply with the answer only."


def plus(rng):
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return f"What is {a} + {b}?", a + b, a + b + rng.choice([-2, -1, 1, 2])


def larger(rng):
    a, b = rng.sample(range(1, 100), 2)
    return f"Which is larger, {a} or {b}?", max(a, b), min(a, b)


def successor(rng):
    n = rng.randint(1, 200)
    return f"What number comes right after {n}?", n + 1, n + rng.choice([-1, 2])


def parity(rng):
    n = rng.randint(1, 500)
    right, wrong = ("even", "odd") if n % 2 == 0 else ("odd", "even")
    return f"Is {n} even or odd?", right, wrong


KINDS = (plus, larger, successor, parity)


def rows(n: int, rng: random.Random, seen: set) -> list:
    out = []
    while len(out) < n:
        question, right, wrong = rng.choice(KINDS)(rng)
        if question not in seen:
            seen.add(question)
            out.append(row(question, right, wrong))
    return out


def quota_rows(quotas: dict, rng: random.Random, seen: set) -> list:
    """Up to quotas[kind] new questions of each kind (fewer where the kind's questions run out), in
    random order."""
    out = []
    for kind, n in quotas.items():
        found = []
        for _ in range(200_000):
            if len(found) == n:
                break
            question, right, wrong = kind(rng)
            if question not in seen:
                seen.add(question)
                found.append(row(question, right, wrong))
        out += found
    rng.shuffle(out)
    return out


def row(question: str, right, wrong) -> dict:
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return {"prompt": prompt, "chosen": str(right), "rejected": str(wrong)}


def main() -> None:
    rng, seen = random.Random(240201306), set()
    # arith_val: 400 more questions for choosing recipes and hyperparameters, so that the held-out
    # 64 judge only the final choice; its own generator, so the other two files stay as they were.
    files = {"arith_eval": rows(64, rng, seen), "arith_train": rows(1000, rng, seen),
             "arith_val": rows(400, random.Random(7), seen)}
    # arith_test: 400 held out for comparing methods (the paper-claims experiment), where 64 questions
    # are too few: every sum and successor question no other file has (86 and 7 are left), 100
    # parity and the rest larger-of-two, near arith_val's mix of kinds.
    files["arith_test"] = quota_rows({plus: 86, successor: 7, parity: 100, larger: 207}, random.Random(8), seen)
    for name, data in files.items():
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        print(f"wrote {len(data)} rows to {path}")


if __name__ == "__main__":
    main()
