"""Step 3's batch and step counts (dschat_cli/config/schedule.py), worked by hand: a rollout holds
prompts x --samples-per-prompt answers, and the mini-batches, updates and optimizer steps follow
from those rows."""

from __future__ import annotations

from dschat_cli.config.ppo import PPOTrainOptions
from dschat_cli.config.schedule import ppo_schedule


def train(**kw) -> PPOTrainOptions:
    base = dict(per_device_generation_batch_size=4, per_device_training_batch_size=8,
                generation_batches=2, ppo_epochs=2, num_train_epochs=1,
                gradient_accumulation_steps=3)
    return PPOTrainOptions(**{**base, **kw})


def test_samples_per_prompt_multiplies_the_rows_of_a_rollout():
    s = ppo_schedule(5, train(samples_per_prompt=4), unsupervised=False)
    # 5 prompt batches, 1 epoch: 5 PPO steps (rollouts); each holds 4 prompts x 4 answers = 16 rows
    assert (s.ppo_steps, s.rows_per_rollout) == (5, 16)
    # pools of 2 rollouts: divmod(5, 2) = 2 full pools of 32 rows and a last pool of 16 rows;
    # mini-batches of 8 rows: ceil(32 / 8) = 4 per full pool, ceil(16 / 8) = 2 in the last
    assert s.mini_batches == 4
    # (2 x 4 + 2) mini-batches x 2 PPO epochs = 20 updates; / 3 accumulation = 6 optimizer steps
    assert (s.updates, s.optimizer_steps, s.actor_steps) == (20, 6, 6)
    # the unsupervised LM loss steps the actor a second time after each PPO step
    assert ppo_schedule(5, train(samples_per_prompt=4), unsupervised=True).actor_steps == 12


def test_one_answer_per_prompt_is_the_old_schedule():
    s = ppo_schedule(5, train(), unsupervised=False)
    # 4 rows per rollout: full pools of 8 rows are ceil(8 / 8) = 1 mini-batch, the last pool of 4
    # rows ceil(4 / 8) = 1; (2 x 1 + 1) x 2 epochs = 6 updates; 6 // 3 = 2 optimizer steps
    assert (s.rows_per_rollout, s.mini_batches, s.updates, s.optimizer_steps) == (4, 1, 6, 2)


def test_rows_that_do_not_divide_end_in_a_shorter_mini_batch_and_test_stop_step_caps():
    # 2 prompts x 3 answers = 6 rows, one rollout per pool, mini-batches of 4: ceil(6 / 4) = 2
    s = ppo_schedule(10, train(per_device_generation_batch_size=2, samples_per_prompt=3,
                               per_device_training_batch_size=4, generation_batches=1,
                               ppo_epochs=1, gradient_accumulation_steps=1, test_stop_step=3),
                     unsupervised=False)
    # --test-stop-step 3: 3 PPO steps x 2 mini-batches = 6 updates and optimizer steps
    assert (s.ppo_steps, s.rows_per_rollout, s.mini_batches, s.updates, s.optimizer_steps) == \
        (3, 6, 2, 6, 6)
