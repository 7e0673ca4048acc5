"""Pre-launch checks of each step (user side): everything that can fail before a worker starts —
folders and their kinds, tokenizers, LoRA targets, data — so a mistake costs a second and writes
nothing. The table of steps (config/steps.py) names each step's checks; launch/ runs them before
a step command launches, `dschat pipeline` for every step before the first starts.

    validate_sft(cfg)                    # the step's `validate`: reads files, models and data
    check_generation_tp(cfg, world_size)  # a `validate_world`: needs the run's world size
    check_trackers(("tensorboard", "wandb"))  # --report-to: packages installed, W&B logged in
"""

from __future__ import annotations

import os

from dschat_cli.config.bench import BenchConfig
from dschat_cli.config.ppo import PPOConfig
from dschat_cli.config.resolved import trackers
from dschat_cli.config.reward import RewardConfig
from dschat_cli.config.schema import ConfigError
from dschat_cli.config.sft import SFTConfig


def check_trackers(chosen: tuple[str, ...]) -> None:
    """The trackers of --report-to (and --enable-tensorboard) can start on rank 0: their packages
    are installed, and W&B has credentials or runs offline, so that it never stops a run midway,
    prompts for an API key, or waits for one."""
    if "tensorboard" in chosen:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard's writer needs it)
        except ImportError:
            raise ConfigError("--report-to tensorboard", "needs the tensorboard package: pip "
                              "install tensorboard (or pip install 'dschat[tensorboard]')") from None
    if "wandb" not in chosen:
        return
    try:
        import wandb
    except ImportError:
        raise ConfigError("--report-to wandb", "needs the wandb package: pip install "
                          "'dschat[wandb]'") from None
    if not _wandb_can_log(wandb):
        raise ConfigError("--report-to wandb", "no W&B login found: run `wandb login`, set "
                          "WANDB_API_KEY, or set WANDB_MODE=offline (the run is kept in "
                          "OUTPUT_DIR/wandb for a later `wandb sync`)")


def _wandb_can_log(wandb) -> bool:
    """W&B's mode (WANDB_MODE or `wandb offline`'s settings file) needs no login, or it finds an
    API key (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, a settings file, ~/.netrc from `wandb
    login`). Asked with wandb.login(prompt=False, verify=False): no prompt, no network. silent:
    no "logged in as" line (which would also ask the server for the user name); teardown: the
    rank's wandb.init (this process with --launcher none) starts from fresh settings."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    # an earlier wandb run in this process (--launcher none, a Python caller) leaves W&B's
    # settings singleton behind, with the mode and key of then: read today's environment instead
    wandb.teardown()
    wandb.setup(wandb.Settings(silent=True))
    try:
        if wandb.setup().settings.mode in ("offline", "dryrun", "disabled"):
            return True
        return bool(wandb.login(prompt=False, verify=False))
    finally:
        wandb.teardown()


def validate_sft(cfg: SFTConfig) -> None:
    from dschat_cli.data.prepare import load_phase_rows
    from dschat_cli.models.loading import (check_lora_targets, check_model_source,
                                           check_tokenizer_source)

    check_trackers(trackers("sft", cfg))
    check_model_source(cfg.model)
    check_tokenizer_source(cfg.model)
    check_lora_targets(cfg.model, cfg.lora)
    load_phase_rows(cfg.data, phase=1, seed=cfg.seed)


def validate_reward(cfg: RewardConfig) -> None:
    from dschat_cli.data.prepare import load_phase_rows
    from dschat_cli.models.loading import (check_lora_targets, check_model_source,
                                           check_tokenizer_source)

    check_trackers(trackers("reward", cfg))
    check_model_source(cfg.model)
    check_tokenizer_source(cfg.model)
    check_lora_targets(cfg.model, cfg.lora, backbone_only=True)
    train, _ = load_phase_rows(cfg.data, phase=2, seed=cfg.seed)
    if all(r is None or not str(r).strip() for r in train["rejected"]):
        raise ConfigError("--data-path", "the step-2 part of the data has no rejected answers (an "
                          "SFT-only source?); the reward model needs chosen/rejected pairs")


def validate_ppo(cfg: PPOConfig) -> None:
    from dschat_cli.config.sections import ModelOptions
    from dschat_cli.data.prepare import load_phase_rows
    from dschat_cli.models.loading import (check_lora_targets, check_model_source,
                                           check_tokenizer_source, load_tokenizer)
    from dschat_cli.models.reward import (check_reward_dir, check_same_tokenizer,
                                          is_random_architecture, is_reward_dir)

    check_trackers(trackers("ppo", cfg))
    check_model_source(cfg.actor, flag="--actor-model")
    if is_reward_dir(str(cfg.actor.model)):  # it would load as a causal LM and train, silently
        raise ConfigError("--actor-model", f"{cfg.actor.model} is a dschat reward model, not a "
                          "causal LM; give the step-1 (dschat sft) output folder")
    check_tokenizer_source(cfg.actor, flag="--actor-tokenizer")
    critics = [("--critic-model", cfg.critic)] if cfg.critic.model else []
    if cfg.reward_model and cfg.reward_model != cfg.critic.model:
        # the frozen reward model follows the critic's trust-remote-code
        critics.append(("--reward-model", ModelOptions(
            model=cfg.reward_model, trust_remote_code=cfg.critic.trust_remote_code)))
    actor_tok = load_tokenizer(cfg.actor)
    for flag, opts in critics:
        if is_random_architecture(opts):  # an untrained architecture (benchmarks)
            check_model_source(opts, flag=flag)
        else:
            check_reward_dir(str(opts.model), flag)
            check_model_source(opts, flag=flag)  # its own model code needs the trust flag
        if flag == "--critic-model":
            check_tokenizer_source(opts, flag="--critic-tokenizer")
        check_same_tokenizer(actor_tok, load_tokenizer(opts), flag=flag, other_path=str(opts.model))
    check_lora_targets(cfg.actor, cfg.actor_lora, flag_prefix="actor-")
    if cfg.has_critic:
        check_lora_targets(cfg.critic, cfg.critic_lora, backbone_only=True, flag_prefix="critic-")
    load_phase_rows(cfg.data.as_data_options(), phase=3, seed=cfg.seed)
    if cfg.data.unsupervised_dataset_name:
        from dschat_cli.data.prompts import check_unsupervised_source

        check_unsupervised_source(cfg.data.unsupervised_dataset_name,
                                  cfg.data.unsupervised_dataset_config_name)


def check_generation_tp(cfg: PPOConfig, world_size: int) -> None:
    """--generation-tensor-parallel N: N divides the ranks, and the actor's architecture (when
    it can be read here: a folder, a preset, a cached hub model) splits N ways."""
    tp = cfg.generation.generation_tensor_parallel
    if tp <= 1:
        return
    from dschat_cli.generation.tp_layouts import FLAG, check_supported

    if world_size % tp:
        raise ConfigError(FLAG, f"{tp} must divide the run's {world_size} rank(s) (one per GPU) "
                          "into equal groups")
    from dschat_cli.plan.arch import PlanUnavailable, model_config

    try:
        config = model_config(str(cfg.actor.model))
    except PlanUnavailable:
        return  # the worker checks it once the model is loaded
    try:
        check_supported(config, tp)
    except ValueError as e:
        raise ConfigError(FLAG, f"{e}; use {FLAG} 1") from None


def validate_bench(cfg: BenchConfig) -> None:
    """Random weights of real architectures: only the architectures must be at hand."""
    from dschat_cli.config.sections import ModelOptions
    from dschat_cli.models.loading import check_model_source

    check_model_source(ModelOptions(model=cfg.actor, random_init=True), flag="--actor")
    if cfg.step == "ppo":
        check_model_source(ModelOptions(model=cfg.critic, random_init=True), flag="--critic")


def check_output_file(path: str | None, flag: str, example: str = "results.json") -> None:
    """Before anything runs: a file written only at the end (`dschat eval --output-file`, `dschat
    bench --json`) can be written, so minutes of work do not end in a traceback. Missing folders
    are fine (the writer creates them); a folder in the file's place, a file in a folder's place
    or no write permission is not."""
    if not path:
        return
    from pathlib import Path

    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(flag, f"{path} is a folder; give a file name, e.g. {p / example}")
    parent = next((q for q in p.parents if q.exists()), Path("."))
    if not parent.is_dir():
        raise ConfigError(flag, f"{parent} is a file, so {path} cannot be created; give another "
                          "path")
    target = p if p.exists() else parent
    if not os.access(target, os.W_OK):
        raise ConfigError(flag, f"{target} is not writable; give another path")


def check_bench_generation_tp(cfg: BenchConfig, world_size: int) -> None:
    """`dschat bench --generation-tensor-parallel N`: as `dschat ppo`'s."""
    if cfg.step == "ppo":
        from dschat_cli.config.bench import bench_ppo_config

        check_generation_tp(bench_ppo_config(cfg), world_size)


def validate_dpo(cfg) -> None:
    """`dschat dpo`: a causal LM (not a reward folder) with its tokenizer, LoRA targets, and
    chosen/rejected pairs in the step-2 part of the data."""
    from dschat_cli.data.prepare import load_phase_rows
    from dschat_cli.models.loading import (check_lora_targets, check_model_source,
                                           check_tokenizer_source)
    from dschat_cli.models.reward import is_reward_dir

    check_trackers(trackers("dpo", cfg))
    check_model_source(cfg.model)
    if is_reward_dir(str(cfg.model.model)):  # it would load as a causal LM and train, silently
        raise ConfigError("--model", f"{cfg.model.model} is a dschat reward model, not a causal "
                          "LM; give a causal LM (e.g. the `dschat sft` output folder)")
    check_tokenizer_source(cfg.model)
    check_lora_targets(cfg.model, cfg.lora)
    train, _ = load_phase_rows(cfg.data, phase=2, seed=cfg.seed)
    rejected = train["rejected"] if "rejected" in train.column_names else [None] * len(train)
    if all(r is None or not str(r).strip() for r in rejected):
        raise ConfigError("--data-path", "the step-2 part of the data has no rejected answers (an "
                          "SFT-only source?); DPO needs chosen/rejected pairs (--data-split gives "
                          "DPO its second part, as DeepSpeed-Chat)")
