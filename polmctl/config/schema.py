"""Typed schemas for every node of a polmctl run config.

YAML in ``polmctl/conf`` fills these dataclasses; Hydra checks key names and types while
composing (the ``polmctl_schema`` node is first in conf/config.yaml's defaults), and
``polmctl.config.validate`` runs the semantic checks in ``check()`` and reports a bad
value with its full key path. Every field carries a one-line help string in its metadata;
``polmctl show --help-keys`` is not needed: the help strings are the documentation.

The ``method`` node depends on the objective, so it is typed per objective in
``polmctl.objectives`` (see ``METHOD_SCHEMAS``) and validated by its ``objective`` key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (mutable defaults go through a factory)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


class ConfigError(ValueError):
    """A config value is wrong. ``key`` is the full dotted path of the offending key."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


def one_of(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name}", f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


def positive(section: str, name: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"{section}.{name}", f"must be {bound}, got {value!r}")


@dataclass
class RecipeInfo:
    name: str = _f("custom", "recipe name (the file name in conf/recipe/)")
    paradigm: str = _f("fine-tuning", "fine-tuning | alignment | reasoning | efficiency | integration")
    method: str = _f("", "the method's usual name, e.g. 'LoRA'")
    summary: str = _f("", "one line that says what the recipe does")

    def check(self, section: str) -> None:
        one_of(section, "paradigm", self.paradigm, PARADIGMS)


PARADIGMS = ("fine-tuning", "alignment", "reasoning", "efficiency", "integration")


@dataclass
class ModelConfig:
    name_or_path: str = _f(
        "builtin:smollm2-135m",
        "builtin:<name> (smollm2-135m, tiny), a hub id, a local model dir or a run dir",
    )
    dtype: str = _f("auto", "weights dtype: auto (bf16 on GPUs that support it, else fp32) | float32 | bfloat16 | float16")
    quantization: str = _f("none", "load the base weights quantized with bitsandbytes: none | nf4 | fp4 | int8")
    double_quant: bool = _f(True, "4-bit only: also quantize the quantization constants")
    trust_remote_code: bool = _f(False, "allow a hub model's own Python code to run (off unless asked for)")
    revision: Optional[str] = _f(None, "hub revision (branch, tag or commit)")
    cache_dir: Optional[str] = _f(None, "where builtin models are materialised; default $POLMCTL_CACHE or ~/.cache/polmctl")
    chat_template: Optional[str] = _f(None, "a Jinja chat template (or path to one) that replaces the model's own")
    attn_implementation: Optional[str] = _f(None, "eager | sdpa | flash_attention_2; None lets transformers choose")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")

    def check(self, section: str) -> None:
        one_of(section, "dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        one_of(section, "quantization", self.quantization, ("none", "nf4", "fp4", "int8"))
        if not self.name_or_path:
            raise ConfigError(f"{section}.name_or_path", "is empty; give builtin:<name>, a hub id or a path")


@dataclass
class DataConfig:
    source: str = _f("builtin:arithmetic", "builtin:<name>, a local .json/.jsonl/.csv/.parquet file, or a hub dataset name")
    split: str = _f("train", "split to train on (builtin sets have train and test, which never overlap)")
    eval_split: str = _f("test", "held-out split used by evaluation tasks that read this source")
    max_rows: Optional[int] = _f(None, "use at most this many rows (None: all)")
    format: str = _f(
        "auto",
        "row format: auto (detected from the columns) | text | messages | prompt_completion",
    )
    max_length: int = _f(512, "maximum tokens per row (prompt + completion)")
    overlong: str = _f("truncate", "rows longer than max_length: truncate | drop | error")
    bad_rows: str = _f("skip", "preference rows with chosen == rejected, an empty answer or no room for one: "
                       "skip (counted and reported) | error")
    completion_only_loss: bool = _f(True, "train only on completion / assistant tokens (False: on every token)")
    packing: bool = _f(False, "padding-free packing: a micro-batch's rows as one sequence with per-row positions, each row "
                                 "attending to itself only (models/packed_attention.py); the SFT recipes turn it on")
    shuffle: bool = _f(True, "shuffle rows each epoch (seeded by the run seed)")
    options: Dict[str, Any] = _f({}, "options for builtin generators, e.g. {n: 2000, max_operand: 50, ops: '+-*'}")
    hub_config: Optional[str] = _f(None, "hub dataset config name (datasets.load_dataset's second argument)")

    def check(self, section: str) -> None:
        one_of(section, "format", self.format, ("auto", "text", "messages", "prompt_completion"))
        one_of(section, "overlong", self.overlong, ("truncate", "drop", "error"))
        one_of(section, "bad_rows", self.bad_rows, ("skip", "error"))
        positive(section, "max_length", self.max_length)
        if self.max_rows is not None:
            positive(section, "max_rows", self.max_rows)


@dataclass
class PeftConfig:
    method: str = _f("none", "adapter type: none (full fine-tuning) | lora | dora | prompt_tuning | prefix_tuning")
    r: int = _f(16, "lora/dora: rank of the update")
    alpha: int = _f(32, "lora/dora: scaling numerator (the update is scaled by alpha / r)")
    dropout: float = _f(0.05, "lora/dora: dropout on the adapter input")
    target_modules: List[str] = _f(["all-linear"], "lora/dora: module names to adapt, or ['all-linear']")
    use_rslora: bool = _f(False, "lora/dora: scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    num_virtual_tokens: int = _f(20, "prompt/prefix tuning: number of virtual tokens")
    prompt_init_text: Optional[str] = _f(None, "prompt tuning: initialise the virtual tokens from this text")
    merge_on_save: bool = _f(False, "write final/ with the adapters merged into the base weights")

    def check(self, section: str) -> None:
        one_of(section, "method", self.method, ("none", "lora", "dora", "prompt_tuning", "prefix_tuning"))
        positive(section, "r", self.r)
        positive(section, "alpha", self.alpha)
        positive(section, "num_virtual_tokens", self.num_virtual_tokens)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{section}.dropout", f"must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError(f"{section}.target_modules", "is empty; name modules or use ['all-linear']")
        if self.merge_on_save and self.method not in ("lora", "dora"):
            raise ConfigError(f"{section}.merge_on_save", f"only lora and dora adapters merge, not {self.method!r}")


@dataclass
class TrainerConfig:
    max_steps: int = _f(100, "optimizer steps to run (a step = micro_batch_size x grad_accum x processes rows)")
    micro_batch_size: int = _f(8, "rows per forward/backward pass")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    lr: float = _f(2e-4, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norms)")
    betas: List[float] = _f([0.9, 0.999], "AdamW betas")
    optimizer: str = _f("adamw", "adamw | adamw_8bit (bitsandbytes) | sgd")
    scheduler: str = _f("cosine", "learning-rate schedule after warmup: constant | linear | cosine")
    warmup_steps: int = _f(0, "linear warmup steps (overrides warmup_ratio when > 0)")
    warmup_ratio: float = _f(0.05, "warmup as a fraction of max_steps")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0: no clipping)")
    keep_sparsity: bool = _f(False, "fine-tuning a pruned model: weights that start at least 10% zeros keep their "
                                    "zeros (re-applied after every optimizer step and on a merged save)")
    mixed_precision: str = _f("no", "autocast for compute: no | bf16 | fp16 (via accelerate)")
    log_every: int = _f(1, "write a metrics line every N steps")
    save_every: int = _f(0, "write checkpoints/step-N every N steps (0: only final/)")
    keep_last: int = _f(2, "checkpoints to keep (older ones are deleted)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N | mps")
    auto_batch: bool = _f(False, "on an out-of-memory error, halve the micro-batch and double the accumulation "
                                 "(same global batch) and retry the step; one process, offline methods")

    def check(self, section: str) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "keep_last"):
            positive(section, name, getattr(self, name))
        positive(section, "lr", self.lr)
        for name in ("weight_decay", "warmup_steps", "max_grad_norm", "save_every"):
            positive(section, name, getattr(self, name), zero_ok=True)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"{section}.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{section}.betas", f"must be two numbers in [0, 1), got {list(self.betas)!r}")
        one_of(section, "optimizer", self.optimizer, ("adamw", "adamw_8bit", "sgd"))
        one_of(section, "scheduler", self.scheduler, ("constant", "linear", "cosine"))
        one_of(section, "mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))


@dataclass
class LoggerConfig:
    trackers: List[str] = _f([], "extra trackers through accelerate: tensorboard | wandb | mlflow")
    project: str = _f("polmctl", "project / experiment name given to the trackers")
    progress: bool = _f(True, "show a rich progress bar with the live loss")

    def check(self, section: str) -> None:
        for i, t in enumerate(self.trackers):
            one_of(section, f"trackers[{i}]", t, ("tensorboard", "wandb", "mlflow"))


@dataclass
class EvalConfig:
    tasks: List[str] = _f(["arithmetic"], "evaluation tasks: arithmetic | reversal (exact match) | perplexity | preference | reward (reward models)")
    before: bool = _f(True, "also evaluate the starting model, so the summary shows before and after")
    max_samples: int = _f(100, "held-out rows per task")
    batch_size: int = _f(16, "rows per generation / scoring batch")
    max_new_tokens: int = _f(48, "generation budget for exact-match tasks")
    source: Optional[str] = _f(None, "held-out source for the tasks; None: each task's builtin set")

    def check(self, section: str) -> None:
        for i, t in enumerate(self.tasks):
            if t.startswith("lm_eval:"):  # an lm-evaluation-harness task (polmctl.evals.lm_eval)
                from polmctl.evals.lm_eval import check_lm_eval_task

                check_lm_eval_task(t, f"{section}.tasks[{i}]")
                continue
            one_of(section, f"tasks[{i}]", t, ("arithmetic", "reversal", "perplexity", "preference", "reward"))
        positive(section, "max_samples", self.max_samples)
        positive(section, "batch_size", self.batch_size)
        positive(section, "max_new_tokens", self.max_new_tokens)


@dataclass
class SweepConfig:
    metric: str = _f("final_loss", "dotted path in summary.json that a sweep reports and hydra/sweeper=optuna optimises, "
                                   "e.g. eval.after.arithmetic.accuracy")
    direction: str = _f("minimize", "minimize | maximize: which end of sweep.metric is best")

    def check(self, section: str) -> None:
        one_of(section, "direction", self.direction, ("minimize", "maximize"))
        if not self.metric.strip():
            raise ConfigError(f"{section}.metric", "is empty; give a dotted path in summary.json, e.g. final_loss")


@dataclass
class LauncherConfig:
    name: str = _f("none", "none (this process) | accelerate (re-run under `accelerate launch`: DDP, FSDP, DeepSpeed)")
    num_processes: Optional[int] = _f(None, "processes to start; None: the config file's count, else one per GPU, "
                                            "else 1")
    config_file: Optional[str] = _f(None, "an accelerate config YAML, e.g. a file from polmctl/conf/accelerate/ "
                                          "(ddp | fsdp | deepspeed_zero2 | deepspeed_zero3, by name or path)")
    main_process_port: Optional[int] = _f(None, "rendezvous port of rank 0 (None: accelerate's default, 29500)")

    def check(self, section: str) -> None:
        one_of(section, "name", self.name, ("none", "accelerate"))
        if self.num_processes is not None:
            positive(section, "num_processes", self.num_processes)
        if self.name == "none" and (self.num_processes or self.config_file):
            raise ConfigError(f"{section}.name", "is none, so num_processes / config_file would be ignored; "
                                                 "add launcher=accelerate")


@dataclass
class RunConfig:
    """The whole composed config of one run."""

    runner: str = _f("train", "which runner executes the run (see polmctl.runners.RUNNERS)")
    seed: int = _f(42, "seed for model init, data order, dropout and sampling")
    resume: Optional[str] = _f(None, "auto (latest checkpoint in this run dir) or a checkpoint path")
    output_dir: str = _f("${hydra:runtime.output_dir}", "where the run writes (Hydra's run dir)")
    recipe: RecipeInfo = field(default_factory=RecipeInfo)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    # Typed per objective (polmctl.objectives.METHOD_SCHEMAS); checked by validate().
    method: Any = field(default_factory=lambda: {"objective": "sft"}, metadata={"help": "the method's own knobs"})


SECTIONS = tuple(f.name for f in fields(RunConfig) if f.name not in ("runner", "seed", "resume", "output_dir", "method"))


def help_for(cls: type) -> Dict[str, str]:
    """Field name -> help string, for docs and error messages."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}
