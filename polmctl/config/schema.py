"""Typed schemas for every node of a polmctl run config.

YAML in ``polmctl/conf`` fills these dataclasses; Hydra checks key names and types while
composing (the ``polmctl_schema`` node is first in conf/config.yaml's defaults), and
``polmctl.validate`` runs the semantic checks in ``check()`` and reports a bad
value with its full key path. Every field carries a one-line help string in its metadata;
``polmctl show --help-keys`` is not needed: the help strings are the documentation.

The ``method`` node depends on the method, so it is typed per method by the registry
(polmctl/methods/registry.py) and validated by its ``name`` key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from polmctl.errors import ConfigError


def option(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (mutable defaults go through a factory)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def one_of(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name}", f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


def positive(section: str, name: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"{section}.{name}", f"must be {bound}, got {value!r}")


# model.dtype's choices; also those of polmctl data critique --dtype and polmctl rollout-server --dtype
MODEL_DTYPES = ("auto_gpu", "auto", "float32", "bfloat16", "float16")


@dataclass
class RecipeInfo:
    name: str = option("custom", "recipe name (the file name in conf/recipe/)")
    paradigm: str = option("fine-tuning", "fine-tuning | alignment | reasoning | efficiency | integration")
    method: str = option("", "the method's usual name, e.g. 'LoRA'")
    summary: str = option("", "one line that says what the recipe does")

    def check(self, section: str) -> None:
        one_of(section, "paradigm", self.paradigm, PARADIGMS)


PARADIGMS = ("fine-tuning", "alignment", "reasoning", "efficiency", "integration")


@dataclass
class ModelConfig:
    name_or_path: str = option(
        "builtin:smollm2-135m",
        "builtin:<name> (smollm2-135m, tiny), a hub id, a local model dir or a run dir",
    )
    dtype: str = option(
        "auto_gpu",
        "weights and compute dtype (trainable parameters stay float32): auto_gpu (bf16 on CUDA GPUs of compute "
        "capability >= 8.0, else float32) | auto (also bf16 on CPUs with AVX512-BF16 or AMX-BF16) | float32 | "
        "bfloat16 | float16",
    )
    quantization: str = option("none", "load the base weights quantized with bitsandbytes: none | nf4 | fp4 | int8")
    double_quant: bool = option(True, "4-bit only: also quantize the quantization constants")
    trust_remote_code: bool = option(False, "allow a hub model's own Python code to run (off unless asked for)")
    revision: Optional[str] = option(None, "hub revision (branch, tag or commit)")
    cache_dir: Optional[str] = option(
        None, "where builtin models are materialised; default $POLMCTL_CACHE or ~/.cache/polmctl"
    )
    chat_template: Optional[str] = option(None, "a Jinja chat template (or path to one) that replaces the model's own")
    attn_implementation: Optional[str] = option(None, "eager | sdpa | flash_attention_2; None lets transformers choose")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")

    def check(self, section: str) -> None:
        one_of(section, "dtype", self.dtype, MODEL_DTYPES)
        one_of(section, "quantization", self.quantization, ("none", "nf4", "fp4", "int8"))
        if not self.name_or_path:
            raise ConfigError(f"{section}.name_or_path", "is empty; give builtin:<name>, a hub id or a path")


@dataclass
class DataConfig:
    source: str = option(
        "builtin:arithmetic", "builtin:<name>, a local .json/.jsonl/.csv/.parquet file, or a hub dataset name"
    )
    split: str = option("train", "split to train on (builtin sets have train and test, which never overlap)")
    eval_split: str = option("test", "held-out split used by evaluation tasks that read this source")
    max_rows: Optional[int] = option(None, "use at most this many rows (None: all)")
    format: str = option(
        "auto",
        "row format: auto (detected from the columns) | text | messages | prompt_completion",
    )
    max_length: int = option(512, "maximum tokens per row (prompt + completion)")
    overlong: str = option("truncate", "rows longer than max_length: truncate | drop | error")
    bad_rows: str = option(
        "skip",
        "preference rows with chosen == rejected, an empty answer or no room for one: "
        "skip (counted and reported) | error",
    )
    completion_only_loss: bool = option(True, "train only on completion / assistant tokens (False: on every token)")
    packing: bool = option(
        False,
        "padding-free packing: a micro-batch's rows as one sequence with per-row positions, each row "
        "attending to itself only (models/packed_attention.py); the SFT recipes turn it on",
    )
    shuffle: bool = option(True, "shuffle rows each epoch (seeded by the run seed)")
    options: Dict[str, Any] = option({}, "options for builtin generators, e.g. {n: 2000, max_operand: 50, ops: '+-*'}")
    hub_config: Optional[str] = option(None, "hub dataset config name (datasets.load_dataset's second argument)")

    def check(self, section: str) -> None:
        one_of(section, "format", self.format, ("auto", "text", "messages", "prompt_completion"))
        one_of(section, "overlong", self.overlong, ("truncate", "drop", "error"))
        one_of(section, "bad_rows", self.bad_rows, ("skip", "error"))
        positive(section, "max_length", self.max_length)
        if self.max_rows is not None:
            positive(section, "max_rows", self.max_rows)


PEFT_METHODS = (
    "none", "lora", "dora", "prompt_tuning", "prefix_tuning",
    "ia3", "vera", "loha", "lokr", "oft", "boft", "adalora", "ln_tuning",
)  # fmt: skip
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning")
LORA_INITS = ("default", "gaussian", "pissa", "olora", "eva", "loftq")  # and pissa_niter_<N>


@dataclass
class PeftConfig:
    method: str = option(
        "none",
        "adapter type: none (full fine-tuning) | lora | dora | prompt_tuning | prefix_tuning | ia3 | vera | "
        "loha | lokr | oft | boft | adalora | ln_tuning (docs/fine-tuning.md: what each trains)",
    )
    r: int = option(16, "lora/dora/vera/loha/lokr: rank of the update (adalora: the starting rank of every layer)")
    alpha: int = option(32, "lora/dora/loha/lokr: scaling numerator (the update is scaled by alpha / r)")
    dropout: float = option(0.05, "lora/dora/adalora/vera: dropout on the adapter input")
    target_modules: List[str] = option(
        ["all-linear"], "module names to adapt, or ['all-linear'] (ln_tuning: norm layer names)"
    )
    use_rslora: bool = option(False, "lora/dora: scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    num_virtual_tokens: int = option(20, "prompt/prefix tuning: number of virtual tokens")
    prompt_init_text: Optional[str] = option(None, "prompt tuning: initialise the virtual tokens from this text")
    merge_on_save: bool = option(
        False,
        "write final/ with the adapters merged into the base weights (every method but prompt/prefix tuning), "
        "and adapter/ with the adapter alone (not for LoftQ)",
    )
    init: str = option(
        "default",
        "lora: how A and B start: default (peft's: A kaiming-uniform, B zero) | gaussian | pissa (the top-r "
        "singular vectors of W; pissa_niter_N: randomized SVD, N iterations) | olora (QR of W) | eva (SVD of "
        "the training rows' activations, ranks redistributed) | loftq (CUDA only)",
    )
    rank_pattern: Dict[str, int] = option(
        {}, "lora/dora/loha/lokr: per-module ranks instead of r, by name or regex, e.g. {q_proj: 4}"
    )
    alpha_pattern: Dict[str, int] = option({}, "lora/dora/loha/lokr: per-module alphas instead of alpha, by name")
    feedforward_modules: List[str] = option(
        [], "ia3: targets scaled on their input (feed-forward), a subset of target_modules; []: peft's default"
    )
    block_size: int = option(32, "oft/boft: size of the orthogonal blocks (must divide each target's in_features)")
    butterfly_factor: int = option(1, "boft: butterfly factors (1: one block-diagonal factor, as OFT)")
    adalora_target_r: int = option(8, "adalora: average rank per layer once the budget schedule has pruned (<= r)")
    adalora_warmup: float = option(0.1, "adalora: fraction of trainer.max_steps at rank r before pruning (tinit)")
    adalora_final: float = option(0.2, "adalora: fraction of trainer.max_steps at the final ranks (tfinal)")
    adalora_interval: int = option(1, "adalora: optimizer steps between two rank re-allocations (deltaT)")
    adalora_orth_reg_weight: float = option(
        0.5, "adalora: weight of the orthogonality penalty on P and Q, logged as loss/adalora_orth (0: off)"
    )

    def check(self, section: str) -> None:
        one_of(section, "method", self.method, PEFT_METHODS)
        for name in ("r", "alpha", "num_virtual_tokens", "block_size", "butterfly_factor", "adalora_interval"):
            positive(section, name, getattr(self, name))
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{section}.dropout", f"must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError(f"{section}.target_modules", "is empty; name modules or use ['all-linear']")
        if self.merge_on_save and self.method in PROMPT_LEARNING:
            raise ConfigError(f"{section}.merge_on_save", f"{self.method} adds virtual tokens, nothing merges into W")
        if self.method == "ln_tuning" and "all-linear" in self.target_modules:
            raise ConfigError(
                f"{section}.target_modules",
                "ln_tuning trains norm layers, not linear ones; name them, e.g. [input_layernorm, norm]",
            )
        self._check_variants(section)

    def _check_variants(self, section: str) -> None:
        """The options that belong to one adapter type are refused on the others, not ignored."""
        init = self.init
        if not (init in LORA_INITS or (init.startswith("pissa_niter_") and init[12:].isdigit())):
            raise ConfigError(f"{section}.init", f"got {init!r}; allowed: {', '.join(LORA_INITS)}, pissa_niter_<N>")
        if init != "default" and self.method != "lora":
            raise ConfigError(f"{section}.init", f"only peft.method=lora takes an initialisation, not {self.method}")
        converts = init.startswith("pissa") or init == "olora"
        if converts and self.use_rslora and (self.rank_pattern or self.alpha_pattern):
            # final/ stores the PiSSA/OLoRA update as a plain LoRA (peft cannot convert this combination).
            raise ConfigError(
                f"{section}.init", f"{init} with use_rslora and rank/alpha patterns cannot be saved; drop one"
            )
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name)
            if pattern and self.method not in ("lora", "dora", "loha", "lokr"):
                raise ConfigError(f"{section}.{name}", f"only lora, dora, loha and lokr read it, not {self.method}")
            for key, value in pattern.items():
                positive(section, f"{name}.{key}", value)
        if self.feedforward_modules and self.method != "ia3":
            raise ConfigError(f"{section}.feedforward_modules", f"only ia3 reads it, not {self.method}")
        extra = set(self.feedforward_modules) - set(self.target_modules)
        if extra and "all-linear" not in self.target_modules:
            raise ConfigError(f"{section}.feedforward_modules", f"{sorted(extra)} must be a subset of target_modules")
        if self.method == "adalora":
            if self.adalora_target_r > self.r:
                raise ConfigError(
                    f"{section}.adalora_target_r", f"{self.adalora_target_r} exceeds the starting rank r={self.r}"
                )
            positive(section, "adalora_target_r", self.adalora_target_r)
            for name in ("adalora_warmup", "adalora_final"):
                if not 0 <= getattr(self, name) < 1:
                    raise ConfigError(f"{section}.{name}", f"must be in [0, 1), got {getattr(self, name)!r}")
            if self.adalora_warmup + self.adalora_final >= 1:
                raise ConfigError(
                    f"{section}.adalora_final",
                    "adalora_warmup + adalora_final leave no steps to prune ranks in; keep their sum below 1",
                )
            if self.adalora_orth_reg_weight < 0:
                raise ConfigError(
                    f"{section}.adalora_orth_reg_weight",
                    f"must be >= 0 (0 turns it off), got {self.adalora_orth_reg_weight!r}",
                )


@dataclass
class TrainerConfig:
    max_steps: int = option(100, "optimizer steps to run (a step = micro_batch_size x grad_accum x processes rows)")
    micro_batch_size: int = option(8, "rows per forward/backward pass")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    lr: float = option(2e-4, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norms)")
    betas: List[float] = option([0.9, 0.999], "AdamW betas")
    optimizer: str = option("adamw", "adamw | adamw_8bit (bitsandbytes) | sgd")
    scheduler: str = option("cosine", "learning-rate schedule after warmup: constant | linear | cosine")
    warmup_steps: int = option(0, "linear warmup steps (overrides warmup_ratio when > 0)")
    warmup_ratio: float = option(0.05, "warmup as a fraction of max_steps")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    keep_sparsity: bool = option(
        False,
        "fine-tuning a pruned model: weights that start at least 10% zeros keep their "
        "zeros (re-applied after every optimizer step and on a merged save)",
    )
    mixed_precision: str = option("no", "autocast for compute: no | bf16 | fp16 (via accelerate)")
    log_every: int = option(1, "write a metrics line every N steps")
    save_every: int = option(0, "write checkpoints/step-N every N steps (0: only final/)")
    keep_last: int = option(2, "checkpoints to keep (older ones are deleted)")
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps")
    auto_batch: bool = option(
        False,
        "on an out-of-memory error, halve the micro-batch and double the accumulation "
        "(same global batch) and retry the step; one process, offline methods",
    )

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
    trackers: List[str] = option([], "extra trackers through accelerate: tensorboard | wandb | mlflow")
    project: str = option("polmctl", "project / experiment name given to the trackers")
    progress: bool = option(True, "show a rich progress bar with the live loss")

    def check(self, section: str) -> None:
        for i, t in enumerate(self.trackers):
            one_of(section, f"trackers[{i}]", t, ("tensorboard", "wandb", "mlflow"))


@dataclass
class EvalConfig:
    tasks: List[str] = option(
        ["arithmetic"],
        "evaluation tasks: arithmetic | reversal (exact match) | perplexity | preference | step_preference | "
        "reward (reward models) | prm (process reward models) | forget | retain (unlearning: fact recall)",
    )
    before: bool = option(True, "also evaluate the starting model, so the summary shows before and after")
    max_samples: int = option(100, "held-out rows per task")
    batch_size: int = option(16, "rows per generation / scoring batch")
    max_new_tokens: int = option(48, "generation budget for exact-match tasks")
    source: Optional[str] = option(None, "held-out source for the tasks; None: each task's builtin set")

    def check(self, section: str) -> None:
        for i, t in enumerate(self.tasks):
            if t.startswith("lm_eval:"):  # an lm-evaluation-harness task: validate() checks it (polmctl.evals.lm_eval)
                continue
            tasks = ("arithmetic", "reversal", "perplexity", "preference", "step_preference", "reward", "prm")
            tasks += ("forget", "retain")
            one_of(section, f"tasks[{i}]", t, tasks)
        positive(section, "max_samples", self.max_samples)
        positive(section, "batch_size", self.batch_size)
        positive(section, "max_new_tokens", self.max_new_tokens)


@dataclass
class SweepConfig:
    metric: str = option(
        "final_loss",
        "dotted path in summary.json that a sweep reports and hydra/sweeper=optuna optimises, "
        "e.g. eval.after.arithmetic.accuracy",
    )
    direction: str = option("minimize", "minimize | maximize: which end of sweep.metric is best")

    def check(self, section: str) -> None:
        one_of(section, "direction", self.direction, ("minimize", "maximize"))
        if not self.metric.strip():
            raise ConfigError(f"{section}.metric", "is empty; give a dotted path in summary.json, e.g. final_loss")


@dataclass
class LauncherConfig:
    name: str = option(
        "none", "none (this process) | accelerate (re-run under `accelerate launch`: DDP, FSDP, DeepSpeed)"
    )
    num_processes: Optional[int] = option(
        None, "processes to start; None: the config file's count, else one per GPU, else 1"
    )
    config_file: Optional[str] = option(
        None,
        "an accelerate config YAML, e.g. a file from polmctl/conf/accelerate/ "
        "(ddp | fsdp | deepspeed_zero2 | deepspeed_zero3, by name or path)",
    )
    main_process_port: Optional[int] = option(None, "rendezvous port of rank 0 (None: accelerate's default, 29500)")
    num_machines: int = option(
        1,
        "machines (nodes) the processes span: one launch on each, one process group; num_processes "
        "counts them all (None: each machine's GPUs)",
    )
    machine_rank: Optional[int] = option(
        None, "with num_machines > 1: this machine's rank, 0 .. num_machines-1 (None: $SLURM_NODEID under Slurm)"
    )
    main_process_ip: Optional[str] = option(
        None,
        "with num_machines > 1: the address of machine 0 (None under Slurm: the first host of its allocation)",
    )

    def check(self, section: str) -> None:
        one_of(section, "name", self.name, ("none", "accelerate"))
        if self.num_processes is not None:
            positive(section, "num_processes", self.num_processes)
        if self.name == "none" and (self.num_processes or self.config_file or self.num_machines != 1):
            raise ConfigError(
                f"{section}.name",
                "is none, so num_processes / config_file / num_machines would be ignored; add launcher=accelerate",
            )
        self._check_machines(section)

    def _check_machines(self, section: str) -> None:
        positive(section, "num_machines", self.num_machines)
        if self.num_machines == 1:
            for key in ("machine_rank", "main_process_ip"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"{section}.{key}", "is read with several machines only; set num_machines")
            return
        if self.machine_rank is not None and not 0 <= self.machine_rank < self.num_machines:
            raise ConfigError(
                f"{section}.machine_rank", f"must be in 0 .. {self.num_machines - 1}, got {self.machine_rank}"
            )
        if self.num_processes is not None and self.num_processes % self.num_machines:
            raise ConfigError(
                f"{section}.num_processes",
                f"counts the processes of all {self.num_machines} machines, the same number on each; "
                f"got {self.num_processes}",
            )


CACHE_BACKEND_BITS = {"hqq": (1, 2, 3, 4, 8), "quanto": (2, 4), "fp8": (8,)}  # transformers' QuantizedCache


@dataclass
class GenerationConfig:
    cache: str = option(
        "dynamic",
        "KV cache of every generation (evaluation, rollouts, the quantize runner's eval): dynamic (full "
        "precision) | quantized (keys and values stored in cache_nbits bits: transformers' QuantizedCache)",
    )
    cache_backend: str = option(
        "hqq",
        "quantized: hqq (pip install hqq; 1/2/3/4/8 bits) | quanto (pip install optimum-quanto; 2/4 bits) | "
        "fp8 (float8 with one scale per layer, no extra package; cache_nbits=8, no groups or residual window)",
    )
    cache_nbits: int = option(4, "quantized: bits per stored key/value number (8 with fp8)")
    cache_group_size: int = option(64, "quantized, hqq/quanto: numbers that share one scale and zero point")
    cache_residual_length: int = option(
        128,
        "quantized, hqq/quanto: the newest tokens kept in full precision; each time this many have "
        "gathered they are quantized with the rest (the prompt is quantized at once)",
    )

    def check(self, section: str) -> None:
        one_of(section, "cache", self.cache, ("dynamic", "quantized"))
        one_of(section, "cache_backend", self.cache_backend, tuple(CACHE_BACKEND_BITS))
        one_of(section, "cache_nbits", self.cache_nbits, CACHE_BACKEND_BITS[self.cache_backend])
        positive(section, "cache_group_size", self.cache_group_size)
        positive(section, "cache_residual_length", self.cache_residual_length)


@dataclass
class RunConfig:
    """The whole composed config of one run."""

    seed: int = option(42, "seed for model init, data order, dropout and sampling")
    resume: Optional[str] = option(None, "auto (latest checkpoint in this run dir) or a checkpoint path")
    output_dir: str = option("${hydra:runtime.output_dir}", "where the run writes (Hydra's run dir)")
    recipe: RecipeInfo = field(default_factory=RecipeInfo)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # Typed per method (polmctl/methods/registry.py); checked by validate().
    method: Any = field(default_factory=lambda: {"name": "sft"}, metadata={"help": "the method's own knobs"})


SECTIONS = tuple(f.name for f in fields(RunConfig) if f.name not in ("seed", "resume", "output_dir", "method"))


def help_for(cls: type) -> Dict[str, str]:
    """Field name -> help string, for docs and error messages."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}
