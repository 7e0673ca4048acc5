"""DPO math (rlhf/dpo.py) on hand-computed tensors (shared/reference/rl-methods.md section 7,
items 7 and 8), and the DPO run config and its DeepSpeed configs (config/dpo.py)."""

from __future__ import annotations

import math

import pytest
import torch

from dschat_cli.rlhf.dpo import (answer_masks, divergence_index, dpo_loss, pair_accuracy,
                                 summed_logprobs)

# beta 0.1; summed logprobs pi_c = -10, pi_r = -12 under the policy, ref_c = ref_r = -11:
# h = (pi_c - ref_c) - (pi_r - ref_r) = (-10 + 11) - (-12 + 11) = 1 + 1 = 2, z = beta h = 0.2
PI_C, PI_R, REF_C, REF_R = (torch.tensor([v], dtype=torch.float64) for v in (-10, -12, -11, -11))


def test_sigmoid_loss_rewards_and_accuracy():
    out = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1)
    # -logsigmoid(0.2) = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388694
    assert out.loss.item() == pytest.approx(0.5981388694, abs=1e-7)
    # chosen reward beta (pi_c - ref_c) = 0.1 * 1 = +0.1; rejected 0.1 * (-1) = -0.1
    assert out.chosen_rewards.item() == pytest.approx(0.1, abs=1e-7)
    assert out.rejected_rewards.item() == pytest.approx(-0.1, abs=1e-7)
    assert pair_accuracy(out.chosen_rewards, out.rejected_rewards).item() == 1.0


def test_label_smoothing_is_conservative_dpo():
    out = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, label_smoothing=0.1)
    # 0.9 * -logsigmoid(0.2) + 0.1 * -logsigmoid(-0.2)
    # = 0.9 * 0.5981388694 + 0.1 * 0.7981388694 = 0.5383249825 + 0.0798138869 = 0.6181388694
    assert out.loss.item() == pytest.approx(0.6181388694, abs=1e-7)


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    out = dpo_loss(PI_C, PI_R, PI_C, PI_R, beta=0.1)
    # h = 0: -logsigmoid(0) = ln 2 = 0.6931471806 (DeepSpeed-Chat's log: 0.693359375 in fp16)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-10)
    assert out.chosen_rewards.item() == 0.0 and out.rejected_rewards.item() == 0.0
    # a tie counts one half: an untrained policy scores chance, not 0
    assert pair_accuracy(out.chosen_rewards, out.rejected_rewards).item() == 0.5


def test_ipo_on_summed_logprobs():
    out = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type="ipo")
    # (h - 1/(2 beta))^2 = (2 - 5)^2 = 9.0 (OpenRLHF's IPO on the same inputs)
    assert out.loss.item() == pytest.approx(9.0, abs=1e-10)


def test_loss_is_a_mean_over_pairs_and_gradients_push_chosen_up():
    pc = torch.tensor([-10.0, -5.0], requires_grad=True)
    pr = torch.tensor([-12.0, -5.0], requires_grad=True)
    ref = torch.tensor([-11.0, -5.0])
    out = dpo_loss(pc, pr, ref, torch.tensor([-11.0, -5.0]), beta=0.1)
    # pairs: 0.5981388694 (h = 2) and ln 2 (h = 0)
    assert out.losses.tolist() == pytest.approx([0.5981388694, math.log(2)], abs=1e-6)
    assert out.loss.item() == pytest.approx((0.5981388694 + math.log(2)) / 2, abs=1e-6)
    out.loss.backward()
    # d/d pi_c of -logsigmoid(beta h) / B = -beta sigmoid(-beta h) / B:
    # pair 0: -0.1 * sigmoid(-0.2) / 2 = -0.1 * 0.4501660027 / 2 = -0.0225083
    # pair 1: -0.1 * 0.5 / 2 = -0.025; pi_r gets the opposite
    assert pc.grad.tolist() == pytest.approx([-0.0225083, -0.025], abs=1e-6)
    assert pr.grad.tolist() == pytest.approx([0.0225083, 0.025], abs=1e-6)
    assert not out.chosen_rewards.requires_grad


def test_bad_beta_and_loss_type_are_refused():
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.0)
    with pytest.raises(ValueError, match="hinge"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type="hinge")


# --- which tokens count ----------------------------------------------------------------------

def test_mask_starts_where_the_pair_diverges_and_stops_at_padding():
    # pad 0: chosen [5,6,7,8,0], rejected [5,6,9,0,0]; they first differ at position 2
    chosen, rejected = torch.tensor([[5, 6, 7, 8, 0]]), torch.tensor([[5, 6, 9, 0, 0]])
    cm, rm = torch.tensor([[1, 1, 1, 1, 0]]), torch.tensor([[1, 1, 1, 0, 0]])
    assert divergence_index(chosen, rejected, cm, rm).tolist() == [2]
    mc, mr = answer_masks(chosen, rejected, cm, rm)
    assert mc.int().tolist() == [[0, 0, 1, 1, 0]]
    assert mr.int().tolist() == [[0, 0, 1, 0, 0]]


def test_summed_logprobs_count_exactly_the_masked_targets():
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0]])  # [chosen; rejected] as collated
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    logits = torch.randn(2, 5, 12)
    lp = torch.log_softmax(logits, -1)
    mc, mr = answer_masks(ids[:1], ids[1:], mask[:1], mask[1:])
    sums, counts = summed_logprobs(logits, ids, torch.cat([mc, mr]))
    # token t is predicted by the logits at t - 1: chosen counts targets 7 (t=2) and 8 (t=3),
    # rejected only 9 (t=2)
    assert sums[0].item() == pytest.approx((lp[0, 1, 7] + lp[0, 2, 8]).item(), abs=1e-6)
    assert sums[1].item() == pytest.approx(lp[1, 1, 9].item(), abs=1e-6)
    assert counts.tolist() == [2, 1]


def test_an_eos_equal_to_pad_still_counts():
    # eos = pad = 0 (OPT's bos = eos = pad): both answers end in a real eos at position 3.
    # DeepSpeed-Chat's `input_ids != pad` dropped it; the attention mask keeps it.
    chosen, rejected = torch.tensor([[5, 6, 7, 0, 0]]), torch.tensor([[5, 6, 9, 0, 0]])
    cm = rm = torch.tensor([[1, 1, 1, 1, 0]])
    mc, mr = answer_masks(chosen, rejected, cm, rm)
    assert mc.int().tolist() == [[0, 0, 1, 1, 0]] and mr.int().tolist() == [[0, 0, 1, 1, 0]]


def test_a_row_that_ends_first_diverges_at_its_end():
    # rejected is chosen cut short (truncation): same ids as far as it goes, then padding
    chosen, rejected = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 6, 7, 0]])
    cm, rm = torch.tensor([[1, 1, 1, 1]]), torch.tensor([[1, 1, 1, 0]])
    assert divergence_index(chosen, rejected, cm, rm).tolist() == [3]
    mc, mr = answer_masks(chosen, rejected, cm, rm)
    assert mc.int().tolist() == [[0, 0, 0, 1]] and mr.int().tolist() == [[0, 0, 0, 0]]


def test_identical_rows_give_z_zero_exactly():
    torch.manual_seed(1)
    row = torch.tensor([[5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert divergence_index(row, row, mask, mask).tolist() == [0]  # nothing cut
    mc, mr = answer_masks(row, row, mask, mask)
    assert mc.int().tolist() == [[1, 1, 1, 0]] == mr.int().tolist()
    logits = torch.randn(1, 4, 10).expand(2, 4, 10)  # a causal LM on equal rows
    policy, _ = summed_logprobs(logits, row.expand(2, 4), torch.cat([mc, mr]))
    ref, _ = summed_logprobs(logits * 0.5, row.expand(2, 4), torch.cat([mc, mr]))
    out = dpo_loss(policy[:1], policy[1:], ref[:1], ref[1:], beta=0.1)
    assert (out.chosen_rewards - out.rejected_rewards).item() == 0.0
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_masks_are_per_pair_in_a_batch():
    chosen = torch.tensor([[1, 2, 3, 4], [7, 8, 9, 9]])
    rejected = torch.tensor([[1, 2, 5, 0], [6, 8, 9, 9]])
    cm = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]])
    rm = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert divergence_index(chosen, rejected, cm, rm).tolist() == [2, 0]
    mc, mr = answer_masks(chosen, rejected, cm, rm)
    assert mc.int().tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert mr.int().tolist() == [[0, 0, 1, 0], [1, 1, 1, 1]]


# --- the run config and its DeepSpeed configs (no torch needed) ---------------------------------

def _cfg(**sections):
    import dataclasses

    from dschat_cli.config.dpo import DPOConfig

    cfg = DPOConfig()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, model="m"),
                              output_dir="out")
    for name, values in sections.items():
        cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name),
                                                                    **values)})
    return cfg


def _ds(cfg):
    from dschat_cli.config.dpo import dpo_ds_configs

    return dpo_ds_configs(cfg, world_size=2, dtype="bf16", torch_adam=True, tensorboard_dir=None)


def test_defaults_are_deepspeed_chats_opt_dpo_script():
    cfg = _cfg()
    cfg.check()
    assert (cfg.optim.learning_rate, cfg.optim.weight_decay, cfg.optim.num_train_epochs) == \
        (5e-5, 0.1, 1)
    assert (cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.dpo.loss_type) == (0.1, 0.0, "sigmoid")
    assert cfg.model.dropout == 0.0 and cfg.data.data_split == "2,4,4"
    from dschat_cli.config.steps import step

    # the step-2 part of the data; `dschat pipeline --method dpo` runs it as step 2 (the
    # reference's step2_dpo_finetuning), and --method rlhf does not run it
    assert step("dpo").data_phase == 2 and step("dpo").number == 2
    assert step("dpo").methods == ("dpo",)


def test_reference_configs_by_stage_offload_and_lora():
    ds = _ds(_cfg())
    assert set(ds) == {"model", "ref"}
    assert ds["model"]["optimizer"]["params"]["lr"] == 5e-5
    assert ds["ref"]["zero_optimization"] == {"stage": 0} and "optimizer" not in ds["ref"]
    z3 = _ds(_cfg(deepspeed={"zero_stage": 3}))["ref"]["zero_optimization"]
    assert z3["stage"] == 3 and "offload_param" not in z3
    # offloading needs ZeRO-3 parameter offload, which DeepSpeed runs at any policy stage
    off = _ds(_cfg(reference={"offload_reference_model": True}))["ref"]["zero_optimization"]
    assert off["stage"] == 3 and off["offload_param"]["device"] == "cpu"
    # LoRA that trains only the adapters: the reference is the policy with them off, no copy
    lora = _cfg(lora={"lora_dim": 8, "only_optimize_lora": True})
    assert lora.reference_is_base and set(_ds(lora)) == {"model"}
    assert set(_ds(_cfg(lora={"lora_dim": 8}))) == {"model", "ref"}  # the base trains too


@pytest.mark.parametrize("sections, flag", [
    ({"dpo": {"beta": 0.0}}, "--beta"),
    ({"dpo": {"label_smoothing": 0.5}}, "--label-smoothing"),
    ({"dpo": {"label_smoothing": 0.1, "loss_type": "ipo"}}, "--label-smoothing"),
    ({"reference": {"offload_reference_model": True},
      "lora": {"lora_dim": 8, "only_optimize_lora": True}}, "--offload-reference-model"),
])
def test_cross_field_mistakes_name_the_flag(sections, flag):
    from dschat_cli.config.schema import ConfigError

    with pytest.raises(ConfigError) as e:
        _cfg(**sections).check()
    assert e.value.where == flag
