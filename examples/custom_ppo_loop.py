"""A custom RLHF loop on dschat's PPO engine and trainer.

    python examples/custom_ppo_loop.py ACTOR_DIR REWARD_DIR DATA_DIR [STEPS]

ACTOR_DIR is a step-1 output (`dschat sft`), REWARD_DIR a step-2 output (`dschat reward`), DATA_DIR a
local/jsonfile folder (train.json/eval.json). Runs as one process (world size 1, CPU or one GPU);
launch it with `deepspeed --num_gpus N examples/custom_ppo_loop.py ...` for several GPUs. Here the
loop adds its own twist: it skips the update when a rollout's mean reward is already high.
"""

import sys
from functools import partial

from torch.utils.data import DataLoader

from dschat_cli.config.ppo import PPOConfig
from dschat_cli.config.schema import from_flags
from dschat_cli.data.prompts import collate_prompts, prompt_datasets
from dschat_cli.dist import Dist
from dschat_cli.steps.ppo import PPOModels, PPOTrainer


def main(actor_dir: str, reward_dir: str, data_dir: str, steps: int = 4) -> None:
    cfg = from_flags(PPOConfig, actor_model=actor_dir, critic_model=reward_dir,
                     data_path=["local/jsonfile"], data_dir=data_dir, data_split="0,0,10",
                     output_dir="custom-ppo-out", max_answer_seq_len=16,
                     per_device_generation_batch_size=4, per_device_training_batch_size=4,
                     num_warmup_steps=0, actor_learning_rate=1e-4, critic_learning_rate=1e-4)
    dist = Dist.init()
    models = PPOModels.build(cfg, dist, actor_steps=steps, critic_steps=steps)
    trainer = PPOTrainer(models, cfg, dist)

    prompts, _ = prompt_datasets(cfg.data.as_data_options(), models.tokenizer,
                                 max_prompt_seq_len=cfg.data.max_prompt_seq_len, seed=cfg.seed)
    loader = DataLoader(prompts, batch_size=cfg.train.per_device_generation_batch_size,
                        collate_fn=partial(collate_prompts,
                                           pad_token_id=models.tokenizer.pad_token_id))
    for step, batch in zip(range(1, steps + 1), loader):
        rollout = trainer.generate_experience(batch)  # 1. generate + 2. score
        if rollout.scores.mean() > 4.0:  # the custom part
            print(f"step {step}: reward {rollout.scores.mean():.3f}, high enough, no update")
            continue
        stats = trainer.train([rollout])  # 3. advantages + 4. PPO update
        print(f"step {step}: reward {stats.reward:.3f} kl {stats.kl:.4f} "
              f"actor loss {stats.actor_loss:.4f} critic loss {stats.critic_loss:.4f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], *(int(a) for a in sys.argv[4:5]))
