"""rlhf/logprobs.py: per-token logprobs and entropy computed in float32 chunks equal the naive
float32 computation (values and gradients), and never make a float32 tensor of the whole logits;
rlhf/ppo.py's answer_logprobs reads the same positions from the answer logits alone
(logits_to_keep = A + 1) as from the whole sequence's."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dschat_cli.rlhf.logprobs import (CHUNK_ELEMENTS, answer_logits_kwargs, chunk_rows_for,
                                      logits_to_keep_kwarg, token_logprobs)
from dschat_cli.rlhf.ppo import answer_logprobs, logprobs_from_logits

FAMILIES = ("opt", "llama", "gpt2", "gpt_neox")  # as tests/conftest.py


def naive(logits: torch.Tensor, labels: torch.Tensor, start: int = 0):
    """The reference arithmetic: a float32 copy of everything, log_softmax, gather."""
    L = labels.shape[-1]
    logp = logits.float()[:, start:start + L].log_softmax(-1)
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return lp, entropy


def random_case(dtype, B=3, T=11, V=37, L=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    L = T if L is None else L
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, 0], labels[-1, -1] = 0, V - 1  # the vocabulary's edges
    return logits, labels


# bf16 inputs are upcast exactly: both sides compute in float32 on the same numbers, so only the
# summation order differs. The gradient is rounded to bf16 (8 significant bits) on our side:
# up to 2^-8 relative.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-5, atol=1e-5)}
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows,start,L", [
    (4, 0, 11),     # 3 x 11 = 33 positions in chunks of 4 (11 is not a multiple of 4)
    (1, 2, 7),      # one position per chunk, labels scored from position 2 on
    (1000, 1, 9),   # a chunk larger than everything: whole rows in one block
    (25, 0, 10),    # 2 whole rows of 10 per chunk, then the third alone
])
def test_values_entropy_and_gradients_equal_the_naive_float32_computation(dtype, chunk_rows,
                                                                         start, L):
    logits, labels = random_case(dtype, L=L)
    x = logits.clone().requires_grad_(True)
    lp, ent = token_logprobs(x, labels, start=start, entropy=True, chunk_rows=chunk_rows)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == labels.shape
    assert not ent.requires_grad
    y = logits.clone().requires_grad_(True)
    ref_lp, ref_ent = naive(y, labels, start)
    torch.testing.assert_close(lp, ref_lp, **TOL[dtype])
    torch.testing.assert_close(ent, ref_ent.detach(), **TOL[dtype])
    # a loss weighing every position differently (masked positions weigh 0)
    w = torch.randn(labels.shape, generator=torch.Generator().manual_seed(1))
    w[1, :2] = 0.0
    (lp * w).sum().backward()
    (ref_lp * w).sum().backward()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    torch.testing.assert_close(x.grad.float(), y.grad.float(), **GRAD_TOL[dtype])
    # positions before `start` and after start + L are not read: exactly zero gradient
    assert not x.grad[:, :start].any() and not x.grad[:, start + L:].any()


def test_entropy_by_hand_and_a_minus_inf_logit():
    # logits log([1, 1, 2]) -> p = [1/4, 1/4, 1/2]: H = 2 x 1/4 ln 4 + 1/2 ln 2 = 1.5 ln 2
    # = 1.039721; a -inf logit (p = 0) adds nothing (0 ln 0 = 0), not nan
    logits = torch.log(torch.tensor([[[1.0, 1.0, 2.0, 0.0]]]))
    lp, ent = token_logprobs(logits, torch.tensor([[2]]), entropy=True)
    assert ent.item() == pytest.approx(1.5 * math.log(2), abs=1e-6)
    assert lp.item() == pytest.approx(math.log(0.5), abs=1e-6)
    # uniform over V: the maximum, log V
    _, ent = token_logprobs(torch.zeros(2, 5, 50_000), torch.zeros(2, 5, dtype=torch.long),
                            entropy=True, chunk_rows=3)
    torch.testing.assert_close(ent, torch.full((2, 5), math.log(50_000)))


def test_flat_rows_and_logprobs_from_logits():
    logits, labels = random_case(torch.bfloat16, B=1)
    flat = token_logprobs(logits[0], labels[0], chunk_rows=3)  # (N, V), (N,) -> (N,)
    assert flat.shape == (11,)
    torch.testing.assert_close(flat, naive(logits, labels)[0][0])
    torch.testing.assert_close(logprobs_from_logits(logits, labels), naive(logits, labels)[0])
    # a non-contiguous view (the reference's logits[:, :-1]) reads the right numbers
    torch.testing.assert_close(logprobs_from_logits(logits[:, :-1], labels[:, 1:]),
                               naive(logits[:, :-1], labels[:, 1:])[0])


def test_labels_that_do_not_fit_are_refused():
    logits = torch.zeros(2, 5, 7)
    with pytest.raises(ValueError, match="do not fit"):
        token_logprobs(logits, torch.zeros(2, 5, dtype=torch.long), start=1)
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        token_logprobs(logits, torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_rows"):
        token_logprobs(logits, torch.zeros(2, 5, dtype=torch.long), chunk_rows=0)


class LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any op outputs (numel), and every op's name."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_float32_tensor_of_the_whole_logits_in_forward_or_backward():
    N, V, rows = 4, 1000, 3  # 4 rows x 9 positions = 36 positions in chunks of 3
    logits, labels = random_case(torch.bfloat16, B=N, T=9, V=V)
    x = logits.requires_grad_(True)
    with LargestFloat32() as mode:
        lp, ent = token_logprobs(x, labels, entropy=True, chunk_rows=rows)
        (lp.sum() + 0 * ent.sum()).backward()
    # the mode saw both passes: the backward's scatter_add of g at the labels too
    assert any("scatter_add" in op for op in mode.ops) and x.grad is not None
    # one chunk of 3 positions x V in float32 at most: 1/12 of the 36 x V logits
    assert mode.largest <= rows * V, mode.largest
    # the naive way makes float32 tensors of all of them (the check can fail)
    with LargestFloat32() as naive_mode:
        naive(logits.detach().requires_grad_(True), labels)[0].sum().backward()
    assert naive_mode.largest == 36 * V


def test_chunk_size_follows_the_vocabulary_and_the_plan_knows_it():
    from dschat_cli.plan.memory import LOGPROB_CHUNK_ELEMENTS

    assert LOGPROB_CHUNK_ELEMENTS == CHUNK_ELEMENTS  # plan/memory.py repeats it (no torch there)
    assert chunk_rows_for(50_272) == 333 and chunk_rows_for(10 ** 9) == 1


# ---------------------------------------------------------------------------------------------
# answer logits: the last A + 1 positions are enough


def test_answer_logprobs_from_the_answer_logits_alone():
    # P = 4, A = 3: answer token k is scored by sequence position 3 + k; the last A + 1 = 4
    # positions are 3..6, so kept position k scores it (and kept position 3 scores nothing)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 7, 9, generator=g).to(torch.bfloat16)
    seq = torch.randint(0, 9, (2, 7), generator=g)
    full = answer_logprobs(logits, seq, 4)
    kept = answer_logprobs(logits[:, -4:], seq, 4)
    assert torch.equal(full, kept)
    torch.testing.assert_close(full, naive(logits[:, 3:6], seq[:, 4:])[0])
    lp, ent = answer_logprobs(logits[:, -4:], seq, 4, entropy=True)
    assert torch.equal(lp, full) and ent.shape == (2, 3)
    with pytest.raises(ValueError, match="A \\+ 1 = 4"):
        answer_logprobs(logits[:, -3:], seq, 4)


class NoKeep(torch.nn.Module):
    """An older remote-code model: its forward takes no logits_to_keep and makes the logits of
    every position."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=use_cache)


class OldKeep(NoKeep):
    """transformers 4.45-4.49's name for it."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None,
                num_logits_to_keep=0):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=use_cache,
                          logits_to_keep=num_logits_to_keep)


class Engine(torch.nn.Module):
    """What step 3 uses of a DeepSpeed engine: .module, a forward passing keywords through,
    backward, step (plain SGD), global_steps, get_global_grad_norm, device."""

    def __init__(self, module, lr: float = 0.0):
        super().__init__()
        self.module = module
        self.opt = torch.optim.SGD(module.parameters(), lr=lr)
        self.global_steps = 0
        self.device = torch.device("cpu")

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()
        self.global_steps += 1

    def get_global_grad_norm(self):
        return None


def kept_positions(model) -> list[int]:
    """A forward hook's record of how many positions' logits each call made."""
    seen: list[int] = []
    model.register_forward_hook(lambda m, args, out: seen.append(out.logits.shape[1]))
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tiny_family_takes_logits_to_keep_and_gives_the_same_logprobs(family,
                                                                            tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from dschat_cli.models.reward import positions_from_mask
    from dschat_cli.models.tiny import build_tiny_model

    model = build_tiny_model(family, tiny_tokenizer, dropout=0.0).eval()
    assert logits_to_keep_kwarg(model) == "logits_to_keep"
    assert logits_to_keep_kwarg(Engine(model)) == "logits_to_keep"
    lora = get_peft_model(build_tiny_model(family, tiny_tokenizer, dropout=0.0),
                          LoraConfig(r=2, target_modules="all-linear"))
    assert logits_to_keep_kwarg(Engine(lora)) == "logits_to_keep"
    assert logits_to_keep_kwarg(NoKeep(model)) is None
    assert logits_to_keep_kwarg(OldKeep(model)) == "num_logits_to_keep"
    # 2 left-padded prompts of P = 5, answers of A = 4 (the second right-padded)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(10, 60, (2, 9), generator=g)
    mask = torch.ones_like(seq)
    mask[1, :2] = 0
    mask[1, -1] = 0
    pos = positions_from_mask(mask)
    seen = kept_positions(model)
    with torch.no_grad():
        full = answer_logprobs(model(input_ids=seq, attention_mask=mask, position_ids=pos,
                                     use_cache=False).logits, seq, 5)
        for wrapper in (Engine(model), Engine(NoKeep(model)), Engine(OldKeep(model))):
            kw = answer_logits_kwargs(wrapper, seq, 5)
            got = answer_logprobs(wrapper(input_ids=seq, attention_mask=mask, position_ids=pos,
                                          use_cache=False, **kw).logits, seq, 5)
            torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    # the whole sequence, then the 4 + 1 answer positions, all 9 without the keyword, 5 again
    assert seen == [9, 5, 9, 5]


# ---------------------------------------------------------------------------------------------
# step 3: the scoring forwards (steps/rl/experience.py) and the actor's training forward
# (steps/rl/learner.py) ask for the answer logits only, and get what the whole sequence's give


class FixedAnswers:
    """A RolloutGenerator stand-in: the same answers to the prompts every time, no logprobs (as
    transformers' generate), so the actor's scoring forward runs."""

    def __init__(self, answers: torch.Tensor):
        self.answers = answers

    def generate(self, module, prompts, prompt_mask):
        from dschat_cli.generation.fast import Generated

        return Generated(seq=torch.cat([prompts, self.answers], 1), logprobs=None)


def step3_models(model, tokenizer, *, keep: bool, lr: float):
    import copy
    from types import SimpleNamespace

    actor, ref = copy.deepcopy(model), copy.deepcopy(model)
    wrap = (lambda m: m) if keep else NoKeep
    return SimpleNamespace(actor=Engine(wrap(actor), lr=lr), ref=Engine(wrap(ref)), critic=None,
                           reward=lambda seq, mask, position_ids: seq.float() / 100.0,
                           tokenizer=tokenizer), (kept_positions(actor), kept_positions(ref))


def test_step3_experience_and_learner_with_answer_logits_equal_the_whole_sequence_path(
        tiny_tokenizer):
    import dataclasses

    from dschat_cli.config.ppo import PPOConfig
    from dschat_cli.dist import Dist
    from dschat_cli.models.tiny import build_tiny_model
    from dschat_cli.rlhf.advantages import Advantages
    from dschat_cli.steps.rl.experience import ExperienceMaker
    from dschat_cli.steps.rl.learner import Learner

    model = build_tiny_model("opt", tiny_tokenizer, dropout=0.0)
    V, eos, pad = model.config.vocab_size, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    cfg = PPOConfig()
    # 4 rows in mini-batches of 2: the first pair's prompts are padded on the left and its
    # answers end early, so trim_padding gives each mini-batch its own P and A
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, per_device_training_batch_size=2))
    dist = Dist(rank=0, local_rank=0, world_size=1, device="cpu")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, 60, (4, 6), generator=g)
    prompt_mask = torch.ones_like(prompts)
    prompts[:2, :2], prompt_mask[:2, :2] = pad, 0
    answers = torch.randint(10, 60, (4, 5), generator=g)
    answers[:2, 2], answers[:2, 3:] = eos, pad  # 3 real tokens, then padding
    batch = {"input_ids": prompts, "attention_mask": prompt_mask}

    results = {}
    for keep in (True, False):
        models, (actor_seen, ref_seen) = step3_models(model, tiny_tokenizer, keep=keep, lr=0.5)
        maker = ExperienceMaker(models, cfg, dist)
        exp = maker.make(batch, generator=FixedAnswers(answers))
        # one scoring forward each: the A + 1 = 6 answer positions, or all 6 + 5 = 11
        assert actor_seen == ref_seen == [6 if keep else 11]
        # an update that moves the actor: old logprobs a little off, advantages of both signs
        old = exp.logprobs + 0.05 * torch.randn(exp.logprobs.shape, generator=g.manual_seed(1))
        exp = exp._replace(logprobs=old)
        adv = torch.randn(exp.logprobs.shape, generator=g.manual_seed(2)) * exp.action_mask
        stats = Learner(models, cfg, dist).update(exp, Advantages(adv, None))
        # mini-batch 1 trimmed to P = 4 prompt columns and A = 3 answer columns: 3 + 1 logits
        assert actor_seen[1:] == ([4, 6] if keep else [7, 11])
        results[keep] = (exp, stats, models.actor.module)

    (e1, s1, a1), (e0, s0, a0) = results[True], results[False]
    torch.testing.assert_close(e1.logprobs, e0.logprobs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e1.ref_logprobs, e0.ref_logprobs, rtol=1e-5, atol=1e-5)
    assert e1.ref_logprobs.abs().sum() > 0
    for name in ("actor_loss", "approx_kl", "clipfrac", "entropy"):
        assert getattr(s1, name) == pytest.approx(getattr(s0, name), rel=1e-5, abs=1e-6), name
    assert s1.approx_kl > 0 and s1.minibatches == 2
    # the entropy of a random tiny model's next-token distributions: high, below log V
    assert 0.5 * math.log(V) < s1.entropy < math.log(V)
    # the same update: every weight moved alike (the fallback's weights sit under NoKeep)
    w0 = dict(a0.model.named_parameters())
    moved = 0.0
    for name, p in a1.named_parameters():
        torch.testing.assert_close(p, w0[name], rtol=1e-4, atol=1e-6)
        moved += float((p - model.get_parameter(name)).detach().abs().sum())
    assert moved > 0
