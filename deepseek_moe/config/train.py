"""Training-side configuration: optimizer, parallelism, trainer loop, checkpoints, logging.

`RunConfig` is the root of the Hydra tree (`conf/config.yaml`): it nests the model and data
configs owned by `config/model.py` and `config/data.py` next to the ones defined here. Hydra
composes YAML into it as a structured config, so a misspelt key or a wrong type fails when the
config is composed; `OmegaConf.to_object` then builds these dataclasses, whose `__post_init__`
checks the values. Checks that need the world size live in `RunConfig.check_world`.

Defaults are the tiny default run's (a few hundred steps on a laptop); the optimizer defaults
follow the DeepSeekMoE papers where they do not depend on the run length (AdamW betas 0.9/0.95,
weight decay 0.1, grad clip 1.0). The papers' schedule (2000 warmup steps, step decay x0.316 at
80% and 90%) is the `optim=deepseek_step` preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from deepseek_moe.config.data import DataConfig
from deepseek_moe.config.health import HealthConfig
from deepseek_moe.config.model import ACTIVATION_CHECKPOINTING, ModelConfig
from deepseek_moe.config.parallel import validate_ep_size
from deepseek_moe.errors import ConfigError

SCHEDULES = ("cosine", "step", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LOGGER_KINDS = ("wandb", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}; set {name} to one of them")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} must be {bound}")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and the learning-rate schedule (see `deepseek_moe/train/schedule.py`)."""

    lr: float = 3e-3
    """Peak learning rate (DeepSeekMoE 2B: 1.08e-3, 16B: 4.2e-4, 145B: 3.0e-4; a few-million-
    parameter model trains well at 3e-3)."""
    min_lr_ratio: float = 0.1
    """cosine: the LR decays to lr * min_lr_ratio at the end of the decay."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2 (0.95 in all DeepSeek papers)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices; norms and biases get none."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold; 0 disables clipping."""
    schedule: str = "cosine"
    """"cosine" (linear warmup + cosine), "step" (DeepSeekMoE: warmup, then x step_decay_factor at
    each fraction in step_decay_at) or "constant" (warmup, then flat)."""
    warmup_steps: int = 20
    """Linear warmup to lr over this many optimizer steps (the papers: 2000)."""
    decay_steps: Optional[int] = None
    """Length of the schedule in steps; None means trainer.max_steps."""
    step_decay_at: list[float] = field(default_factory=lambda: [0.8, 0.9])
    """step: fractions of decay_steps at which the LR is multiplied by step_decay_factor."""
    step_decay_factor: float = 0.316
    """step: multiplier applied at each milestone (DeepSeekMoE: 0.316)."""

    def __post_init__(self) -> None:
        _check_choice("optim.schedule", self.schedule, SCHEDULES)
        _check_positive("optim.lr", self.lr)
        _check_positive("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        _check_positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        _check_positive("optim.eps", self.eps)
        for name, beta in (("optim.beta1", self.beta1), ("optim.beta2", self.beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name}={beta} must be in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.decay_steps is not None:
            _check_positive("optim.decay_steps", self.decay_steps)
        if list(self.step_decay_at) != sorted(self.step_decay_at) or any(
            not 0.0 < f < 1.0 for f in self.step_decay_at
        ):
            raise ValueError(
                f"optim.step_decay_at={list(self.step_decay_at)} must be increasing fractions in (0, 1), "
                "e.g. [0.8, 0.9]"
            )
        if not 0.0 < self.step_decay_factor <= 1.0:
            raise ValueError(f"optim.step_decay_factor={self.step_decay_factor} must be in (0, 1]")


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model is spread over processes (one process per GPU, or per CPU slot)."""

    ep_size: int = 1
    """Expert-parallel size: routed experts are split over groups of ep_size ranks. Must divide
    the world size and model.moe.n_routed_experts."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage for the optimizer state: 0, 1 or 2 (stage 3 is not supported with
    expert parallelism)."""
    grad_reduce_dtype: str = "fp32"
    """bf16 runs only: dtype of the gradient all-reduce / reduce-scatter. "fp32" (default) sums
    the ranks' gradients exactly (they are accumulated over micro-batches in fp32 too);
    "bf16" halves the gradient communication bytes, but every reduction rounds the sum to 8
    mantissa bits (relative error up to 2^-9 per element per reduction, growing with the number
    of ranks summed), on top of the bf16 forward/backward."""

    process_group_timeout_min: float = 30.0
    """How long a collective (or a barrier) may wait for the slowest rank before the job fails,
    in minutes: torch's own default for process groups. A rank that waits longer than this is
    taken for a hang (the job then ends instead of holding the allocation). The longest
    planned wait is rank 0 preparing a small corpus in-job (data.prepare_in_job_max_mb) or
    writing a checkpoint; raise it for very slow checkpoint storage."""

    def __post_init__(self) -> None:
        _check_positive("parallel.ep_size", self.ep_size)
        _check_positive("parallel.process_group_timeout_min", self.process_group_timeout_min)
        _check_choice("parallel.grad_reduce_dtype", self.grad_reduce_dtype, ("fp32", "bf16"))
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(
                f"parallel.zero_stage={self.zero_stage} is not supported; use 0, 1 or 2 "
                "(DeepSpeed MoE does not support ZeRO-3)"
            )


@dataclass(kw_only=True)
class TrainerConfig:
    """The training loop."""

    max_steps: int = 200
    """Optimizer steps to train for (the schedule length unless optim.decay_steps is set)."""
    seed: int = 1234
    """Seeds model init, data order and every RNG; the same seed gives the same run."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all ranks. Gradient accumulation steps =
    global_batch_size / (micro_batch_size * world_size)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on one rank."""
    seq_len: Optional[int] = None
    """Tokens per training sequence; None means model.max_seq_len."""
    eval_every: int = 100
    """Evaluate on the validation split every this many steps (and after the last); 0 = never."""
    eval_batches: int = 4
    """Micro-batches per rank in one evaluation."""
    log_every: int = 10
    """Print a progress line every this many steps (metrics.jsonl gets every step; the MoE
    router statistics and expert loads are reduced over the ranks and logged on these steps)."""
    precision: str = "auto"
    """"auto" (bf16 on CUDA, fp32 on CPU), "fp32", "bf16" or "fp16"."""
    max_steps_per_launch: Optional[int] = None
    """Stop (save, exit 0) after this many steps in one launch; relaunch to continue. For
    wall-clock-limited allocations. None = run to max_steps."""
    activation_checkpointing: str = "none"
    """"none" or "full": keep only each transformer block's input in the forward and recompute
    the block in backward (about one extra forward of compute for much less activation memory;
    `python -m deepseek_moe.summary` shows the memory either way)."""
    loss_chunk_tokens: int = 0
    """0: the LM head computes the whole micro-batch's logits, then the loss. N > 0: the head and
    the cross-entropy run N tokens at a time, in the forward and again in the backward (one
    extra head matmul), so only N x vocab logits exist at once instead of micro_batch_size x
    seq_len x vocab (several GB per rank with a 100k vocabulary; see
    deepseek_moe/model/chunked_lm_loss.py). Same loss and gradients. Try 1024-4096."""
    reuse_host_memory: bool = False
    """Opt-in, for CPU runs: keep freed host memory in the process for reuse (glibc mallopt:
    large CPU tensors stop page-faulting every step); the process then holds up to 1 GB of
    freed heap. See deepseek_moe/train/host_memory.py."""

    def __post_init__(self) -> None:
        _check_positive("trainer.max_steps", self.max_steps)
        _check_positive("trainer.global_batch_size", self.global_batch_size)
        _check_positive("trainer.micro_batch_size", self.micro_batch_size)
        _check_positive("trainer.eval_every", self.eval_every, allow_zero=True)
        _check_positive("trainer.eval_batches", self.eval_batches)
        _check_positive("trainer.log_every", self.log_every)
        _check_choice("trainer.precision", self.precision, PRECISIONS)
        _check_choice(
            "trainer.activation_checkpointing", self.activation_checkpointing, ACTIVATION_CHECKPOINTING
        )
        _check_positive("trainer.loss_chunk_tokens", self.loss_chunk_tokens, allow_zero=True)
        if self.seq_len is not None:
            _check_positive("trainer.seq_len", self.seq_len)
        if self.max_steps_per_launch is not None:
            _check_positive("trainer.max_steps_per_launch", self.max_steps_per_launch)


@dataclass(kw_only=True)
class CheckpointConfig:
    """DeepSpeed checkpoints under `<run_dir>/checkpoints/step_XXXXXXXX/`."""

    every: int = 100
    """Save every this many optimizer steps (and at the end, and on SIGTERM/SIGUSR1); 0 = only
    at the end / on signal."""
    keep: int = 2
    """Keep the newest `keep` complete checkpoints; older ones are deleted after a save."""
    resume: bool = True
    """Resume from the newest complete checkpoint in the run directory if there is one."""

    def __post_init__(self) -> None:
        _check_positive("checkpoint.every", self.every, allow_zero=True)
        _check_positive("checkpoint.keep", self.keep)


@dataclass(kw_only=True)
class LoggerConfig:
    """Experiment tracking. metrics.jsonl is always written; this adds wandb."""

    kind: str = "wandb"
    """"wandb" or "none" (pick with `logger=wandb` / `logger=none`)."""
    project: str = "deepseek-moe"
    """wandb project."""
    entity: Optional[str] = None
    """wandb entity (team); None = your default."""
    name: Optional[str] = None
    """wandb run name; None = the run directory's name."""
    mode: str = "auto"
    """"auto" (online if WANDB_API_KEY is set, else offline), "online", "offline", "disabled".
    The WANDB_MODE environment variable, when set, wins."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""

    def __post_init__(self) -> None:
        _check_choice("logger.kind", self.kind, LOGGER_KINDS)
        _check_choice("logger.mode", self.mode, WANDB_MODES)


@dataclass(kw_only=True)
class RunConfig:
    """Everything one training run needs. `run_dir` identifies the run: relaunching with the
    same run_dir resumes it."""

    run_dir: str = "runs/default"
    """Where metrics.jsonl, checkpoints/, wandb/ and config.yaml go (relative paths are taken
    from the directory you launch in)."""
    vocab_from_tokenizer: bool = True
    """Set model.vocab_size from the prepared tokenizer (meta.json vocab_size padded up to a
    multiple of 64). False = use model.vocab_size as given (it must be >= the tokenizer's)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network (conf/model/*.yaml)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The corpus and tokenizer (conf/data/*.yaml)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the LR schedule (conf/optim/*.yaml)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Expert parallelism and ZeRO (conf/parallel/*.yaml)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Steps, batch sizes, evaluation, precision (conf/trainer/*.yaml)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Save cadence, retention, resume (conf/config.yaml)."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """wandb or none (conf/logger/*.yaml)."""
    health: HealthConfig = field(default_factory=HealthConfig)
    """Expert-load statistics and alarms (conf/health/*.yaml)."""

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("run_dir is empty; set run_dir=runs/<name>")
        decay = self.decay_steps
        if self.optim.warmup_steps >= decay and self.optim.schedule != "constant":
            raise ValueError(
                f"optim.warmup_steps={self.optim.warmup_steps} must be smaller than the schedule "
                f"length {decay} (trainer.max_steps or optim.decay_steps); lower optim.warmup_steps"
            )
        seq = self.seq_len
        if seq > self.model.max_seq_len:
            raise ValueError(
                f"trainer.seq_len={seq} exceeds model.max_seq_len={self.model.max_seq_len}; "
                "lower trainer.seq_len or raise model.max_seq_len"
            )

    @property
    def seq_len(self) -> int:
        """Training sequence length (trainer.seq_len, else model.max_seq_len)."""
        return self.trainer.seq_len if self.trainer.seq_len is not None else self.model.max_seq_len

    @property
    def decay_steps(self) -> int:
        """Schedule length in optimizer steps."""
        return self.optim.decay_steps if self.optim.decay_steps is not None else self.trainer.max_steps

    def grad_accum_steps(self, world_size: int) -> int:
        """global_batch_size / (micro_batch_size * world_size); raises if it does not divide.

        Every rank consumes its own data slice (experts are sharded over EP ranks, but the
        data-parallel world is the whole world)."""
        per_step = self.trainer.micro_batch_size * world_size
        if self.trainer.global_batch_size % per_step != 0:
            raise ConfigError(
                f"trainer.global_batch_size={self.trainer.global_batch_size} is not divisible by "
                f"trainer.micro_batch_size={self.trainer.micro_batch_size} x world_size={world_size} "
                f"= {per_step}; pick a global batch that is a multiple of {per_step}"
            )
        return self.trainer.global_batch_size // per_step

    def check_world(self, world_size: int) -> None:
        """Checks that need the number of processes: a ConfigError naming the fix."""
        # EP rules: ep | world, ep | experts, routing groups = EP ranks (config/parallel.py)
        validate_ep_size(
            self.parallel.ep_size,
            world_size,
            self.model.moe,
            zero_stage=self.parallel.zero_stage,
            grad_clip=self.optim.grad_clip,
        )
        self.grad_accum_steps(world_size)
