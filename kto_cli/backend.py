"""How parameters get updated: plain PyTorch in one process, or a DeepSpeed ZeRO engine across
many. The loop calls the same five methods either way (backward, step, save, load, state_dict);
the math (log-probs, losses, the KL estimate) never knows which one runs.
"""
import functools
import logging
import math
from pathlib import Path
from typing import Optional

import torch

from .config import Offload, Precision, RunConfig, Schedule, UserError

log = logging.getLogger("kto_cli")

# What DeepSpeed's checkpoint files hold besides tensors and plain values (its loader unpickles them
# with weights_only=False): a file naming any other class or function is refused before it loads.
DEEPSPEED_PICKLED = {"deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "deepspeed.utils.tensor_fragment.fragment_address"}

# Keys of the DeepSpeed config that come from `trainer` and may not be set in deepspeed.extra.
DERIVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler", "zero_optimization")


class Policy(torch.nn.Module):
    """The trained parameters as one module: the causal LM and, for ppo, its value head."""

    def __init__(self, lm, value_head: Optional[torch.nn.Module] = None):
        super().__init__()
        self.lm, self.value_head = lm, value_head

    def forward(self, fn, *args, **kwargs):
        """fn(lm, ...): the loop's forward passes (kto_cli/logprobs.py) enter through here, so a
        DeepSpeed engine sees each one as its module's forward (ZeRO-3 gathers and releases
        parameters, and prepares their gradients, around it)."""
        return fn(self.lm, *args, **kwargs)


def lr_lambda(step: int, warmup: int, total: int, schedule: Schedule) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == Schedule.linear:
        return max(0.0, 1.0 - progress)
    if schedule == Schedule.cosine:
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def make_scheduler(optimizer, cfg: RunConfig, steps: int):
    t = cfg.trainer
    warmup = round(t.warmup_ratio * steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_lambda, warmup=warmup, total=steps, schedule=t.schedule))


def make_optimizer(params: list, cfg: RunConfig, steps: int) -> tuple:
    t = cfg.trainer
    kwargs = dict(lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    try:  # the fused kernel: 4-6x faster optimizer steps on CPU (SmolLM2-135M: 0.11 s vs 0.5 s)
        opt = torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # a device or dtype without a fused kernel
        opt = torch.optim.AdamW(params, **kwargs)
    return opt, make_scheduler(opt, cfg, steps)


def accumulation(cfg: RunConfig, world: int) -> int:
    """Micro-batches per optimizer step on each rank; batch_size is the global batch."""
    t = cfg.trainer
    if t.batch_size % (t.micro_batch_size * world):
        raise UserError(f"trainer.batch_size={t.batch_size} (the global batch) is not a multiple of "
                        f"trainer.micro_batch_size={t.micro_batch_size} x {world} processes")
    return t.batch_size // (t.micro_batch_size * world)


def ds_config(cfg: RunConfig, world: int) -> dict:
    """The DeepSpeed config: ZeRO settings from `deepspeed`, everything else from `trainer`."""
    t, d = cfg.trainer, cfg.deepspeed
    clash = sorted(set(d.extra) & set(DERIVED_KEYS))
    if clash:
        raise UserError(f"deepspeed.extra sets {clash}, which kto-cli derives from trainer.* "
                        "(batch sizes, precision, clipping, optimizer) and deepspeed.* (ZeRO): set those instead")
    zero = {"stage": d.stage, "overlap_comm": d.overlap_comm, "contiguous_gradients": d.contiguous_gradients,
            "reduce_bucket_size": d.reduce_bucket_size}
    if d.offload_optimizer == Offload.cpu:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # final/ is one consolidated folder
        if d.offload_param == Offload.cpu:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {"train_batch_size": t.batch_size, "train_micro_batch_size_per_gpu": t.micro_batch_size,
            "gradient_accumulation_steps": accumulation(cfg, world), "gradient_clipping": t.max_grad_norm,
            "bf16": {"enabled": t.precision == Precision.bf16}, "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2],
                                                      "weight_decay": t.weight_decay}},
            "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
            **d.extra}


class TorchBackend:
    """One process: AdamW, the schedule, clipping; checkpoints are a save_pretrained folder plus the
    optimizer and schedule state."""

    name = "torch"

    def __init__(self, policy: Policy, cfg: RunConfig, steps: int):
        self.policy, self.cfg = policy, cfg
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(self.params, cfg, steps)

    def __call__(self, fn, *args, **kwargs):
        return self.policy(fn, *args, **kwargs)

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        (loss / accum).backward()

    def lr(self) -> float:
        """The learning rate of the coming optimizer step."""
        return self.scheduler.get_last_lr()[0]

    def step(self) -> tuple:
        """Clips, steps the optimizer and the schedule; (grad norm before clipping, whether the
        update was applied). A non-finite gradient skips the update: weights and optimizer state
        stay as they were, the schedule moves on."""
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.trainer.max_grad_norm))
        applied = math.isfinite(norm)
        if applied:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def save(self, folder: Path) -> None:
        lm = self.policy.lm
        if any(not p.requires_grad for p in lm.parameters()):  # LoRA: the base never changes; the adapters alone
            from safetensors.torch import save_file
            (folder / "model").mkdir()
            save_file({n: p.detach().contiguous() for n, p in lm.named_parameters() if p.requires_grad},
                      str(folder / "model" / "trained.safetensors"))
        else:
            lm.save_pretrained(folder / "model")
        head = self.policy.value_head
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "value_head": head.state_dict() if head is not None else None}, folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file
        if not (folder / "optimizer.pt").is_file():
            raise UserError(f"{folder}: not a checkpoint of a deepspeed=none run (no optimizer.pt)")
        weights = {}
        for f in sorted((folder / "model").glob("*.safetensors")):
            weights.update(load_file(str(f)))
        lm = self.policy.lm
        missing, unexpected = lm.load_state_dict(weights, strict=False)
        lm.tie_weights()
        frozen = {n for n, p in lm.named_parameters() if not p.requires_grad}  # LoRA's base: not in the checkpoint
        if unexpected or [k for k in missing if "lm_head" not in k and k not in frozen]:
            raise UserError(f"{folder}: checkpoint weights do not fit the model "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)  # runs no code
        if self.policy.value_head is not None:
            self.policy.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def state_dict(self) -> Optional[dict]:
        """The whole policy's weights (on rank 0; None elsewhere)."""
        return self.policy.state_dict()


class DeepSpeedBackend:
    """A ZeRO engine over the policy: DeepSpeed reduces gradients across ranks, shards what the stage
    shards, accumulates (it scales each micro-batch loss by 1/accumulation), clips and steps AdamW;
    the schedule is ours (lr_lambda), handed to the engine."""

    name = "deepspeed"

    def __init__(self, policy: Policy, cfg: RunConfig, steps: int, config: dict):
        import deepspeed
        self.stage = cfg.deepspeed.stage
        self.engine, _, _, _ = deepspeed.initialize(
            model=policy, model_parameters=[p for p in policy.parameters() if p.requires_grad], config=config,
            lr_scheduler=lambda opt: make_scheduler(opt, cfg, steps))
        self.policy = self.engine.module
        # ZeRO-1/2 check gradients for inf/NaN (and skip the step) only in fp16/bf16 by default;
        # ZeRO-3 always does; stage 0 never does, so step() checks them itself.
        if hasattr(self.engine.optimizer, "check_grad_overflow"):
            self.engine.optimizer.check_grad_overflow = True

    def __call__(self, fn, *args, **kwargs):
        return self.engine(fn, *args, **kwargs)

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # between boundaries this only counts micro-batches

    def lr(self) -> float:
        return self.engine.lr_scheduler.get_last_lr()[0]

    def step(self) -> tuple:
        """The engine's optimizer step (gradients are reduced over ranks by now); (grad norm, whether
        the update was applied), as TorchBackend.step: on a non-finite gradient on any rank, the
        engine's overflow check (reduced over ranks) skips the update; the schedule moves on."""
        if self.stage == 0 and not self.grads_finite():
            opt = self.engine.optimizer
            opt.step = lambda *args, **kwargs: None  # for this step only: weights and Adam's state stay
            try:
                self.engine.step()  # clears the gradients, moves the schedule and the engine's counters on
            finally:
                del opt.step
            return float("nan"), False
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        if self.engine.skipped_steps != skipped_before:
            self.engine.lr_scheduler.step()  # the engine leaves the schedule where it was on an overflow
            return float("nan"), False
        norm = self.engine.get_global_grad_norm()
        return (float(norm) if norm is not None else float("nan")), True

    def grads_finite(self) -> bool:
        """Stage 0: every rank holds the whole averaged gradient, so each decides alike."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True

    def save(self, folder: Path) -> None:
        """Every rank writes its shard (model, optimizer, schedule) into the same folder."""
        self.engine.save_checkpoint(str(folder), tag="engine", save_latest=False)

    def load(self, folder: Path) -> None:
        if not (folder / "engine").is_dir():
            raise UserError(f"{folder}: not a checkpoint of a DeepSpeed run (no engine/ folder)")
        check_runs_no_code(folder / "engine")
        path, _ = self.engine.load_checkpoint(str(folder), tag="engine", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"{folder}: DeepSpeed could not load this checkpoint (written with another ZeRO "
                            "stage or number of processes?)")

    def state_dict(self) -> Optional[dict]:
        """The whole policy's weights, gathered on rank 0 (None elsewhere); every rank must call it."""
        if self.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.policy.state_dict() if torch.distributed.get_rank() == 0 else None


def check_runs_no_code(folder: Path) -> None:
    """Every .pt file DeepSpeed will unpickle names only torch's safe globals and DeepSpeed's state
    classes (DEEPSPEED_PICKLED): loading it runs no code from the file. Reads each file's pickle,
    not its tensors."""
    unsafe_globals = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if unsafe_globals is None:  # torch < 2.5
        log.warning("%s: this torch cannot check what DeepSpeed's checkpoint files would run; loading them", folder)
        return
    for f in sorted(folder.glob("*.pt")):
        unsafe = sorted(set(unsafe_globals(f)) - DEEPSPEED_PICKLED)
        if unsafe:
            raise UserError(f"{f}: names {', '.join(unsafe)}, which loading would call; a kto-cli checkpoint "
                            "holds only tensors and DeepSpeed's own state. Not loaded")


def local_device(local_rank: int) -> torch.device:
    """This process's device under DeepSpeed: its GPU, or the CPU (DS_ACCELERATOR=cpu)."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    acc.set_device(local_rank)
    return torch.device(acc.device_name(local_rank))


def init_deepspeed_distributed(timeout_s: Optional[float] = None) -> None:
    import datetime

    import deepspeed
    from .distributed import export_env
    export_env()
    if not torch.distributed.is_initialized():
        extra = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        deepspeed.init_distributed(dist_init_required=True, verbose=False, **extra)
