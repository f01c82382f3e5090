"""Each loss trains through the one loop on the tiny model, logs the shared metric names and saves
final/; the loop does only the work the loss needs, and mismatched data fails with one line."""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from kto_cli.config import UserError
from kto_cli.metrics import read_metrics
from kto_cli.objectives import choices, objective_class
from kto_cli.train import Trainer, train

from conftest import TINY_RUN, make_config, write_jsonl

pytestmark = pytest.mark.slow

TINY = [*TINY_RUN, "trainer.max_steps=3", "trainer.batch_size=4",
        "trainer.micro_batch_size=2", "dataset.max_train_rows=12", "dataset.max_eval_rows=6"]
EXTRA = {"ppo": ["loss/policy", "loss/critic", "clipfrac"], "orpo": ["nll"], "slic": ["nll"], "kto": ["kl", "kl/raw"]}


@pytest.mark.parametrize("loss", choices())
def test_every_loss_trains_logs_and_exports(tmp_path, loss):
    cfg = make_config(*TINY, f"loss={loss}")
    need = objective_class(cfg.loss).needs
    summary = train(cfg, tmp_path)
    train_lines = read_metrics(tmp_path, "train")
    assert [r["step"] for r in train_lines] == [1, 2, 3]
    keys = set(train_lines[0])
    assert {"grad_norm", "lr", "tokens/s", "logps/chosen"} <= keys
    if loss not in ("sft", "csft"):
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins"} <= keys
    if need.paired:
        assert "rewards/accuracies" in keys
    for key in EXTRA.get(loss, []):
        assert key in keys
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_lines)
    assert "logps/accuracies" in summary["eval_after"]
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert (tmp_path / "reference_logps.safetensors").is_file() == need.reference


def test_reference_pass_holds_only_what_the_loss_needs(tmp_path):
    train(make_config(*TINY, "loss=dpo"), tmp_path / "dpo")
    train(make_config(*TINY, "loss=kto"), tmp_path / "kto")
    train(make_config(*TINY, "loss=ppo"), tmp_path / "ppo")
    keys = {}
    for name in ("dpo", "kto", "ppo"):
        with safe_open(str(tmp_path / name / "reference_logps.safetensors"), "pt") as f:
            keys[name] = set(f.keys())
    assert keys["dpo"] == {"train", "eval"}  # no KL partners, no per-token values
    assert keys["kto"] == {"train", "train_kl", "eval", "eval_kl"}
    assert keys["ppo"] == {"train", "train_tokens", "eval", "eval_tokens"}
    assert (tmp_path / "ppo" / "final" / "value_head.safetensors").is_file()


def test_csft_control_tokens_reach_the_exported_tokenizer(tmp_path):
    train(make_config(*TINY, "loss=csft"), tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert {"<|good|>", "<|bad|>"} <= set(tok.get_vocab())
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "2 + 2?"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|good|>")


UNPAIRED = [{"prompt": f"q{i}", "completion": f"{'good' if k else 'bad'} {i}", "label": bool(k)}
            for i in range(6) for k in (1, 0)]


def test_paired_loss_on_unpaired_data_says_which_option_pairs_it(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", UNPAIRED)
    args = [*TINY, f"dataset.train={path}", "dataset.eval=null", "loss=dpo"]
    with pytest.raises(UserError, match="loss=dpo needs preference pairs.*dataset.pair_by_prompt=true"):
        train(make_config(*args), tmp_path / "a")
    train(make_config(*args, "dataset.pair_by_prompt=true"), tmp_path / "b")  # pairs q_i's two completions
    with pytest.raises(UserError, match="dataset.unpair=both"):
        train(make_config(*TINY, "loss=simpo", "dataset.unpair=one"), tmp_path / "c")


def test_paired_data_feeds_every_kind_of_loss(tmp_path):
    """One paired dataset: dpo batches pairs, kto unpairs them, sft takes the chosen side."""
    seen = {}
    for loss in ("dpo", "kto", "sft"):
        tr = Trainer(make_config(*TINY, f"loss={loss}"), tmp_path / loss)
        tr.load_inputs()
        seen[loss] = tr.units["train"]
    assert seen["dpo"].shape == (12, 2)  # (chosen, rejected) index pairs
    assert len(seen["kto"]) == 24 and len(seen["sft"]) == 12


LAYOUTS = {"separate": ["trainer.shared_prompt=false"], "shared": [],
           "shared_row": ["trainer.kl_prefix=false", "trainer.attention_blocks=0"],
           "shared_row_dense_mask": ["trainer.kl_prefix=false", "trainer.attention_blocks=null"],
           "packed": ["trainer.packing=true", "trainer.pack_length=512", "trainer.attention_blocks=0"],
           "packed_dense_mask": ["trainer.packing=true", "trainer.pack_length=512", "trainer.attention_blocks=null"],
           "packed_separate": ["trainer.shared_prompt=false", "trainer.packing=true", "trainer.pack_length=512"]}
CHECKPOINTED = ("separate", "shared", "shared_row", "packed")  # under gradient checkpointing too


@pytest.mark.parametrize("loss", ["kto", "dpo", "sft"])
def test_batch_layouts_change_no_number(tmp_path, loss):
    """kto (example + KL sequence) and dpo (chosen + rejected) share each prompt's computation by
    default (KTO's KL sequence on the prompt's cached keys and values, or in the example's row;
    attention by blocks or through a dense mask), and packing puts several sequences in a row (here
    the whole micro-batch); the losses equal those of one padded row per sequence, with gradient
    checkpointing as without."""
    runs = {}
    layouts = {**LAYOUTS, **{f"{name}_checkpointed": [*LAYOUTS[name], "trainer.gradient_checkpointing=true"]
                             for name in CHECKPOINTED}}
    for name, overrides in layouts.items():
        train(make_config(*TINY, f"loss={loss}", "trainer.lr=1e-3", *overrides), tmp_path / name)
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name, "train")]
    for name in layouts:
        assert runs[name] == pytest.approx(runs["separate"], abs=1e-5), name


@pytest.mark.parametrize("loss", ["kto", "dpo"])
def test_truncated_prompts_stay_shared(tmp_path, loss):
    """At max_length 86 / max_prompt_length 80 the shipped prompts (~82 tokens with the tiny
    tokenizer) are cut to 80 whatever the completion, keeping the template header: every example and
    its KL sequence (or a pair's two sides) still share their prompt, and the shared rows give the
    losses of separate forwards."""
    short = ["dataset.max_length=86", "dataset.max_prompt_length=80"]
    tr = Trainer(make_config(*TINY, f"loss={loss}", *short), tmp_path / "probe")
    tr.load_inputs()
    split = tr.splits["train"]
    assert (split.prompt_len > 80).any()
    assert all(split.kl_sequence(i)[0] == split.sequence(i)[0] for i in range(len(split)))
    assert all(split.sequence(c)[0] == split.sequence(r)[0] for c, r in split.pairs())
    runs = {}
    for name, overrides in (("separate", ["trainer.shared_prompt=false"]), ("shared", [])):
        train(make_config(*TINY, f"loss={loss}", "trainer.lr=1e-3", *short, *overrides), tmp_path / name)
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name, "train")]
    assert runs["shared"] == pytest.approx(runs["separate"], abs=1e-5)


@pytest.mark.parametrize("loss", ["kto", "sft"])
def test_held_out_log_probs_without_the_loss_equal_those_with_it(tmp_path, loss):
    """eval.loss_metrics=false computes the held-out log-probs as the reference pass does (a prompt
    once for all its completions, no KL partners): the same values as the loss's micro-batches, so
    the same accuracies; KTO's reference pass then skips the held-out KL partners."""
    trainers = {}
    for metrics in ("true", "false"):
        tr = trainers[metrics] = Trainer(make_config(*TINY, f"loss={loss}", f"eval.loss_metrics={metrics}"),
                                         tmp_path / metrics)
        tr.setup()
        torch.manual_seed(1)  # the same nudge in both: the policy is no longer the reference
        with torch.no_grad():
            for w in tr.model.parameters():
                w.add_(0.01 * torch.randn_like(w))
    with_loss, without = trainers["true"], trainers["false"]
    with torch.no_grad():  # as evaluate() runs them
        _, expected = with_loss.eval_loss("policy")
        assert without.eval_logps("policy") == pytest.approx(expected, abs=1e-4)
    with_metrics, only = with_loss.evaluate(1), without.evaluate(1)
    assert "loss" in with_metrics and "loss" not in only
    for key in ("logps/accuracies", "rewards/accuracies"):
        assert only.get(key) == with_metrics.get(key), key
    if loss == "kto":
        assert with_loss.ref.eval_kl is not None and without.ref.eval_kl is None
