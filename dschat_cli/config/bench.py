"""`dschat bench` run config: the reference's benchmark setting (SPEC.md section 4) on random
weights of real architectures: step 3 (or step 1, or DPO) for N steps after warm-up, per-phase
timings."""

from __future__ import annotations

from dataclasses import dataclass

from dschat_cli.config.estimators import ESTIMATORS, estimator_spec
from dschat_cli.config.ppo import OLD_LOGPROBS
from dschat_cli.config.schema import ConfigError, opt, section
from dschat_cli.config.sections import DTYPES, FP32_GRAD_ACCUM, LaunchOptions

GROUP_SAMPLES = 8  # --samples-per-prompt when unset for a group estimator (GRPO's papers, TRL)
BASE_BATCH = 64  # --batch-size when unset: the reference's largest batch on one H200


@dataclass(frozen=True)
class BenchConfig:
    step: str = opt("ppo", "What to measure: ppo (step 3: generation, scoring, actor and critic "
                    "training; no critic with a critic-free --advantage-estimator), sft (step 1: "
                    "the actor's training step) or dpo (`dschat dpo`'s step: the reference's "
                    "forward, the policy's forward + backward on chosen and rejected, the "
                    "optimizer step; --actor is the policy).", choices=("ppo", "sft", "dpo"))
    actor: str = opt("opt-1.3b", "Actor architecture: a preset (opt-125m ... opt-66b, llama-2-7b, "
                     "...) or a local model folder; weights are random either way.")
    critic: str = opt("opt-350m", "Critic and reward model architecture (ppo; the reward model "
                      "only with a critic-free --advantage-estimator).")
    batch_size: int | None = opt(
        None, "Answers (sequences) per GPU per PPO step: --batch-size / --samples-per-prompt "
        "prompts, each answered --samples-per-prompt times (generation batch = training batch), "
        "so tokens/s compare like for like across estimators at the same --batch-size; sequences "
        "per GPU per step for sft; pairs per GPU per step for dpo (each pair is two sequences, "
        f"chosen and rejected). Unset: {BASE_BATCH} (the reference's largest), then the largest "
        "batch the memory plan says fits one GPU here (or --gpu-memory), measured in a second "
        "run (on out of memory, the next smaller) and reported beside it; given: that batch "
        "only.", min=1)
    micro_batch_size: int | None = opt(
        None, "ppo: answers per training forward + backward (a PPO mini-batch); the batch's "
        "mini-batches make one optimizer step (gradient accumulation), so the update is the "
        "batch's as with one mini-batch, in less memory. Must divide --batch-size. Unset: the "
        "whole batch in one, except the larger batch the bench finds (no --batch-size), which "
        "is trained in mini-batches of half the first measured batch (32 after 64).", min=1)
    advantage_estimator: str = opt(
        "gae", "ppo: as `dschat ppo --advantage-estimator`. gae: PPO with a critic; the "
        "critic-free ones (grpo, dr-grpo, rloo, reinforce++, reinforce++-baseline) build, run and "
        "time no critic (no critic forward or training).", choices=tuple(ESTIMATORS))
    samples_per_prompt: int | None = opt(
        None, f"ppo: answers sampled per prompt (as `dschat ppo --samples-per-prompt`); must "
        f"divide --batch-size. Unset: {GROUP_SAMPLES} for the estimators that compare a group of "
        "answers (grpo, dr-grpo, rloo, reinforce++-baseline), else 1.", min=1)
    max_prompt_seq_len: int = opt(256, "Tokens in every prompt (exactly, for a benchmark).", min=4)
    max_answer_seq_len: int = opt(256, "Tokens in every generated answer (exactly, for a benchmark: "
                                  "eos is suppressed). For sft the sequence is prompt + answer "
                                  "tokens; for dpo each of a pair's two sequences is the shared "
                                  "prompt + its own answer of this many tokens (256 + 256: pairs "
                                  "of 2 x 512 tokens).", min=2)
    steps: int = opt(5, "Measured steps (after the warm-up).", min=1)
    warmup: int = opt(2, "Warm-up steps (compilation, CUDA graph capture, allocator), not "
                      "measured.", min=0)
    generation_engine: str = opt("both", "ppo: measure the fast engine, transformers' generate "
                                 "(hf), or both one after the other.",
                                 choices=("fast", "hf", "both"))
    old_logprobs: str = opt("auto", "ppo: as `dschat ppo --old-logprobs` (generation skips the "
                            "actor's scoring forward, fast engine only; auto switches to it after "
                            "a warm-up rollout's parity check within `dschat ppo`'s default "
                            "--parity-switch-gap).",
                            choices=OLD_LOGPROBS)
    compile_decode: str = opt("auto", "ppo: as `dschat ppo --compile-decode` (fast engine only; "
                              "auto compiles on a GPU, so the first warm-up step includes the "
                              "compile).", choices=("auto", "on", "off"))
    generation_tensor_parallel: int = opt(1, "ppo: as `dschat ppo --generation-tensor-parallel` "
                                          "(fast engine only).", min=1)
    actor_zero_stage: int | None = opt(None, "ZeRO stage of the actor (and reference; the policy "
                                       "and its reference for dpo). Unset: on one GPU in bf16, 1 "
                                       "(DeepSpeed's fp32-accumulating BF16_Optimizer: the "
                                       "fastest optimizer step measured) at a batch where its fp32 "
                                       "gradient buffer fits, else 0; 2 on several (the "
                                       "reference's benchmark setting).", choices=(0, 1, 2, 3))
    critic_zero_stage: int | None = opt(None, "ZeRO stage of the critic (and reward model). "
                                        "Unset: as --actor-zero-stage's default.",
                                        choices=(0, 1, 2, 3))
    gpu_memory: float | None = opt(None, "GiB per GPU to plan the largest batch against, instead "
                                   "of the GPUs here (a machine without a GPU has none to plan "
                                   "against).", min=0.1)
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass.")
    dtype: str = opt("auto", "Precision; auto is bf16 where supported.", choices=DTYPES)
    fp32_grad_accum: str = opt("auto", "As `dschat ppo --fp32-grad-accum` (auto: on for bf16 at "
                               "ZeRO-1).", choices=FP32_GRAD_ACCUM)
    torch_adam: bool = opt(False, "torch's AdamW instead of DeepSpeed's fused Adam.")
    precompute_ref_logprobs: bool = opt(False, "dpo: the reference copy scores the pairs before "
                                        "the measured steps and is freed, as `dschat dpo "
                                        "--precompute-ref-logprobs` does: no reference forward "
                                        "in the step.")
    json: str | None = opt(None, "Also write the results as JSON to this file.")
    output_dir: str | None = opt(None, "Folder for the run's records (default: a new temporary "
                                 "folder).")
    launch: LaunchOptions = section(LaunchOptions, panel="Launch")
    seed: int = opt(1234, "Random seed.")

    @property
    def overwrite(self) -> bool:  # the launcher's output-dir check: a bench folder is reusable
        return True

    @property
    def samples(self) -> int:
        """The rollout's answers per prompt: --samples-per-prompt, or the estimator's default."""
        if self.samples_per_prompt is not None:
            return self.samples_per_prompt
        return GROUP_SAMPLES if estimator_spec(self.advantage_estimator).needs_group else 1

    @property
    def prompts(self) -> int:
        """Prompts per GPU per PPO step (--batch-size counts answers)."""
        return self.batch // self.samples

    @property
    def batch(self) -> int:
        """--batch-size, or its default when unset (the launch fills it in: plan/choose.py)."""
        return BASE_BATCH if self.batch_size is None else self.batch_size

    @property
    def has_critic(self) -> bool:
        return self.step == "ppo" and estimator_spec(self.advantage_estimator).needs_critic

    def check(self) -> None:
        if self.step != "ppo":
            for flag, value, default in (("--advantage-estimator", self.advantage_estimator, "gae"),
                                         ("--samples-per-prompt", self.samples_per_prompt, None),
                                         ("--micro-batch-size", self.micro_batch_size, None),
                                         ("--compile-decode", self.compile_decode, "auto")):
                if value != default:
                    raise ConfigError(flag, "applies to --step ppo only")
        else:
            self._check_samples()
        if self.precompute_ref_logprobs and self.step != "dpo":
            raise ConfigError("--precompute-ref-logprobs", "applies to --step dpo only")
        if self.gpu_memory is not None and self.batch_size is not None:
            raise ConfigError("--gpu-memory", "plans the largest batch, and --batch-size fixes "
                              "the batch; drop one of them")
        if self.generation_engine == "hf" and self.old_logprobs == "generation":
            raise ConfigError("--old-logprobs generation", "needs --generation-engine fast or both")
        if self.generation_engine == "hf" and self.compile_decode == "on":
            raise ConfigError("--compile-decode on", "needs --generation-engine fast or both")
        if self.generation_engine == "hf" and self.generation_tensor_parallel > 1:
            raise ConfigError("--generation-tensor-parallel", "needs --generation-engine fast or "
                              "both")

    @property
    def micro(self) -> int:
        """Answers per training forward + backward (ppo): --micro-batch-size or the batch."""
        return self.batch if self.micro_batch_size is None else self.micro_batch_size

    def _check_samples(self) -> None:
        name, n = self.advantage_estimator, self.samples
        if estimator_spec(name).needs_group and n < 2:
            raise ConfigError("--samples-per-prompt", f"--advantage-estimator {name} compares the "
                              f"answers to the same prompt, so it needs >= 2 of them (e.g. "
                              f"{GROUP_SAMPLES}); got {n}")
        if self.batch % n:
            given = "" if self.batch_size is not None else " (its default)"
            raise ConfigError("--batch-size", f"{self.batch}{given} counts answers per GPU, so it "
                              f"must be a multiple of --samples-per-prompt {n} (e.g. "
                              f"{max(n, self.batch // n * n)})")
        if self.batch % self.micro:
            given = "" if self.batch_size is not None else " (its default)"
            raise ConfigError("--micro-batch-size", f"{self.micro} must divide --batch-size "
                              f"{self.batch}{given} (the batch's mini-batches make one "
                              f"optimizer step); e.g. {_divisor_below(self.batch, self.micro)}")


def _divisor_below(n: int, m: int) -> int:
    """The largest divisor of n that is at most m."""
    return max(d for d in range(1, min(n, m) + 1) if n % d == 0)


def bench_ppo_config(cfg: BenchConfig):
    """The `dschat ppo` config the benchmark's step 3 runs (random-weight models, one PPO epoch
    over one generation batch per step, no warm-up of the learning rate): --batch-size answers,
    --batch-size / --samples-per-prompt prompts, trained on in one optimizer step of
    --micro-batch-size mini-batches (gradient accumulation; unset: one). A critic-free
    estimator's --critic-model names the reward model only."""
    from dschat_cli.config.ppo import (PPOAlgoOptions, PPOConfig, PPODeepSpeedOptions,
                                       PPOGenerationOptions, PPOTrainOptions, PromptDataOptions)
    from dschat_cli.config.sections import ModelOptions

    def model(name, trained=True):
        return ModelOptions(model=name, random_init=True,
                            gradient_checkpointing=cfg.gradient_checkpointing and trained)

    engine = "hf" if cfg.generation_engine == "hf" else "fast"
    return PPOConfig(
        actor=model(cfg.actor), critic=model(cfg.critic, trained=cfg.has_critic),
        data=PromptDataOptions(max_prompt_seq_len=cfg.max_prompt_seq_len),
        train=PPOTrainOptions(per_device_generation_batch_size=cfg.prompts,
                              per_device_training_batch_size=cfg.micro,
                              gradient_accumulation_steps=cfg.batch // cfg.micro,
                              samples_per_prompt=cfg.samples,
                              num_warmup_steps=0, torch_adam=cfg.torch_adam,
                              test_stop_step=cfg.warmup + cfg.steps),
        ppo=PPOAlgoOptions(advantage_estimator=cfg.advantage_estimator),
        generation=PPOGenerationOptions(max_answer_seq_len=cfg.max_answer_seq_len,
                                        generation_engine=engine,
                                        old_logprobs=cfg.old_logprobs if engine == "fast"
                                        else "forward",
                                        compile_decode=cfg.compile_decode,
                                        generation_tensor_parallel=cfg.generation_tensor_parallel
                                        if engine == "fast" else 1),
        deepspeed=PPODeepSpeedOptions(actor_zero_stage=_stage(cfg.actor_zero_stage),
                                      critic_zero_stage=_stage(cfg.critic_zero_stage),
                                      dtype=cfg.dtype, fp32_grad_accum=cfg.fp32_grad_accum),
        launch=cfg.launch, output_dir=cfg.output_dir, overwrite=True, seed=cfg.seed)


def bench_sft_config(cfg: BenchConfig):
    """The `dschat sft` config the benchmark's step 1 runs."""
    from dschat_cli.config.sections import DataOptions, DeepSpeedOptions, ModelOptions, OptimOptions
    from dschat_cli.config.sft import SFTConfig

    return SFTConfig(
        model=ModelOptions(model=cfg.actor, random_init=True,
                           gradient_checkpointing=cfg.gradient_checkpointing),
        data=DataOptions(max_seq_len=cfg.max_prompt_seq_len + cfg.max_answer_seq_len),
        optim=OptimOptions(per_device_train_batch_size=cfg.batch, num_train_epochs=1,
                           max_steps=cfg.warmup + cfg.steps, torch_adam=cfg.torch_adam),
        deepspeed=DeepSpeedOptions(zero_stage=_stage(cfg.actor_zero_stage), dtype=cfg.dtype,
                                   fp32_grad_accum=cfg.fp32_grad_accum),
        launch=cfg.launch, output_dir=cfg.output_dir, overwrite=True, seed=cfg.seed)


def bench_dpo_config(cfg: BenchConfig):
    """The `dschat dpo` config the benchmark's DPO step runs: --actor as the policy (random
    weights; its reference a frozen copy of the same start), --batch-size pairs per micro-batch,
    each sequence prompt + answer tokens; DPO's own defaults otherwise (sigmoid loss, beta 0.1,
    dropout 0, weight decay 0.1)."""
    from dschat_cli.config.dpo import DPOConfig, DPOModelOptions, DPOOptimOptions, ReferenceOptions
    from dschat_cli.config.sections import DataOptions, DeepSpeedOptions

    return DPOConfig(
        model=DPOModelOptions(model=cfg.actor, random_init=True,
                              gradient_checkpointing=cfg.gradient_checkpointing),
        data=DataOptions(max_seq_len=cfg.max_prompt_seq_len + cfg.max_answer_seq_len),
        optim=DPOOptimOptions(per_device_train_batch_size=cfg.batch,
                              per_device_eval_batch_size=cfg.batch, num_train_epochs=1,
                              max_steps=cfg.warmup + cfg.steps, num_warmup_steps=0,
                              torch_adam=cfg.torch_adam),
        reference=ReferenceOptions(precompute_ref_logprobs=cfg.precompute_ref_logprobs),
        deepspeed=DeepSpeedOptions(zero_stage=_stage(cfg.actor_zero_stage), dtype=cfg.dtype,
                                   fp32_grad_accum=cfg.fp32_grad_accum),
        launch=cfg.launch, output_dir=cfg.output_dir, overwrite=True, seed=cfg.seed)


def _stage(stage: int | None) -> int:
    if stage is None:  # a programming error, not a user's: the launch chooses before it builds
        raise ValueError("the bench's ZeRO stages are chosen (plan/choose.py) before its run "
                         "configs are built")
    return stage


def bench_step_config(cfg: BenchConfig) -> tuple[str, object]:
    """(the step the benchmark runs, that step's run config): what the memory plan estimates."""
    build = {"ppo": bench_ppo_config, "sft": bench_sft_config, "dpo": bench_dpo_config}[cfg.step]
    return cfg.step, build(cfg)


def bench_ds_configs(cfg: BenchConfig, *, world_size: int, dtype: str, torch_adam: bool,
                     tensorboard_dir: str | None, job_name: str) -> dict[str, dict]:
    """The DeepSpeed configs the benchmark's run builds, by role: step 3's (four, or three
    without a critic), step 1's one model, or DPO's policy and reference copy (TensorBoard job
    JOB_NAME; the benchmark writes no TensorBoard files)."""
    if cfg.step == "dpo":
        from dschat_cli.config.dpo import dpo_ds_configs

        return dpo_ds_configs(bench_dpo_config(cfg), world_size=world_size, dtype=dtype,
                              torch_adam=torch_adam, tensorboard_dir=tensorboard_dir,
                              job_name=job_name)
    if cfg.step == "sft":
        from dschat_cli.config.ds_config import model_ds_configs

        return model_ds_configs(bench_sft_config(cfg), world_size=world_size, dtype=dtype,
                                torch_adam=torch_adam, tensorboard_dir=tensorboard_dir,
                                job_name=job_name)
    from dschat_cli.config.ppo_ds import ppo_ds_configs

    return ppo_ds_configs(bench_ppo_config(cfg), world_size=world_size, dtype=dtype,
                          torch_adam=torch_adam, tensorboard_dir=tensorboard_dir,
                          job_name=job_name)
