"""kto-cli's generation (kto_cli/generate.py, as the in-run evaluation and kto-eval use it) side by
side with a bare batched `model.generate` loop, on the same model, prompts and settings.

    python scripts/bench_generate.py                    # SmolLM2-135M, the 64 held-out arith prompts
    python scripts/bench_generate.py --model tiny --repeats 5

Both: greedy, 32 new tokens at most, batches of 32 prompts, left padding, stop at EOS or <|im_end|>.
The bare loop pads with the tokenizer in the order given; kto-cli sorts prompts by length first.
Generated tokens count up to and including the stop token. Each side runs --repeats times
alternately in one process; the table gives the median.
"""
import argparse
import statistics
import time

import torch


def bare(model, tokenizer, prompts: list, max_new: int, batch: int, stops: list) -> int:
    """Generated tokens of the plain loop."""
    tokenizer.padding_side = "left"
    total = 0
    for start in range(0, len(prompts), batch):
        enc = tokenizer.pad({"input_ids": prompts[start:start + batch]}, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            stop = next((k for k, t in enumerate(row) if t in stops), len(row) - 1)
            total += stop + 1
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    from hydra import compose, initialize_config_module

    from kto_cli.config import GenerationConfig, register_configs, to_run_config
    from kto_cli.generate import generate, stop_ids
    from kto_cli.models import load_model
    from kto_cli.train import Trainer
    register_configs()
    with initialize_config_module("kto_cli.conf", version_base=None):
        cfg = to_run_config(compose("config", overrides=[f"model={a.model}"]))
    tr = Trainer(cfg, None)
    tr.load_inputs()
    gen = tr.generation_eval()
    prompts = [gen.split.sequence(i)[0] for i in gen.examples]
    model = load_model(cfg.model, tr.tokenizer).eval()
    gcfg = GenerationConfig(max_new_tokens=32, batch_size=32)
    times = {"kto-cli generate": [], "bare model.generate": []}
    tokens = {}
    with torch.no_grad():
        for _ in range(a.repeats):
            start = time.perf_counter()
            tokens["kto-cli generate"] = sum(s.tokens for s in generate(model, tr.tokenizer, prompts, gcfg, "cpu"))
            times["kto-cli generate"].append(time.perf_counter() - start)
            start = time.perf_counter()
            tokens["bare model.generate"] = bare(model, tr.tokenizer, prompts, 32, 32, stop_ids(tr.tokenizer))
            times["bare model.generate"].append(time.perf_counter() - start)
    print(f"\n{a.model}, {len(prompts)} prompts, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| generator | generated tokens | median s | tokens/s |\n|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {tokens[name]} | {med:.1f} | {tokens[name] / med:.0f} |")


if __name__ == "__main__":
    main()
