"""`dschat ppo` run config: step 3, RLHF with PPO on four models (actor, critic, reference,
reward)."""

from __future__ import annotations

from dataclasses import dataclass

from dschat_cli.config.estimators import (ESTIMATORS, KL_ESTIMATORS, KL_PLACEMENTS,
                                          LOSS_AGGREGATIONS, RLSettings, rl_settings)
from dschat_cli.config.schema import ConfigError, opt, section
from dschat_cli.config.sections import (DTYPES, FP32_GRAD_ACCUM, FP32_GRAD_ACCUM_HELP,
                                        SCHEDULERS, CheckpointOptions, DataOptions, HealthOptions,
                                        LaunchOptions, LoraOptions, ModelOptions, OptimOptions,
                                        ReportOptions, parse_split)


@dataclass(frozen=True)
class PromptDataOptions:
    data_path: tuple[str, ...] = opt(("Dahoas/rm-static",), "Prompt source, repeatable (as for "
                                     "`dschat sft`); step 3 uses the prompts of its part of the "
                                     "split.")
    data_dir: str | None = opt(None, "Folder with train.json and eval.json for --data-path "
                               "local/jsonfile.")
    data_split: str = opt("2,4,4", "Relative sizes of the parts for steps 1, 2, 3 (step 3 uses the "
                          "third).")
    data_cache_dir: str = opt("~/.cache/dschat/data", "Where tokenised data is cached.")
    max_prompt_seq_len: int = opt(256, "Prompts longer than this many tokens are dropped (and "
                                  "counted), not truncated.", min=4)
    max_train_samples: int = opt(0, "Use at most this many training prompts (0: all).", min=0)
    max_eval_samples: int = opt(0, "Use at most this many held-out prompts (0: all).", min=0)
    unsupervised_dataset_name: str | None = opt(None, "Pre-training data mixed into the actor loss "
                                                "(a hub dataset with a 'text' column, or a local "
                                                ".txt/.json/.jsonl/.parquet file or folder).")
    unsupervised_dataset_config_name: str | None = opt(None, "Config name of the unsupervised hub "
                                                       "dataset (e.g. wikitext-2-raw-v1).")
    unsup_coef: float = opt(27.8, "Weight of the unsupervised LM loss (gamma in Eq. 2 of "
                            "InstructGPT).", min=0.0)

    def __post_init__(self) -> None:
        parse_split(self.data_split)

    def as_data_options(self) -> DataOptions:
        """The generic data section the data layer takes."""
        return DataOptions(data_path=self.data_path, data_dir=self.data_dir,
                           data_split=self.data_split, data_cache_dir=self.data_cache_dir,
                           max_seq_len=self.max_prompt_seq_len,
                           max_train_samples=self.max_train_samples,
                           max_eval_samples=self.max_eval_samples)


@dataclass(frozen=True)
class PPOTrainOptions:
    per_device_generation_batch_size: int = opt(16, "Prompts per GPU per generation batch.", min=1)
    per_device_training_batch_size: int = opt(16, "Experience samples (answers) per GPU per PPO "
                                              "mini-batch.", min=1)
    samples_per_prompt: int = opt(1, "Answers sampled per prompt: a rollout holds --per-device-"
                                  "generation-batch-size prompts x this many answers. The group "
                                  "estimators (grpo, dr-grpo, rloo, reinforce++-baseline) need >= 2 "
                                  "(GRPO's papers and TRL use 8).", min=1)
    generation_batches: int = opt(1, "Generation batches collected before each PPO update.", min=1)
    ppo_epochs: int = opt(1, "Passes of PPO updates over each collected experience.", min=1)
    num_train_epochs: int = opt(1, "Passes over the prompt data.", min=1)
    gradient_accumulation_steps: int = opt(1, "PPO mini-batches per optimizer step.", min=1)
    actor_learning_rate: float = opt(9.65e-6, "Actor peak learning rate.", min=0.0)
    critic_learning_rate: float = opt(5e-6, "Critic peak learning rate.", min=0.0)
    actor_weight_decay: float = opt(0.0, "Actor AdamW weight decay.", min=0.0)
    critic_weight_decay: float = opt(0.0, "Critic AdamW weight decay.", min=0.0)
    lr_scheduler_type: str = opt("cosine", "Learning-rate schedule of both models.",
                                 choices=SCHEDULERS)
    num_warmup_steps: int = opt(100, "Linear warm-up optimizer steps.", min=0)
    gradient_clipping: float = opt(1.0, "Clip each model's global gradient norm (0 disables).",
                                   min=0.0)
    torch_adam: bool = opt(False, "Use torch's AdamW instead of DeepSpeed's fused/CPU Adam (always "
                           "on without a GPU).")
    test_stop_step: int = opt(0, "Stop after this many PPO steps (0: run all epochs).", min=0)


@dataclass(frozen=True)
class PPOAlgoOptions:
    advantage_estimator: str = opt(
        "gae", "How each answer's advantage is estimated. gae: PPO with a learned critic "
        "(DeepSpeed-Chat). Critic-free (no critic is built, trained or saved; the reward model is "
        "--reward-model, or --critic-model, DeepSpeed-Chat's name for the step-2 output): grpo "
        "(group mean and std), dr-grpo (group mean), rloo (leave-one-out mean), reinforce++ "
        "(batch-whitened returns), reinforce++-baseline (group mean, then whitened).",
        choices=tuple(ESTIMATORS))
    kl_ctl: float | None = opt(None, "KL coefficient to the reference model; unset: the "
                               "estimator's default (gae 0.1, grpo 0.04, dr-grpo 0, rloo 0.05, "
                               "reinforce++ and reinforce++-baseline 0.01).", min=0.0)
    kl_placement: str = opt("auto", "Where the KL to the reference goes. reward: -coef x KL in the "
                            "reward (per token; the group estimators subtract each answer's summed "
                            "KL from its score); loss: + coef x KL in the actor loss. auto: the "
                            "estimator's (loss for grpo and dr-grpo, reward otherwise).",
                            choices=("auto", *KL_PLACEMENTS))
    kl_estimator: str = opt("auto", "Per-token KL estimate, with d = logprob - ref_logprob: k1 = d, "
                            "k2 = d^2 / 2, k3 = exp(-d) - 1 + d. auto: k3 with --kl-placement loss, "
                            "else k1.", choices=("auto", *KL_ESTIMATORS))
    loss_aggregation: str = opt("auto", "How the per-token policy loss of a mini-batch becomes one "
                                "number. token-mean: every answer token weighs the same; "
                                "seq-mean-token-mean: every answer weighs the same; "
                                "seq-mean-token-sum-norm (Dr. GRPO): sum over tokens / (answers x "
                                "--max-answer-seq-len). auto: the estimator's (seq-mean-token-mean "
                                "for grpo, seq-mean-token-sum-norm for dr-grpo, token-mean "
                                "otherwise).", choices=("auto", *LOSS_AGGREGATIONS))
    clip_reward_value: float = opt(5.0, "The reward score is clipped to +- this value.", min=0.0)
    cliprange: float = opt(0.2, "PPO clip range of the policy ratio (below 1; above too unless "
                           "--cliprange-high).", min=0.0)
    cliprange_high: float | None = opt(None, "Clip-higher (DAPO): the ratio's upper clip is 1 + this "
                                       "(e.g. 0.28), so unlikely tokens with a positive advantage "
                                       "can still rise; unset: --cliprange.", min=0.0)
    dual_clip: float | None = opt(None, "Dual-clip PPO: for a negative advantage the loss is capped "
                                  "at this x |advantage| (verl's 3.0), so one very unlikely "
                                  "sampled token cannot blow the update up; unset: off.", min=1.0)
    cliprange_value: float = opt(0.2, "Clip range of the value function around the old values.",
                                 min=0.0)
    gamma: float = opt(1.0, "Discount factor.", min=0.0, max=1.0)
    lam: float = opt(0.95, "GAE lambda.", min=0.0, max=1.0)
    whiten_advantages: bool = opt(False, "Normalise advantages to mean 0, variance 1 over each "
                                  "pooled experience (DeepSpeed-Chat does not).")
    kl_target: float | None = opt(None, "Adaptive KL (Ziegler et al. 2019): steer the KL to the "
                                  "reference (nats summed over an answer, the log's kl) towards this "
                                  "target by raising or lowering the coefficient, which starts at "
                                  "--kl-ctl; unset: the fixed --kl-ctl of DeepSpeed-Chat.", min=0.0)
    kl_horizon: float = opt(10000.0, "Adaptive KL horizon in answers: the coefficient changes by at "
                            "most x e^(+-0.2) over this many answers.", min=1.0)
    missing_eos_penalty: float = opt(0.0, "Subtracted from the reward score of an answer that did not "
                                     "end with eos (cut at --max-answer-seq-len); 0: off "
                                     "(DeepSpeed-Chat).", min=0.0)
    true_reward: str = opt("none", "A known true reward to report beside the reward model's "
                           "score, never trained on: demo is the demo task's programmatic judge of "
                           "what its preference means (dschat pipeline --demo sets it); none: no "
                           "such reward is known.", choices=("none", "demo"))
    enable_ema: bool = opt(False, "Keep an exponential moving average of the actor (beta 0.992), "
                           "saved as actor_ema/.")

    @property
    def settings(self) -> RLSettings:
        """The algorithm with the estimator's defaults filled in (config/estimators.py)."""
        return rl_settings(self)


# --old-logprobs: where PPO's old logprobs come from (steps/rl/experience.py's OldLogprobsSource)
OLD_LOGPROBS = ("auto", "forward", "generation")


@dataclass(frozen=True)
class PPOGenerationOptions:
    max_answer_seq_len: int = opt(256, "Maximum generated answer tokens.", min=2)
    do_sample: bool = opt(True, "Sample answers (--no-do-sample: greedy).")
    temperature: float = opt(1.0, "Sampling temperature.", min=1e-4)
    top_p: float = opt(1.0, "Nucleus sampling probability mass.", min=0.0, max=1.0)
    top_k: int = opt(0, "Sample from the k most likely tokens (0: no limit).", min=0)
    generation_engine: str = opt("fast", "fast: dschat's rollout engine (static KV cache, CUDA-graph "
                                 "decode on GPU, parameters gathered once per rollout); hf: "
                                 "transformers' generate (the reference path, slower).",
                                 choices=("fast", "hf"))
    old_logprobs: str = opt("auto", "Where PPO's old logprobs come from. forward: an actor "
                            "forward pass over each rollout (as DeepSpeed-Chat); generation: the "
                            "sampling pass of the fast engine (saves that forward; checked against "
                            "it every --parity-check-interval rollouts); auto: the forward pass "
                            "until a parity check shows the fast engine's logprobs within "
                            "--parity-switch-gap of it, then the sampling pass (checked as with "
                            "generation; back to the forward pass for the rest of the run if a "
                            "check is off by more). The run log says which and why.",
                            choices=OLD_LOGPROBS)
    parity_tolerance: float = opt(0.1, "Stop when the fast engine's logprobs differ from the actor's "
                                  "forward pass by more than this many nats on average over the "
                                  "answer tokens (bf16 rounding gives ~0.01).", min=0.0)
    parity_check_interval: int = opt(10, "With --old-logprobs generation (or auto, once switched): "
                                     "compare with a forward pass on the first rollout and every N "
                                     "rollouts.", min=1)
    parity_switch_gap: float = opt(0.03, "With --old-logprobs auto: the largest mean gap (nats per "
                                   "answer token) between the fast engine's logprobs and the forward "
                                   "pass at which the engine's are used (bf16 gives 0.007-0.021 on "
                                   "an H200, docs/benchmarks.md).", min=0.0)
    compile_decode: str = opt("auto", "Compile the fast engine's decode step with torch.compile "
                              "(one graph per engine, compiled at the first rollout, about 1-2 "
                              "minutes; elementwise work fused into fewer kernels), then record "
                              "it as CUDA graphs as usual. auto: on for the rollouts of a GPU run "
                              "generating alone from a ZeRO-0/1/2 actor (14% faster decode on an "
                              "H100), off on CPU, under ZeRO-3, with "
                              "--generation-tensor-parallel and for the held-out and greedy "
                              "checks; the run log says which and why. A compiler failure warns "
                              "once and decodes uncompiled.", choices=("auto", "on", "off"))
    generation_tensor_parallel: int = opt(
        1, "Split the actor N ways for generation: the N ranks of a group (consecutive ranks: one "
        "node's GPUs) decode their prompts together, each holding 1/N of the attention and MLP "
        "weights, so a decode step reads 1/N of the model per GPU. Helps large actors (13B+) at "
        "small batches; fast engine, OPT and Llama-family actors (LoRA adapters are merged into "
        "the copy). 1: every rank generates alone.",
        min=1)
    print_answers: bool = opt(False, "Print a generated prompt and answer every "
                              "--print-answers-interval steps.")
    print_answers_interval: int = opt(1, "Steps between printed answers.", min=1)


@dataclass(frozen=True)
class PPODeepSpeedOptions:
    actor_zero_stage: int = opt(0, "ZeRO stage of the actor (and of its frozen reference copy when "
                                "3).", choices=(0, 1, 2, 3))
    critic_zero_stage: int = opt(0, "ZeRO stage of the critic (and of the frozen reward model when "
                                 "3).", choices=(0, 1, 2, 3))
    offload: bool = opt(False, "Offload the actor's and critic's optimizer states (and ZeRO-3 "
                        "parameters) to CPU memory.")
    offload_reference_model: bool = opt(False, "Keep the frozen reference model's parameters in CPU "
                                        "memory (ZeRO-3 parameter offload).")
    offload_reward_model: bool = opt(False, "Keep the frozen reward model's parameters in CPU "
                                     "memory (ZeRO-3 parameter offload).")
    dtype: str = opt("auto", "Precision of all four models; auto is bf16 on GPUs that support it, "
                     "else fp16 on GPU, fp32 on CPU.", choices=DTYPES)
    fp32_grad_accum: str = opt("auto", FP32_GRAD_ACCUM_HELP + " The actor and the critic each "
                               "follow their own ZeRO stage.", choices=FP32_GRAD_ACCUM)
    enable_tensorboard: bool = opt(False, "Also write TensorBoard event files (to "
                                   "OUTPUT_DIR/tensorboard): DeepSpeed-Chat's name for "
                                   "--report-to tensorboard.")


@dataclass(frozen=True)
class PPOHealthOptions(HealthOptions):
    """Step 3's health rules besides NaN/inf (steps/health.py explains each threshold)."""
    max_kl: float | None = opt(None, "Anomaly when the KL to the reference (nats summed over an "
                               "answer, mean over answers) stays above this; unset: 2 x "
                               "--clip-reward-value / --kl-ctl (100 with the defaults), beyond which "
                               "the KL penalty outweighs any reward the actor could gain; 0 "
                               "disables.", min=0.0)
    min_answer_length: float = opt(2.0, "Anomaly when the mean answer length in tokens (dropped "
                                   "answers count 0) stays below this (capped at half of "
                                   "--max-answer-seq-len); 0 disables.", min=0.0)
    reward_collapse_drop: float = opt(2.0, "Anomaly when the EMA reward stays more than this many "
                                      "baseline reward spreads (std of the batch rewards over the "
                                      "first 3 PPO steps) below its best; 0 disables.", min=0.0)
    max_repetition: float = opt(0.5, "Anomaly when the mean share of repeated trigrams in the "
                                "answers (each answer's trigrams already seen earlier in it) stays "
                                "above this: answers stuck repeating a word or phrase, the classic "
                                "reward-model exploit; 0 disables.", min=0.0, max=1.0)
    greedy_check_interval: int = opt(10, "Every N PPO steps, answer the first "
                                     "--greedy-check-prompts held-out prompts greedily (what `dschat "
                                     "chat` says; sampled answers can look healthy while greedy ones "
                                     "repeat a token) and hold those answers to --max-repetition "
                                     "too; logged as greedy_repetition. 0: never.", min=0)
    greedy_check_prompts: int = opt(8, "Held-out prompts per greedy check (per GPU).", min=1)
    diversity_collapse: float = opt(0.3, "Anomaly when distinct-2 (unique bigrams / bigrams over a "
                                    "step's answers) stays below this fraction of its baseline (the "
                                    "first 3 PPO steps): every prompt gets an alike answer; 0 "
                                    "disables.", min=0.0, max=1.0)
    reward_collapse_spread: float = opt(0.05, "Anomaly when the spread (std) of the batch rewards "
                                        "stays below this fraction of its baseline (every prompt "
                                        "gets an alike answer); 0 disables.", min=0.0, max=1.0)
    anomaly_patience: int = opt(3, "Consecutive PPO steps the KL, answer-length and reward rules "
                                "must hold before they count (NaN/inf count at once).", min=1)


@dataclass(frozen=True)
class PPOConfig:
    actor: ModelOptions = section(ModelOptions, prefix="actor-", panel="Actor")
    actor_lora: LoraOptions = section(LoraOptions, prefix="actor-", panel="Actor")
    critic: ModelOptions = section(ModelOptions, prefix="critic-", panel="Critic and reward")
    critic_lora: LoraOptions = section(LoraOptions, prefix="critic-", panel="Critic and reward")
    reward_model: str | None = opt(None, "Frozen reward model folder (default: --critic-model; "
                                   "--critic-trust-remote-code covers it too).")
    data: PromptDataOptions = section(PromptDataOptions, panel="Data")
    train: PPOTrainOptions = section(PPOTrainOptions, panel="Training")
    ppo: PPOAlgoOptions = section(PPOAlgoOptions, panel="PPO")
    generation: PPOGenerationOptions = section(PPOGenerationOptions, panel="Generation")
    deepspeed: PPODeepSpeedOptions = section(PPODeepSpeedOptions, panel="DeepSpeed")
    launch: LaunchOptions = section(LaunchOptions, panel="Launch")
    health: PPOHealthOptions = section(PPOHealthOptions, panel="Health")
    checkpoint: CheckpointOptions = section(CheckpointOptions, panel="Checkpoints")
    report: ReportOptions = section(ReportOptions, panel="Reporting")
    output_dir: str | None = opt(None, "Folder for actor/, critic/ (and actor_ema/), run config, "
                                 "DeepSpeed JSONs, logs and metrics.")
    overwrite: bool = opt(False, "Allow writing into a non-empty --output-dir.")
    seed: int = opt(1234, "Random seed (data, sampling, initialisation).")

    @property
    def reward_path(self) -> str:
        return self.reward_model or str(self.critic.model)

    @property
    def has_critic(self) -> bool:
        """Whether the run builds, trains and saves a critic (the estimator reads its values)."""
        return self.ppo.settings.needs_critic

    def optim_for(self, role: str) -> OptimOptions:
        """The generic optimizer section for 'actor' or 'critic' (what the DS builder takes)."""
        t = self.train
        return OptimOptions(
            learning_rate=t.actor_learning_rate if role == "actor" else t.critic_learning_rate,
            weight_decay=t.actor_weight_decay if role == "actor" else t.critic_weight_decay,
            lr_scheduler_type=t.lr_scheduler_type, num_warmup_steps=t.num_warmup_steps,
            num_train_epochs=t.num_train_epochs,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            per_device_train_batch_size=t.per_device_training_batch_size,
            per_device_eval_batch_size=t.per_device_generation_batch_size,
            gradient_clipping=t.gradient_clipping, torch_adam=t.torch_adam)

    def deepspeed_for(self, role: str):
        from dschat_cli.config.sections import DeepSpeedOptions

        d = self.deepspeed
        return DeepSpeedOptions(
            zero_stage=d.actor_zero_stage if role == "actor" else d.critic_zero_stage,
            offload=d.offload, dtype=d.dtype, fp32_grad_accum=d.fp32_grad_accum,
            enable_tensorboard=d.enable_tensorboard)

    def check(self) -> None:
        if not self.actor.model:
            raise ConfigError("--actor-model", "is required (the step-1 output folder, a hub id or "
                              "a preset)")
        if self.has_critic and not self.critic.model:
            raise ConfigError("--critic-model", "is required (the step-2 reward model folder)")
        if not self.has_critic:
            self._check_critic_free()
        self._check_estimator()
        if not self.output_dir:
            raise ConfigError("--output-dir", "is required")
        for role, lora in (("actor", self.actor_lora), ("critic", self.critic_lora)):
            if lora.only_optimize_lora and lora.lora_dim == 0:
                raise ConfigError(f"--{role}-only-optimize-lora", f"needs --{role}-lora-dim > 0")
        if self.deepspeed.offload and not self.has_critic and self.deepspeed.actor_zero_stage == 0:
            raise ConfigError("--offload", "needs --actor-zero-stage >= 1")
        if self.deepspeed.offload and self.has_critic and 0 in (self.deepspeed.actor_zero_stage,
                                                                self.deepspeed.critic_zero_stage):
            raise ConfigError("--offload", "needs --actor-zero-stage and --critic-zero-stage >= 1")
        d = self.deepspeed
        stages = [("--actor-zero-stage", d.actor_zero_stage)] + \
            ([("--critic-zero-stage", d.critic_zero_stage)] if self.has_critic else [])
        for flag, stage in stages:
            if d.fp32_grad_accum == "on" and stage != 1:
                raise ConfigError("--fp32-grad-accum", f"on needs ZeRO-1 for the actor and the "
                                  f"critic (DeepSpeed accumulates bf16 gradients in fp32 only "
                                  f"there), but {flag} is {stage}; pass {flag} 1, or "
                                  "--fp32-grad-accum auto (fp32 wherever the stage is 1)")
        if self.data.unsupervised_dataset_config_name and not self.data.unsupervised_dataset_name:
            raise ConfigError("--unsupervised-dataset-config-name",
                              "needs --unsupervised-dataset-name")
        g = self.generation
        if g.parity_switch_gap != PPOGenerationOptions().parity_switch_gap and \
                g.old_logprobs != "auto":
            raise ConfigError("--parity-switch-gap", f"applies to --old-logprobs auto only (got "
                              f"--old-logprobs {g.old_logprobs}); drop it")
        if g.parity_switch_gap > g.parity_tolerance:
            raise ConfigError("--parity-switch-gap", f"{g.parity_switch_gap:g} is above "
                              f"--parity-tolerance {g.parity_tolerance:g}, which stops the run; "
                              "give a smaller gap")
        if g.old_logprobs == "generation" and g.generation_engine != "fast":
            raise ConfigError("--old-logprobs generation", "needs --generation-engine fast (the hf "
                              "engine does not return logprobs)")
        if g.compile_decode == "on" and g.generation_engine != "fast":
            raise ConfigError("--compile-decode on", "needs --generation-engine fast (it compiles "
                              "the fast engine's decode step)")
        if g.generation_tensor_parallel > 1:
            if g.generation_engine != "fast":
                raise ConfigError("--generation-tensor-parallel", "needs --generation-engine fast")
        t = self.train
        per_rollout = t.per_device_generation_batch_size * t.generation_batches
        if per_rollout * t.samples_per_prompt % t.per_device_training_batch_size:
            what = ("--per-device-generation-batch-size x --samples-per-prompt x "
                    "--generation-batches" if t.samples_per_prompt > 1 else
                    "--per-device-generation-batch-size x --generation-batches")
            raise ConfigError("--per-device-training-batch-size",
                              f"{t.per_device_training_batch_size} must divide the experience per "
                              f"GPU ({what} = {per_rollout * t.samples_per_prompt})")

    def _check_critic_free(self) -> None:
        """A critic-free estimator builds no critic: its flags would be accepted and ignored, so
        they are refused; --critic-model names the reward model, as in DeepSpeed-Chat."""
        name = self.ppo.advantage_estimator
        if not (self.reward_model or self.critic.model):
            raise ConfigError("--reward-model", f"is required (the step-2 reward model folder; "
                              f"--critic-model, DeepSpeed-Chat's name for it, works too)")
        if self.reward_model and self.critic.model and \
                str(self.reward_model) != str(self.critic.model):
            raise ConfigError("--critic-model", f"--advantage-estimator {name} trains no critic, "
                              "so --critic-model can only name the reward model, and "
                              "--reward-model names another; give the reward model once")
        defaults = {"train": PPOTrainOptions(), "ppo": PPOAlgoOptions(),
                    "critic": ModelOptions(), "critic_lora": LoraOptions()}
        refused = [("train", "critic_learning_rate"), ("train", "critic_weight_decay"),
                   ("ppo", "cliprange_value"), ("ppo", "lam"), ("critic", "dropout"),
                   ("critic", "gradient_checkpointing"), ("critic", "tokenizer"),
                   *(("critic_lora", f) for f in ("lora_dim", "lora_alpha", "lora_module_name",
                                                  "only_optimize_lora", "lora_learning_rate"))]
        for section_name, field in refused:
            if getattr(getattr(self, section_name), field) != \
                    getattr(defaults[section_name], field):
                flag = (("--critic-" if section_name.startswith("critic") else "--")
                        + field.replace("_", "-"))
                raise ConfigError(flag, f"--advantage-estimator {name} builds no critic, so this "
                                  "option has nothing to act on; drop it, or use "
                                  "--advantage-estimator gae (PPO with a critic)")

    def _check_estimator(self) -> None:
        s, t, p = self.ppo.settings, self.train, self.ppo
        name = s.estimator.name
        if s.estimator.needs_group and t.samples_per_prompt < 2:
            raise ConfigError("--samples-per-prompt", f"--advantage-estimator {name} compares the "
                              "answers to the same prompt, so it needs >= 2 of them (e.g. "
                              "--samples-per-prompt 8); got 1")
        if not s.estimator.returns_to_go and p.gamma != PPOAlgoOptions().gamma:
            raise ConfigError("--gamma", f"--advantage-estimator {name} gives every token of an "
                              "answer the same advantage, so there is nothing to discount; drop "
                              "--gamma")
        if s.estimator.whitens and p.whiten_advantages:
            raise ConfigError("--whiten-advantages", f"--advantage-estimator {name} already "
                              "whitens its advantages over the experience; drop the flag")
        if self.ppo.kl_target is not None and s.kl_coef == 0:
            raise ConfigError("--kl-target", "adaptive KL scales the KL coefficient, which is 0; "
                              "give a starting --kl-ctl > 0")

