"""The TRL side of benchmarks/vs_trl.py: SFTTrainer, DPOTrainer or GRPOTrainer on a workload,
run by its own ``train()`` loop and paused after every optimizer step.

    .venv/bin/python benchmarks/vs_trl.py --methods dpo --trl-precompute-ref    # (a helper of it)

``trainer.train()`` runs in a worker thread; a callback blocks it at the end of every step
(``on_step_end``) until the harness asks for the next one, so polmctl and TRL steps can
alternate in one process while TRL keeps its real loop (data loader, callbacks, logging
every step as polmctl does). Only one side ever runs at a time. A step is timed from its
release to its ``on_step_end``: data loading, forward, backward, optimizer and the previous
step's logging. Settings that are not TRL's defaults, so that both sides do the same work:
no gradient checkpointing (TRL's default is on; polmctl's off), rows in order, the same
dtype, LoRA dropout 0; GRPO loss_type="grpo" (TRL's default is "dapo").
"""

from __future__ import annotations

import tempfile
import threading
import time

import torch
from _workload import DATA, Workload

from polmctl.data import load_rows
from polmctl.models.load import resolve_model_path
from polmctl.rollout.rewards import math_answer


def trl_available() -> str | None:
    """TRL's version, or None when it is not installed (pip install 'polmctl[bench]')."""
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def trl_rows(w: Workload) -> list[dict]:
    """The workload's rows as TRL's conversational datasets: the same chat template renders
    them as polmctl's format_prompt / format_completion render the string columns."""
    rows = load_rows(DATA[w.method], "train", max_rows=w.rows_needed)
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    assistant = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    if w.method == "sft":
        return [{"prompt": user(r["prompt"]), "completion": assistant(r["completion"])} for r in rows]
    if w.method == "dpo":
        return [
            {"prompt": user(r["prompt"]), "chosen": assistant(r["chosen"]), "rejected": assistant(r["rejected"])}
            for r in rows
        ]
    return [{"prompt": user(r["prompt"]), "answer": r["answer"]} for r in rows]


def trl_math_answer(prompts, completions, answer, **_) -> list[float]:
    """polmctl's math_answer reward on TRL's conversational completions (message lists)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return math_answer(prompts, texts, answer)


def lora_config(w: Workload):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM", r=w.lora_r, lora_alpha=w.lora_alpha, lora_dropout=0.0, target_modules="all-linear"
    )


def build_trainer(w: Workload, output_dir: str, callbacks=(), model=None):
    """The TRL trainer for ``w`` (model, tokenizer, dataset, config, LoRA). ``model``: an
    already LoRA-wrapped model to train instead of loading one (the equivalence check)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

    path = resolve_model_path(w.model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(w.seed)
    peft = None
    if model is None:
        model, peft = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, w.dtype)), lora_config(w)
    common = dict(
        output_dir=output_dir,
        per_device_train_batch_size=w.micro_batch_size,
        gradient_accumulation_steps=w.grad_accum,
        max_steps=w.steps,
        learning_rate=w.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        bf16=w.dtype == "bfloat16",
        gradient_checkpointing=False,
        seed=w.seed,
        data_seed=w.seed,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
    )
    data = Dataset.from_list(trl_rows(w))
    if w.method == "sft":
        args = SFTConfig(max_length=w.max_length, **common)
        return SFTTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=peft,
            callbacks=list(callbacks),
        )
    if w.method == "dpo":
        args = DPOConfig(max_length=w.max_length, beta=w.beta, precompute_ref_log_probs=w.trl_precompute_ref, **common)
        return DPOTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=peft,
            callbacks=list(callbacks),
        )
    args = GRPOConfig(
        num_generations=w.num_generations,
        max_completion_length=w.max_new_tokens,
        temperature=w.temperature,
        top_p=1.0,
        top_k=0,
        loss_type="grpo",
        beta=0.0,
        scale_rewards="group",
        shuffle_dataset=False,
        **common,
    )
    return GRPOTrainer(
        model=model,
        reward_funcs=[trl_math_answer],
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft,
        callbacks=list(callbacks),
    )


def _batch_tokens(inputs: dict) -> int:
    """Non-padding tokens of a prepared micro-batch (GRPO: prompt + completion)."""
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    if "completion_mask" in inputs:
        return int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
    return int(inputs["input_ids"].numel())


class TRLSide:
    name = "trl"

    def __init__(self, w: Workload):
        from transformers import TrainerCallback

        side = self

        class Pause(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                side._ended = time.perf_counter()
                side._paused.release()
                side._resume.acquire()

        self.workload = w
        self._paused, self._resume = threading.Semaphore(0), threading.Semaphore(0)
        self._ended, self._thread, self._error, self._done = 0.0, None, None, False
        self.tokens, self.rollout_s, self.new_tokens = 0, 0.0, 0
        started = time.perf_counter()
        self.trainer = build_trainer(w, tempfile.mkdtemp(prefix=f"bench-trl-{w.method}-"), [Pause()])
        self.setup_s = time.perf_counter() - started  # includes DPO's precompute when it is on
        self._count_tokens()

    def _count_tokens(self) -> None:
        trainer, prepare = self.trainer, self.trainer._prepare_inputs

        def counting(inputs):
            out = prepare(inputs)
            self.tokens += _batch_tokens(out)
            return out

        trainer._prepare_inputs = counting
        if hasattr(trainer, "_generate_and_score_completions"):
            generate = trainer._generate_and_score_completions

            def timed(inputs):
                started = time.perf_counter()
                out = generate(inputs)
                self.rollout_s += time.perf_counter() - started
                self.new_tokens += int(out["completion_mask"].sum())
                return out

            trainer._generate_and_score_completions = timed

    def _run(self, threads: int) -> None:
        torch.set_num_threads(threads)  # OpenMP's thread count is per thread: match the main one
        try:
            self.trainer.train()
        except BaseException as err:  # handed to the main thread by step()
            self._error = err
        finally:
            self._done = True
            self._paused.release()

    def step(self) -> dict[str, float]:
        self.tokens, self.rollout_s, self.new_tokens = 0, 0.0, 0
        started = time.perf_counter()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(torch.get_num_threads(),), daemon=True)
            self._thread.start()
        else:
            self._resume.release()
        self._paused.acquire()
        self._check_precision()
        if self._error is not None:
            raise RuntimeError(f"TRL {self.workload.method} training failed: {self._error}") from self._error
        if self._done:
            raise RuntimeError(f"TRL {self.workload.method} stopped before the step asked for (max_steps reached)")
        out = {"time_s": self._ended - started, "tokens": float(self.tokens)}
        if self.workload.method == "grpo":
            out.update(rollout_s=self.rollout_s, new_tokens=float(self.new_tokens))
        return out

    def _check_precision(self) -> None:
        """accelerate's state is one per process and a side built later resets it: without this
        check a polmctl side built after this one would silently take TRL's bf16 autocast away."""
        from accelerate.state import AcceleratorState

        wanted = "bf16" if self.workload.dtype == "bfloat16" else "no"
        if self._error is None and AcceleratorState().mixed_precision != wanted:
            raise RuntimeError(
                f"TRL's side runs with accelerate's mixed_precision={AcceleratorState().mixed_precision!r}, "
                f"not {wanted!r}: build the TRL side after the polmctl side"
            )

    def losses(self) -> list[float]:
        """The loss TRL logged at each step so far (it logs a step after its on_step_end)."""
        return [entry["loss"] for entry in self.trainer.state.log_history if "loss" in entry]

    def close(self) -> None:
        if self._thread is not None and not self._done:
            self._resume.release()
            self._thread.join(timeout=60)
