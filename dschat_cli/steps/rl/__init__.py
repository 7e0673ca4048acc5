"""The parts step 3 is built from (steps/ppo.py is the loop that composes them; steps/bench/
times them):

    engines.py     PPOModels: actor, ref, critic and reward as DeepSpeed engines, plus the tokenizer
    experience.py  ExperienceMaker: # 1. generate (generation/rollout.py) and # 2. score -> Rollout
    learner.py     Learner: # 4. update, actor and critic over pooled experience in mini-batches
    ema.py         ActorEMA: the exponential moving average of the actor (--enable-ema)
    state.py       RunState: everything a checkpoint must hold to continue the loop
    observers.py   what watches the loop: metrics log, health monitor, progress, checkpoints
    trainer.py     PPOTrainer: the Python API for custom loops (examples/custom_ppo_loop.py)

# 3. advantages is a pure function of the pooled experience: rlhf/advantages.py.
"""
