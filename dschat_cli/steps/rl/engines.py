"""Step 3's four models as DeepSpeed engines, plus the tokenizer they share.

    models = PPOModels.build(cfg, dist, actor_steps=..., critic_steps=..., resolved=record)

`resolved` is the run record the launch wrote (config/resolved.py: precision and the four
DeepSpeed configs, by role); the Python API may leave it out to resolve one for this rank's
machine.

The actor and the critic train (each with its optimizer and LR schedule over the run's optimizer
steps); the reference (a frozen copy of the initial actor) and the reward model are engines
without an optimizer, so that under ZeRO-3 they are partitioned like the trained ones. The
critic starts from the reward model (--critic-model); the frozen reward model is --reward-model,
by default the same folder. A critic-free estimator (grpo, rloo, ...) builds no critic at all
(`critic` is None); its reward model is --reward-model, or --critic-model (DeepSpeed-Chat's name
for the step-2 output).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dschat_cli.config.ppo import PPOConfig
from dschat_cli.config.resolved import ResolvedRun
from dschat_cli.dist import Dist
from dschat_cli.models.loading import apply_lora, load_causal_lm, load_tokenizer


@dataclass
class PPOModels:
    actor: object
    ref: object
    critic: object | None  # None: a critic-free estimator (--advantage-estimator grpo, ...)
    reward: object
    tokenizer: object
    dtype: str  # the resolved precision: bf16 / fp16 / fp32
    ds_configs: dict  # role (actor, ref, critic, reward) -> DeepSpeed config dict

    @property
    def trained(self) -> dict:
        """{name: engine} of the models that train (what checkpoints hold)."""
        return {"actor": self.actor} if self.critic is None else \
            {"actor": self.actor, "critic": self.critic}

    @classmethod
    def build(cls, cfg: PPOConfig, dist: Dist, actor_steps: int, critic_steps: int,
              resolved: ResolvedRun | None = None) -> "PPOModels":
        from dschat_cli.config.sections import ModelOptions
        from dschat_cli.models.reward import build_reward_model, check_same_tokenizer

        if resolved is None:
            resolved = this_machine(cfg, dist)
        dtype = resolved.dtype
        roles = ("actor", "critic", "ref", "reward") if cfg.has_critic else \
            ("actor", "ref", "reward")
        configs = {role: resolved.ds_config(role) for role in roles}
        tokenizer = load_tokenizer(cfg.actor)
        reward_opts = ModelOptions(model=cfg.reward_model,
                                   trust_remote_code=cfg.critic.trust_remote_code) \
            if cfg.reward_model else frozen(cfg.critic)
        # both read the actor's token ids: the same vocabulary and eos, or they score garbage
        if cfg.has_critic:
            check_same_tokenizer(tokenizer, load_tokenizer(cfg.critic), flag="--critic-model",
                                 other_path=str(cfg.critic.model))
        if cfg.reward_model or not cfg.has_critic:
            check_same_tokenizer(tokenizer, load_tokenizer(reward_opts),
                                 flag="--reward-model" if cfg.reward_model else "--critic-model",
                                 other_path=str(reward_opts.model))

        actor_model = load_causal_lm(cfg.actor, tokenizer, dtype=dtype, ds_config=configs["actor"],
                                     device=dist.device)
        actor_model = apply_lora(actor_model, cfg.actor_lora, flag_prefix="actor-")
        t = cfg.train
        actor = _engine(actor_model, configs["actor"], _Optim(
            t.actor_weight_decay, cfg.actor_lora.lora_learning_rate, t.lr_scheduler_type,
            t.num_warmup_steps), actor_steps)

        ref_model = load_causal_lm(frozen(cfg.actor), tokenizer, dtype=dtype,
                                   ds_config=configs["ref"], device=dist.device)
        ref = _engine(ref_model, configs["ref"], None, 0)

        critic = None  # a critic-free estimator builds none: no weights, no optimizer states
        if cfg.has_critic:
            torch.manual_seed(cfg.seed)  # LoRA of the critic starts identical on every rank
            critic_model = build_reward_model(cfg.critic, tokenizer, dtype=dtype,
                                              ds_config=configs["critic"], device=dist.device,
                                              lora=cfg.critic_lora)
            critic = _engine(critic_model, configs["critic"], _Optim(
                t.critic_weight_decay, cfg.critic_lora.lora_learning_rate, t.lr_scheduler_type,
                t.num_warmup_steps), critic_steps)

        reward_model = build_reward_model(reward_opts, tokenizer, dtype=dtype,
                                          ds_config=configs["reward"], device=dist.device,
                                          flag="--reward-model")
        reward = _engine(reward_model, configs["reward"], None, 0)
        return cls(actor=actor, ref=ref, critic=critic, reward=reward, tokenizer=tokenizer,
                   dtype=dtype, ds_configs=configs)


@dataclass(frozen=True)
class _Optim:
    weight_decay: float
    lora_lr: float
    scheduler: str
    warmup: int


def _engine(model, config: dict, optim: _Optim | None, total_steps: int):
    """A DeepSpeed engine: frozen (no optimizer; partitioned under ZeRO-3, eval mode) when optim
    is None, else with AdamW parameter groups and the LR schedule over total_steps."""
    from transformers import get_scheduler

    from dschat_cli.models.loading import optimizer_groups
    from dschat_cli.steps.common import ds_initialize

    if optim is None:
        engine = ds_initialize(model=model, config=config)
        engine.eval()
        return engine
    groups = optimizer_groups(model, weight_decay=optim.weight_decay, lora_lr=optim.lora_lr)
    return ds_initialize(
        model=model, model_parameters=groups, config=config,
        lr_scheduler=lambda opt: get_scheduler(optim.scheduler, opt,
                                               num_warmup_steps=optim.warmup,
                                               num_training_steps=total_steps))


def this_machine(cfg, dist: Dist, step: str = "ppo") -> ResolvedRun:
    """The run record of `cfg` on this rank's machine, for the Python API (a launched run reads
    the one its launch wrote)."""
    from dschat_cli import hub
    from dschat_cli.config.resolved import resolve_run

    on_gpu = dist.device != "cpu"
    return resolve_run(step, cfg, world_size=dist.world_size, device="cuda" if on_gpu else "cpu",
                       bf16_supported=on_gpu and torch.cuda.is_bf16_supported(),
                       hub_reachable=hub.reachable())


def frozen(opts):
    """The frozen copy of a model's options: no gradient checkpointing (it only runs in eval
    mode, so its dropout setting never applies)."""
    return dataclasses.replace(opts, dropout=None, gradient_checkpointing=False)
