"""What `dschat bench` chooses for unset settings (plan/choose.py): ZeRO 1 on one GPU in bf16
(fp32 gradient accumulation) and 0 at a batch only ZeRO-0 fits or in another precision, 2 on
several; --batch-size 64, then the largest batch the memory plan says fits; a flag given wins."""

from __future__ import annotations

import dataclasses

import pytest

from dschat_cli.config.bench import BenchConfig
from dschat_cli.plan.choose import choose_bench, fitting_batches
from dschat_cli.plan.memory import GiB, overhead_bytes
from dschat_cli.plan.planner import detect_target, verdict

H200 = detect_target(139.8)  # GiB, as `dschat plan --gpu-memory` takes it


def test_fitting_batches_walks_up_until_the_first_that_does_not_fit():
    # peak = batch GiB; overhead 0.6 GiB + 7% of the peak on one GPU. On 100 GiB:
    # 80: 80 x 1.15 + 0.6 + 5.6 = 98.2 <= 100 fits;  88: 88 + 0.6 + 6.16 = 94.8 <= 100 tight;
    # 96: 96 + 0.6 + 6.72 = 103.3 > 100 does not fit
    peak = lambda b: b * GiB  # noqa: E731
    assert fitting_batches(peak, 100 * GiB, 1, start=64, step=8, limit=1024) == [88, 80, 72]
    # none above the start fits
    assert fitting_batches(peak, 70 * GiB, 1, start=64, step=8, limit=1024) == []
    # the limit stops the walk
    assert fitting_batches(peak, 100 * GiB, 1, start=64, step=8, limit=72) == [72]
    # on several GPUs only with the margin (an out-of-memory rank ends the run): 88 is tight;
    # 80: 80 x 1.15 + 0.6 + 0.5 (NCCL) + 5.6 = 98.7 fits
    assert fitting_batches(peak, 100 * GiB, 2, start=64, step=8, limit=1024) == [80, 72]


def _peak(cfg: BenchConfig, batch: int) -> float:
    from dschat_cli.config.bench import bench_step_config
    from dschat_cli.config.resolved import resolve_run
    from dschat_cli.plan.planner import estimate_step

    step, run_cfg = bench_step_config(dataclasses.replace(cfg, batch_size=batch, output_dir="x"))
    record = resolve_run(step, run_cfg, world_size=1, device="cuda", bf16_supported=True,
                         hub_reachable=False)
    return estimate_step(run_cfg, record).peak


def _fits(peak: float, target=H200) -> bool:
    return verdict(peak, overhead_bytes(peak, 1), target.gpu_bytes) != "does not fit"


def test_one_h200_defaults_zero_1_and_searches_a_larger_batch_in_mini_batches():
    c = choose_bench(BenchConfig(), world_size=1, target=H200)
    assert (c.cfg.actor_zero_stage, c.cfg.critic_zero_stage, c.cfg.batch_size) == (1, 1, 64)
    assert c.cfg.micro_batch_size is None  # the first batch: one mini-batch, as the reference
    assert c.lines[0].startswith("--actor-zero-stage and --critic-zero-stage 1: one GPU in bf16")
    assert "fp32" in c.lines[0]
    assert c.larger, c.lines
    best = c.larger[0]
    # the larger batches train in mini-batches of half the first batch, one optimizer step per
    # batch, at ZeRO-1 (the fp32 buffer sums the mini-batches' gradients): whole multiples of 32
    assert c.micro == 32 and best > 64 and best % 32 == 0
    assert c.larger == [best, best - 32, best - 64]
    big = c.config_for(best)
    assert big == dataclasses.replace(c.cfg, batch_size=best, micro_batch_size=32)
    assert (big.actor_zero_stage, big.critic_zero_stage, big.micro) == (1, 1, 32)
    assert _fits(_peak(big, best)) and not _fits(_peak(big, best + 32))
    # it is the KV cache of the generation batch that bounds it: one mini-batch of the same
    # batch would need far more than the GPU
    assert not _fits(_peak(dataclasses.replace(big, micro_batch_size=None), best))
    assert c.attempts == [(b, {"actor_zero_stage": 1, "critic_zero_stage": 1})
                          for b in c.larger]
    assert (f"then {best} (trained in mini-batches of 32, one optimizer step per batch): the "
            "largest batch that fits one GPU (--gpu-memory 139.8)") in c.lines[1]


def test_an_80gb_gpu_runs_56_at_zero_0_then_a_larger_batch_at_zero_1_in_mini_batches():
    c = choose_bench(BenchConfig(), world_size=1, target=detect_target(79.2))
    # 56 fits only without ZeRO-1's fp32 buffer; in mini-batches of 28 the buffer fits again
    assert (c.cfg.batch_size, c.cfg.actor_zero_stage, c.micro) == (56, 0, 28)
    assert c.larger and all(b % 28 == 0 and b > 56 for b in c.larger)
    for b in c.larger:
        assert c.config_for(b) == dataclasses.replace(c.cfg, batch_size=b, micro_batch_size=28,
                                                      actor_zero_stage=1, critic_zero_stage=1)
    assert "then " in c.lines[2] and "mini-batches of 28" in c.lines[2]
    # a mini-batch given is the one the larger batches use
    c = choose_bench(BenchConfig(micro_batch_size=8), world_size=1, target=detect_target(79.2))
    assert c.micro == 8 and c.config_for(c.larger[0]).micro_batch_size == 8


def test_one_gpu_without_bf16_or_with_fp32_accumulation_off_stays_at_zero_0():
    for cfg in (BenchConfig(dtype="fp32"), BenchConfig(fp32_grad_accum="off")):
        c = choose_bench(cfg, world_size=1, target=H200)
        assert (c.cfg.actor_zero_stage, c.cfg.critic_zero_stage) == (0, 0), c.lines
        assert c.lines[0].startswith("--actor-zero-stage and --critic-zero-stage 0: one GPU")
        assert c.zero_at == {}
    # a CPU rank trains in fp32 (auto): 0, and the line says why ZeRO-1 would not help
    c = choose_bench(BenchConfig(), world_size=1, target=detect_target(None, []), on_gpu=False)
    assert c.cfg.actor_zero_stage == 0 and "needs bf16" in c.lines[0]


def test_a_base_batch_that_fits_only_at_zero_0_runs_there():
    # on 80 GB the plan's largest batch fits only without the fp32 gradient buffer
    gpu = detect_target(80.0)
    c = choose_bench(BenchConfig(), world_size=1, target=gpu)
    assert (c.cfg.actor_zero_stage, c.cfg.critic_zero_stage) == (0, 0), c.lines
    b = c.cfg.batch_size
    assert _fits(_peak(c.cfg, b), gpu)
    assert not _fits(_peak(dataclasses.replace(c.cfg, actor_zero_stage=1, critic_zero_stage=1),
                           b), gpu)
    assert "at ZeRO-0 (with ZeRO-1's fp32 gradient buffer it does not fit)" in c.lines[1]


def test_several_gpus_default_zero_2():
    c = choose_bench(BenchConfig(), world_size=8, target=H200)
    assert (c.cfg.actor_zero_stage, c.cfg.critic_zero_stage) == (2, 2)
    assert "8 GPUs: ZeRO-2" in c.lines[0]


def test_a_flag_given_wins():
    c = choose_bench(BenchConfig(actor_zero_stage=3, batch_size=32), world_size=1, target=H200)
    # the critic's stage was unset: chosen and said; the actor's and the batch kept, no search
    assert (c.cfg.actor_zero_stage, c.cfg.critic_zero_stage, c.cfg.batch_size) == (3, 1, 32)
    assert c.larger == [] and c.lines == [c.lines[0]] and c.lines[0].startswith(
        "--critic-zero-stage 1")
    c = choose_bench(BenchConfig(actor_zero_stage=2, critic_zero_stage=2, batch_size=48),
                     world_size=1, target=H200)
    assert c.lines == [] and c.larger == [] and c.cfg.batch_size == 48


def test_no_gpu_memory_known_means_no_search_and_says_so():
    c = choose_bench(BenchConfig(), world_size=1, target=detect_target(None, []))
    assert c.cfg.batch_size == 64 and c.larger == []
    assert "was not searched: no GPU here and no --gpu-memory" in c.lines[-1]


@pytest.mark.parametrize("step", ["sft", "dpo"])
def test_sft_and_dpo_search_their_own_batch(step):
    c = choose_bench(BenchConfig(step=step), world_size=1, target=H200)
    assert c.cfg.actor_zero_stage == 1 and c.lines[0].startswith("--actor-zero-stage 1")
    if step == "sft":  # 64 sequences of 512 tokens fit, and a larger batch
        assert c.cfg.batch_size == 64 and c.larger[0] > 64
    else:  # dpo: 64 pairs are 128 sequences of 512 tokens: they fit (bf16 logits and their
        # gradient, no fp32 copy: rlhf/logprobs.py), 96 pairs do not
        assert c.cfg.batch_size == 64 and c.larger == []
        assert "no larger batch fits one GPU" in c.lines[-1]


def test_a_smaller_gpu_gets_the_largest_batch_below_64():
    c = choose_bench(BenchConfig(), world_size=1, target=detect_target(80.0))
    # walked down in steps of 64 / 8 = 8 to the first that fits
    assert c.cfg.batch_size < 64 and c.cfg.batch_size % 8 == 0
    assert c.lines[1].startswith(f"--batch-size {c.cfg.batch_size}: the largest that fits one "
                                 "GPU (--gpu-memory 80)")
    assert "64, the reference's largest: " in c.lines[1] and "does not fit" in c.lines[1]
    # step 3 then searches larger batches in mini-batches of half of it; sft does not
    assert c.larger and c.micro == c.cfg.batch_size // 2
    c = choose_bench(BenchConfig(step="sft"), world_size=1, target=detect_target(80.0))
    assert c.cfg.batch_size < 64 and c.larger == [] and c.micro is None
    # nothing fits at all: the base batch, measured anyway, and said
    c = choose_bench(BenchConfig(), world_size=1, target=detect_target(20.0))
    assert c.cfg.batch_size == 64 and "measuring it anyway" in c.lines[-1]


def test_group_estimators_step_in_whole_prompts():
    c = choose_bench(BenchConfig(advantage_estimator="grpo", samples_per_prompt=6,
                                 batch_size=None), world_size=1, target=detect_target(400.0))
    # --batch-size 64 is not a multiple of 6: the check refuses it before any choice matters
    with pytest.raises(Exception):
        c.cfg.check()
    c = choose_bench(BenchConfig(advantage_estimator="grpo"), world_size=1,
                     target=detect_target(400.0))
    assert c.larger and all(b % 8 == 0 for b in c.larger)


def _ppo(**flags):
    from dschat_cli.config.ppo import PPOConfig
    from dschat_cli.config.resolved import resolve_run
    from dschat_cli.config.schema import from_flags

    cfg = from_flags(PPOConfig, **{"actor_model": "opt-1.3b", "critic_model": "opt-350m",
                                   "output_dir": "/tmp/x", **flags})
    return cfg, resolve_run("ppo", cfg, world_size=1, device="cuda", bf16_supported=True,
                            hub_reachable=False)


def test_ppo_hints_a_larger_generation_batch_and_never_applies_it():
    import io

    from rich.console import Console

    from dschat_cli.plan.choose import larger_generation_batch
    from dschat_cli.plan.planner import estimate_step
    from dschat_cli.plan.report import launch_estimate

    cfg, record = _ppo()
    g, peak = larger_generation_batch(cfg, record, H200)
    # a multiple of 16, up to 8x; it fits with the margin, the next multiple (if any) does not
    assert g % 16 == 0 and 16 < g <= 128
    assert verdict(peak, overhead_bytes(peak, 1), H200.gpu_bytes) == "fits"
    if g < 128:
        nxt, rec = _ppo(per_device_generation_batch_size=g + 16)
        p = estimate_step(nxt, rec).peak
        assert verdict(p, overhead_bytes(p, 1), H200.gpu_bytes) != "fits"
    # the generation batches that do not split into whole mini-batches are skipped:
    # 8 answers x 3 = 24 rows per rollout do not split into mini-batches of 16
    cfg8, rec8 = _ppo(per_device_generation_batch_size=8)
    g8, _ = larger_generation_batch(cfg8, rec8, H200)
    assert g8 % 16 == 0
    # a small GPU: nothing larger fits
    assert larger_generation_batch(cfg, record, detect_target(24.0)) is None
    out = io.StringIO()
    launch_estimate(cfg, record, H200, console=Console(file=out, width=400))
    text = out.getvalue()
    assert f"hint: --per-device-generation-batch-size {g} also fits" in text
    assert f"{g // 16}x fewer PPO steps per epoch with the same optimizer steps" in text
    assert cfg.train.per_device_generation_batch_size == 16  # a hint only


def test_the_launch_estimate_lists_zero_1s_fp32_gradient_buffer():
    import io

    from rich.console import Console

    from dschat_cli.plan.report import launch_estimate

    cfg, record = _ppo(actor_zero_stage=1, critic_zero_stage=1)
    out = io.StringIO()
    launch_estimate(cfg, record, H200, console=Console(file=out, width=400))
    lines = out.getvalue().splitlines()
    actor = next(ln for ln in lines if ln.strip().startswith("actor opt-1.3b"))
    # 1.32e9 trained parameters x 4 B = 4.9 GiB, named beside the bf16 gradients
    assert "ZeRO-1, fp32 grads" in actor and "fp32 grads 4.9" in actor, actor
    cfg0, record0 = _ppo()
    out0 = io.StringIO()
    launch_estimate(cfg0, record0, H200, console=Console(file=out0, width=400))
    assert "fp32 grads" not in out0.getvalue()


def _estimate_text(cfg, record, target=H200) -> str:
    import io

    from rich.console import Console

    from dschat_cli.plan.report import launch_estimate

    out = io.StringIO()
    launch_estimate(cfg, record, target, console=Console(file=out, width=400))
    return " ".join(out.getvalue().split())


def test_one_gpu_launches_at_zero_0_hint_zero_1_where_its_fp32_buffer_fits():
    from dschat_cli.plan.choose import zero1_hint

    cfg, record = _ppo()
    flags, peak = zero1_hint(cfg, record, H200)
    assert flags == ["--actor-zero-stage 1", "--critic-zero-stage 1"]
    moved, rec1 = _ppo(actor_zero_stage=1, critic_zero_stage=1)
    from dschat_cli.plan.planner import estimate_step

    assert peak == estimate_step(moved, rec1).peak
    assert "hint: --actor-zero-stage 1 --critic-zero-stage 1 also fits" in _estimate_text(cfg,
                                                                                         record)
    assert cfg.deepspeed.actor_zero_stage == 0  # a hint only
    # only the model still at 0; none when both are at 1 or fp32 accumulation is off
    assert zero1_hint(*_ppo(actor_zero_stage=1), H200)[0] == ["--critic-zero-stage 1"]
    assert zero1_hint(moved, rec1, H200) is None
    assert zero1_hint(*_ppo(fp32_grad_accum="off"), H200) is None
    # a critic-free run trains no critic
    assert zero1_hint(*_ppo(advantage_estimator="grpo", samples_per_prompt=8),
                      H200)[0] == ["--actor-zero-stage 1"]
    # not where the buffer does not fit with the plan's margin: on 52 GiB the run fits at ZeRO-0
    # (peak 38.9 GiB) but not with ZeRO-1's 6.1 GiB fp32 buffers (43.8 GiB)
    small = detect_target(52.0)
    p0 = estimate_step(cfg, record).peak
    assert verdict(p0, overhead_bytes(p0, 1), small.gpu_bytes) == "fits"
    assert verdict(peak, overhead_bytes(peak, 1), small.gpu_bytes) != "fits"
    assert zero1_hint(cfg, record, small) is None
    assert "hint: --actor-zero-stage" not in _estimate_text(cfg, record, small)


def test_sft_hints_zero_1_and_fp32_runs_get_no_hint():
    from dschat_cli.config.resolved import resolve_run
    from dschat_cli.config.schema import from_flags
    from dschat_cli.config.sft import SFTConfig
    from dschat_cli.plan.choose import zero1_hint

    def sft(**flags):
        cfg = from_flags(SFTConfig, **{"model": "opt-1.3b", "output_dir": "/tmp/x", **flags})
        return cfg, resolve_run("sft", cfg, world_size=1, device="cuda", bf16_supported=True,
                                hub_reachable=False)

    assert zero1_hint(*sft(), H200)[0] == ["--zero-stage 1"]
    assert "hint: --zero-stage 1 also fits" in _estimate_text(*sft())
    assert zero1_hint(*sft(dtype="fp16"), H200) is None
    assert "hint: --zero-stage" not in _estimate_text(*sft(zero_stage=2))


def test_larger_mini_batched_batches_fall_back_to_zero_0_only_when_none_fits_at_zero_1():
    """--micro-batch-size 64: the larger batches train in mini-batches as large as the first
    batch. On a GPU where no larger batch fits at ZeRO-1 but one does at ZeRO-0, they run there,
    each tried at ZeRO-1 first when its ZeRO-1 estimate is below the GPU's memory."""
    found = None
    for quarter in range(320, 400):  # 80 to 100 GiB
        c = choose_bench(BenchConfig(micro_batch_size=64), world_size=1,
                         target=detect_target(quarter / 4))
        if c.larger and c.config_for(c.larger[0]).actor_zero_stage == 0:
            found = c
            break
    assert found is not None
    c = found
    assert c.cfg.actor_zero_stage == 1 and c.micro == 64
    zero0 = {"actor_zero_stage": 0, "critic_zero_stage": 0}
    assert all(c.config_for(b) == dataclasses.replace(c.cfg, batch_size=b, micro_batch_size=64,
                                                      **zero0) for b in c.larger)
    assert c.attempts[-1] == (c.larger[-1], zero0)
    assert "at ZeRO-0: with ZeRO-1's fp32 gradient buffer none fits" in c.lines[-1]


def test_a_given_mini_batch_keeps_every_batch_a_whole_number_of_mini_batches():
    for gib in (30.0, 45.0, 60.0, 80.0, 139.8):
        for micro in (16, 32, 64):
            c = choose_bench(BenchConfig(micro_batch_size=micro), world_size=1,
                             target=detect_target(gib))
            for b in [c.cfg.batch_size, *c.larger]:
                assert b % micro == 0, (gib, micro, b)
                c.config_for(b).check()
