"""Typed run configuration.

The dataclasses below are registered with Hydra's ConfigStore as the schema of `conf/config.yaml`,
so a YAML file or an override with an unknown key or a wrong type (`loss.beta=abc`) fails while
Hydra composes, before any model loads. `validate` adds the checks a type cannot express.
"""
import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


# Rows this long and longer are computed by blocks under sdpa (trainer.attention_blocks). Below, one
# dense mask is cheaper: measured on CPU (docs/benchmarks.md) at 287 tokens per sequence blocks took
# 1.24x the dense mask's step time; at 1,055 they were even on the tiny model and 0.84x on SmolLM2-135M.
BLOCKS_FROM = 512


class UserError(Exception):
    """A mistake the user can fix (bad data, bad config, missing file): printed as one line."""


class ModelSource(Enum):
    hf = "hf"  # a hub name or a local save_pretrained folder
    gguf = "gguf"  # a GGUF file, de-quantized on load
    tiny = "tiny"  # a small Llama built from a config with random weights


class Precision(Enum):
    auto = "auto"  # bf16 on a GPU that supports it, fp32 elsewhere (resolved at start)
    fp32 = "fp32"
    bf16 = "bf16"  # plain PyTorch: bf16 autocast over fp32 weights; DeepSpeed: bf16 weights, fp32 master copy


class UnpairMode(Enum):
    both = "both"  # every completion of a pair becomes an example
    one = "one"  # one completion per prompt, chosen or rejected at random (seeded)


class AttnImplementation(Enum):
    eager = "eager"
    sdpa = "sdpa"
    flex_attention = "flex_attention"
    flash_attention_2 = "flash_attention_2"


class KLPartners(Enum):
    derangement = "derangement"  # a seeded derangement of the whole split, preferring other prompts
    rotate = "rotate"  # TRL's: in each block of trainer.micro_batch_size rows, row k takes row k-1's completion


class Schedule(Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


@dataclass
class TinyModelConfig:
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 1024
    seed: Optional[int] = None  # the random weights; null: the run's seed


@dataclass
class LoraConfig:
    # 0: full fine-tuning. r > 0: LoRA adapters of this rank (peft) on target_modules, every other
    # weight frozen; the reference is the base model (adapters off), cached under its key.
    r: int = 0
    alpha: float = 16.0  # the update is B A * alpha / r
    dropout: float = 0.0
    # Names of linear layers (their last name part, e.g. [q_proj, v_proj]); null: every linear layer
    # but the output head ("all-linear", as QLoRA found best), the same rule for every family.
    target_modules: Optional[List[str]] = None
    # final/ holds the merged model (base + B A * alpha / r; loads with from_pretrained, as a full
    # fine-tune's does) and the adapter in final/adapter; false: final/ holds the adapter alone.
    merge: bool = True


@dataclass
class ModelConfig:
    source: ModelSource = ModelSource.hf
    # hf: hub id or folder; gguf: folder holding the file, or "package:NAME" for a Python package
    # that ships it; tiny: "tiny" for the byte-level tokenizer, else where to take the tokenizer from
    # (a folder, hub id or GGUF as for the other sources), e.g. a real vocabulary for benchmarks.
    name_or_path: str = MISSING
    gguf_file: Optional[str] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False
    use_chat_template: bool = True  # render prompts with the tokenizer's template when it has one
    # The attention kernel; null: the one transformers picks for the model.
    attn_implementation: Optional[AttnImplementation] = None
    # Run the LM head only at completion positions (with the family's logit post-processing); false:
    # the model's own forward with full logits, for a family whose post-processing kto-cli lacks.
    sparse_head: bool = True
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class Columns:
    """The data's column for each field kto-cli reads (null: the field's own name)."""
    prompt: Optional[str] = None
    completion: Optional[str] = None
    label: Optional[str] = None
    chosen: Optional[str] = None
    rejected: Optional[str] = None


@dataclass
class MixSource:
    source: str = MISSING  # a file or hub name, as dataset.train
    weight: float = 1.0  # its share of the mix (the weights are normalised)
    split: str = "train"
    columns: Optional[Columns] = None  # its own column names; null: dataset.columns


@dataclass
class DatasetConfig:
    # A .jsonl/.json/.parquet/.csv path, "package:FILE" for data shipped with kto-cli, or a hub name.
    train: str = MISSING
    eval: Optional[str] = None  # same forms; when null, eval_fraction of train prompts is held out
    train_split: str = "train"
    eval_split: str = "test"
    eval_fraction: float = 0.0
    unpair: UnpairMode = UnpairMode.both
    # Pair each prompt's desirable completions with its undesirable ones, for losses that need pairs.
    pair_by_prompt: bool = False
    desirable_fraction: float = 1.0  # keep this share of desirable examples (imbalance studies)
    undesirable_fraction: float = 1.0
    max_train_rows: Optional[int] = None
    max_eval_rows: Optional[int] = None
    max_length: int = 512
    max_prompt_length: int = 256
    skip_bad_rows: bool = False  # when true, bad rows are counted and skipped instead of fatal
    seed: Optional[int] = None  # unpairing, subsampling, held-out split and KL partners; null: the run's seed
    kl_partners: KLPartners = KLPartners.derangement  # which completion each example's KL sequence takes
    # For data whose columns have other names: dataset.columns.prompt=question dataset.columns.label=is_good
    columns: Columns = field(default_factory=Columns)
    # Training rows from several sources in proportions (in place of dataset.train), each source's
    # rows drawn in a seeded order, as many as keep the proportions without repeating a row:
    # dataset.mix='[{source: a.jsonl, weight: 0.7}, {source: b.jsonl, weight: 0.3}]'
    mix: List[MixSource] = field(default_factory=list)
    # Keep each source tokenised on disk by content (its bytes, columns, tokenizer, template), so a
    # later run maps it instead of reading and tokenising again (kto_cli/tables.py).
    cache: bool = True
    cache_dir: Optional[str] = None  # default: $KTO_CLI_CACHE/data or ~/.cache/kto-cli/data


@dataclass
class LossConfig:
    """The base of every loss's schema. Each loss's schema lives beside its objective
    (kto_cli/objectives/), and its fields are the keyword arguments of its function in
    kto_cli/losses.py, so the config and the function name the same hyperparameters."""
    name: str = MISSING


@dataclass
class TrainerConfig:
    seed: Optional[int] = None  # shuffling and initialisation; null: the run's seed
    # false: every epoch visits the examples in data order (TRL's KTOTrainer order, for comparisons)
    shuffle: bool = True
    batch_size: int = 8  # examples per optimizer step
    micro_batch_size: int = 8  # examples per forward; batch_size / micro_batch_size = accumulation
    max_steps: Optional[int] = None  # when null, `epochs` passes over the training examples
    epochs: float = 1.0
    # An SFT phase first: this many steps of loss=sft on the desirable completions (in RUN/sft/); the
    # loss then trains from that model, which is also its reference. 0: none.
    sft_steps: int = 0
    lr: float = 5e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_ratio: float = 0.1
    schedule: Schedule = Schedule.cosine
    max_grad_norm: float = 1.0
    # A step whose loss or gradient norm is not finite (on any rank) is skipped: no update, the data
    # and the schedule move on. This many in a row stop the run (exit 3), naming its last checkpoint.
    max_bad_steps: int = 3
    precision: Precision = Precision.auto
    gradient_checkpointing: bool = False
    # KTO: run each example and its KL sequence as one row sharing the prompt (same numbers, less work)
    shared_prompt: bool = True
    # Shared-prompt and packed rows of at least this many tokens under sdpa attention: computed by
    # blocks (per group, no (L, L) mask); shorter ones through one dense (B, 1, L, L) mask, which is
    # cheaper there; null: always the mask (the plain form, for comparison); 0: always blocks
    attention_blocks: Optional[int] = BLOCKS_FROM
    # KTO: each KL sequence runs on its prompt's cached keys and values, without gradient (the prompt
    # computed once, the KL tokens kept out of the backward); false: in the example's row
    kl_prefix: bool = True
    # Batch units of similar length together (less padding); the order stays seeded and resumable.
    group_by_length: bool = False
    # Padding-free batches: several sequences share a row, each attending only to itself, with its
    # own positions; rows hold at most pack_length tokens (null: the micro-batch's longest sequence).
    packing: bool = False
    pack_length: Optional[int] = None
    eval_every: int = 0  # steps; 0 evaluates only before and after training
    eval_batch_size: int = 16
    save_every: int = 0  # steps; 0 saves only the final checkpoint
    keep_checkpoints: int = 3  # the newest N stay (older ones go once a newer one is complete); 0: all
    # false: none at the end either (final/ is still exported): for runs nobody resumes or extends,
    # whose optimizer state (twice the weights) would only fill the disk
    final_checkpoint: bool = True
    log_every: int = 1
    resume: Optional[str] = None  # "auto": latest complete checkpoint of this run dir, or a path
    # true: resume from a checkpoint written under other settings (other data, batch size, processes)
    resume_force: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True
    threads: Optional[int] = None  # torch CPU threads; null keeps torch's default


@dataclass
class GenerationConfig:
    """Sampling from the policy on held-out prompts (kto_cli/generate.py)."""
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    n: int = 1  # samples per prompt
    batch_size: int = 32  # prompts per generate call
    seed: int = 0  # sampling


@dataclass
class VerifierConfig:
    """What scores a completion (kto_cli/verifiers.py): exact | number | choice | regex | python |
    reward_model."""
    name: str = "exact"
    field: str = "answer"  # the row field holding the reference answer (else a pair's chosen completion)
    options_field: str = "options"  # choice: the row field listing the options
    pattern: Optional[str] = None  # regex; {answer} stands for the reference
    target: Optional[str] = None  # python: module:function, called with (prompt, completion, row)
    # python: a call that takes longer scores 0, the error recorded (a hanging check must not stop
    # the run); null: no limit. Checked in the main thread only (SIGALRM), as kto-train calls it.
    timeout_s: Optional[float] = 10.0
    # reward_model: a sequence-classification model (folder or hub name); its score is the
    # probability it gives the completion (sigmoid of one logit, or softmax of the last of several)
    model: Optional[str] = None
    threshold: float = 0.5  # where a yes/no is needed (pass@k), a score at or above it passes


class OnlineReference(Enum):
    initial = "initial"  # the policy before the first round (the SFT model, with an SFT phase)
    round = "round"  # the policy at the start of each round


@dataclass
class OnlineConfig:
    """On-policy training (kto_cli/online.py), in rounds: the policy answers training prompts, the
    verifier labels each answer, and the loss trains on that round's answers."""
    prompts: int = 0  # distinct training prompts answered each round (a seeded choice per round); 0: train on the dataset's completions
    rounds: int = 1
    # Optimizer steps on each round's answers; null: trainer.max_steps split evenly over the rounds,
    # or, without it, trainer.epochs passes over a round's prompts x generation.n answers
    steps_per_round: Optional[int] = None
    # What each round's reference log-probs come from (computed once per round, by the policy's
    # own model with those weights swapped in: no second model is held)
    reference: OnlineReference = OnlineReference.initial
    eval_each_round: bool = True  # evaluate on the held-out prompts at the end of every round
    # how: generation.n answers per prompt, sampled at generation.temperature
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(temperature=1.0, n=4))


@dataclass
class EvalConfig:
    """Evaluation by generation on the held-out prompts: before training, every trainer.eval_every
    steps and at the end; scores from the `verifier` group."""
    generate: bool = True
    # false: no generation before training (the starting model's answers are known, e.g. several
    # runs from one model); its log-prob metrics are logged only where the reference pass already
    # holds them (a loss without a reference, e.g. sft, skips the step-0 evaluation entirely)
    before_training: bool = True
    # false: the held-out log-prob and implicit-reward accuracies alone, from one no-grad pass that
    # computes each prompt once for all its completions; no loss, margins or KL (KTO's KL partners
    # of held-out examples are then neither run nor looked up in the reference pass). The implicit
    # reward is then log pi - log pi_ref summed over the answer, for every loss with a reference
    # (a loss's own reward, e.g. ipo's length-normalised one, needs its loss metrics)
    loss_metrics: bool = True
    max_prompts: Optional[int] = None  # the first N distinct held-out prompts; null: all
    # kto-eval: the model to evaluate (a run's final/ folder or a hub name); null: the `model` group's
    model: Optional[str] = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)


class CacheMode(Enum):
    off = "off"
    read = "read"  # use cached values, never write
    readwrite = "readwrite"


@dataclass
class ReferenceConfig:
    batch_size: int = 16
    cache: CacheMode = CacheMode.readwrite
    cache_dir: Optional[str] = None  # default: $KTO_CLI_CACHE/reference or ~/.cache/kto-cli/reference
    # Seconds to wait for another run computing values for the same model (a sweep's points start
    # together) before computing them here too; null: as long as that run lives
    lock_wait: Optional[float] = None


class Offload(Enum):
    none = "none"
    cpu = "cpu"


@dataclass
class DeepSpeedConfig:
    """The ZeRO part of a DeepSpeed config. Batch sizes, accumulation, precision, clipping, the
    optimizer and the schedule come from `trainer` (kto_cli/backend.py builds the whole config), so
    no value is set in two places."""
    stage: Optional[int] = None  # ZeRO stage 0-3; null: no DeepSpeed (one process, plain PyTorch)
    offload_optimizer: Offload = Offload.none  # optimizer state and step on the CPU (ZeRO-Offload)
    offload_param: Offload = Offload.none  # parameters on the CPU between uses (ZeRO-3 only)
    overlap_comm: bool = False  # overlap gradient reduction with backward (GPU memory for speed)
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 200_000_000  # elements
    # How long a collective (all-reduce, broadcast) may wait for the slowest rank before the run
    # fails; null: torch's default (30 min)
    timeout_s: Optional[float] = None
    # ZeRO-3: build the model already sharded (deepspeed.zero.Init), so a model larger than one
    # device's memory loads
    zero_init: bool = True
    # Any other DeepSpeed keys (e.g. comms_logger, flops_profiler); keys kto-cli sets are refused.
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    # Trackers beside metrics.jsonl (always written: the source of truth), with its metric names and
    # the resolved config: `logger=tensorboard`, `logger=[tensorboard,mlflow]`, ... (conf/logger/).
    tensorboard: bool = False  # RUN/tensorboard
    mlflow: bool = False
    wandb: bool = False  # WANDB_MODE=offline for no network (RUN/wandb/offline-run-*; `wandb sync` later)
    project: str = "kto-cli"  # MLflow's experiment, W&B's project
    # null: $MLFLOW_TRACKING_URI, else ./mlflow.db (MLflow's own default; `mlflow ui` reads it)
    mlflow_uri: Optional[str] = None


@dataclass
class RunConfig:
    seed: int = 0  # `seed=N`: every seed below that is left null (model.tiny, dataset, trainer) derives from it
    model: ModelConfig = MISSING
    dataset: DatasetConfig = MISSING
    loss: LossConfig = MISSING
    trainer: TrainerConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    verifier: VerifierConfig = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self):
        """Null seeds take the run's, however the config was built (Hydra or code)."""
        for part in (getattr(self.model, "tiny", None), self.dataset, self.trainer):
            if getattr(part, "seed", 0) is None:
                part.seed = self.seed


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="dataset", name="schema", node=DatasetConfig)
    cs.store(group="trainer", name="schema", node=TrainerConfig)
    cs.store(group="deepspeed", name="schema", node=DeepSpeedConfig)
    cs.store(group="verifier", name="schema", node=VerifierConfig)
    cs.store(group="logger", name="schema", node=LoggerConfig)
    from .objectives import REGISTRY  # the losses import this module
    for objective in REGISTRY.values():  # loss=NAME; conf/loss/ holds only named presets (cdpo)
        cs.store(group="loss", name=objective.name, node=objective.schema)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """The composed config as dataclasses, after the checks a type cannot express."""
    try:
        run = OmegaConf.to_object(cfg)
    except Exception as e:  # MissingMandatoryValue, ValidationError: OmegaConf names the key
        raise UserError(f"invalid config: {e}".splitlines()[0]) from None
    validate(run)
    if run.trainer.precision == Precision.auto:
        run.trainer.precision = auto_precision(run.trainer.device)
    return run


def auto_precision(device: str) -> "Precision":
    import torch
    gpu = device != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return Precision.bf16 if gpu else Precision.fp32


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(f"invalid config: {message}")


def validate(run: RunConfig) -> None:
    t, d = run.trainer, run.dataset
    _check(t.batch_size > 0 and t.micro_batch_size > 0, "trainer.batch_size and trainer.micro_batch_size must be positive")
    _check(t.batch_size % t.micro_batch_size == 0,
           f"trainer.batch_size={t.batch_size} is not a multiple of trainer.micro_batch_size={t.micro_batch_size}")
    _check(t.lr > 0, f"trainer.lr must be positive, got {t.lr}")
    _check(0 <= t.warmup_ratio < 1, f"trainer.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    _check(t.max_steps is None or t.max_steps > 0, "trainer.max_steps must be positive or null")
    _check(t.epochs > 0, f"trainer.epochs must be positive, got {t.epochs}")
    _check(t.sft_steps >= 0, f"trainer.sft_steps must be 0 or positive, got {t.sft_steps}")
    check_numbers(run)
    check_online(run)
    for name, g in (("eval", run.eval.generation), ("online", run.online.generation)):
        _check(g.n > 0 and g.max_new_tokens > 0 and g.batch_size > 0 and g.temperature >= 0 and 0 < g.top_p <= 1,
               f"{name}.generation: n, max_new_tokens and batch_size must be positive, temperature >= 0, "
               "top_p in (0, 1]")
    _check(t.shuffle or not t.group_by_length, "trainer.group_by_length=true reorders the data: it needs trainer.shuffle=true")
    for name in ("desirable_fraction", "undesirable_fraction"):
        v = getattr(d, name)
        _check(0 < v <= 1, f"dataset.{name} must be in (0, 1], got {v}")
    _check(0 <= d.eval_fraction < 1, f"dataset.eval_fraction must be in [0, 1), got {d.eval_fraction}")
    _check(0 < d.max_prompt_length < d.max_length,
           f"dataset.max_prompt_length={d.max_prompt_length} must be positive and below dataset.max_length={d.max_length}")
    _check(run.model.source != ModelSource.gguf or bool(run.model.gguf_file), "model.source=gguf needs model.gguf_file")
    for k, m in enumerate(d.mix):
        _check(m.weight > 0, f"dataset.mix[{k}] ({m.source}): weight must be positive, got {m.weight}")
    ds = run.deepspeed
    _check(ds.stage is None or ds.stage in (0, 1, 2, 3), f"deepspeed.stage must be 0, 1, 2, 3 or null, got {ds.stage}")
    _check(ds.offload_param == Offload.none or ds.stage == 3, "deepspeed.offload_param needs deepspeed.stage=3")
    _check(ds.offload_optimizer == Offload.none or (ds.stage or 0) >= 1,
           "deepspeed.offload_optimizer needs deepspeed.stage 1, 2 or 3")
    _check(ds.stage is not None or not ds.extra, "deepspeed.extra needs a ZeRO stage (e.g. deepspeed=zero2)")
    from .objectives import objective_class
    objective_class(run.loss).validate(run.loss)


def check_numbers(run: RunConfig) -> None:
    """The numeric settings a type accepts but the run cannot use (caught here, not after the model
    and the reference pass have loaded)."""
    t, e, r, d = run.trainer, run.eval, run.reference, run.dataset
    positive = {"trainer.max_grad_norm": t.max_grad_norm, "trainer.log_every": t.log_every,
                "trainer.eval_batch_size": t.eval_batch_size, "trainer.max_bad_steps": t.max_bad_steps,
                "reference.batch_size": r.batch_size, "deepspeed.reduce_bucket_size": run.deepspeed.reduce_bucket_size}
    optional = {"trainer.threads": t.threads, "trainer.pack_length": t.pack_length, "eval.max_prompts": e.max_prompts,
                "dataset.max_train_rows": d.max_train_rows, "dataset.max_eval_rows": d.max_eval_rows,
                "verifier.timeout_s": run.verifier.timeout_s, "reference.lock_wait": r.lock_wait,
                "deepspeed.timeout_s": run.deepspeed.timeout_s}
    for key, v in positive.items():
        _check(v > 0, f"{key} must be positive, got {v}")
    for key, v in optional.items():
        _check(v is None or v > 0, f"{key} must be positive or null, got {v}")
    for key in ("eval_every", "save_every", "keep_checkpoints"):
        _check(getattr(t, key) >= 0, f"trainer.{key} must be 0 (off) or positive, got {getattr(t, key)}")
    for key in ("adam_beta1", "adam_beta2"):
        _check(0 <= getattr(t, key) < 1, f"trainer.{key} must be in [0, 1), got {getattr(t, key)}")
    _check(t.weight_decay >= 0, f"trainer.weight_decay must be 0 or positive, got {t.weight_decay}")
    _check(t.attention_blocks is None or t.attention_blocks >= 0,
           f"trainer.attention_blocks must be 0 (always), a row length or null (never), got {t.attention_blocks}")
    lora = run.model.lora
    _check(lora.r >= 0, f"model.lora.r must be 0 (off) or positive, got {lora.r}")
    _check(lora.alpha > 0, f"model.lora.alpha must be positive, got {lora.alpha}")
    _check(0 <= lora.dropout < 1, f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
    _check(lora.merge or not lora.r or t.sft_steps == 0, "model.lora.merge=false leaves the SFT phase's final/ "
           "without a model for the loss phase to start from: keep merge=true with trainer.sft_steps")


def check_online(run: RunConfig) -> None:
    o, t = run.online, run.trainer
    _check(o.prompts >= 0, f"online.prompts must be 0 or positive, got {o.prompts}")
    _check(o.rounds >= 1, f"online.rounds must be positive, got {o.rounds}")
    _check(o.steps_per_round is None or o.steps_per_round > 0, "online.steps_per_round must be positive or null")
    _check(o.prompts > 0 or (o.rounds == 1 and o.steps_per_round is None), "online.rounds and online.steps_per_round "
           "need online.prompts > 0 (the training prompts each round's answers are sampled for)")
    _check(o.steps_per_round is not None or t.max_steps is None or t.max_steps % o.rounds == 0,
           f"trainer.max_steps={t.max_steps} does not split evenly into online.rounds={o.rounds}: "
           "set online.steps_per_round")
    _check(o.reference == OnlineReference.round or o.rounds == 1 or run.deepspeed.stage != 3 or run.model.lora.r > 0,
           "online.reference=initial swaps the initial weights in for each round's reference pass, which "
           "kto-cli does not do under ZeRO-3: use online.reference=round, ZeRO stage 0-2, or LoRA "
           "(model.lora.r > 0: the reference is the base model, adapters off)")


def config_digest(cfg: RunConfig, groups: tuple = ()) -> str:
    """A hash of the config (of only these groups, when given)."""
    keep = {k: v for k, v in asdict(cfg).items() if not groups or k in groups}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(cfg: RunConfig) -> str:
    """What a checkpoint must agree with to be resumed (not the step counts or logging)."""
    return config_digest(cfg, ("model", "dataset", "loss"))
