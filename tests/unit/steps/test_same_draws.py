"""Held-out answers before and after training are drawn with the same sampling noise, so their
difference measures the policy, and taking them leaves the training's random stream untouched."""

import torch

from dschat_cli.dist import Dist
from dschat_cli.steps.common import same_draws


def _draw(seed, rank, batch):
    with same_draws(seed, rank, batch):
        return torch.rand(4)


def test_the_noise_is_fixed_by_seed_rank_and_batch():
    assert torch.equal(_draw(7, 0, 0), _draw(7, 0, 0))
    others = [_draw(7, 0, 1), _draw(7, 1, 0), _draw(8, 0, 0)]
    assert all(not torch.equal(_draw(7, 0, 0), x) for x in others)


def test_the_training_stream_goes_on_as_if_nothing_was_drawn():
    torch.manual_seed(3)
    torch.rand(2)
    _draw(7, 0, 0)
    after = torch.rand(5)
    torch.manual_seed(3)
    torch.rand(2)
    assert torch.equal(after, torch.rand(5))


def test_a_heldout_probe_measures_one_model_the_same_twice(tiny_opt):
    """The fast engine samples one answer per prompt; measured twice (the global stream moved on
    in between, as training moves it), the same model gets the same figure, so a start -> end
    change in a run is the policy's, not the draw's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dschat_cli.config.dpo import HeldoutOptions
    from dschat_cli.demo.synthetic import make_pairs
    from dschat_cli.steps.heldout import HeldoutProbe

    tok = AutoTokenizer.from_pretrained(tiny_opt, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_opt).eval()
    prompts = list(dict.fromkeys(r["prompt"] for r in make_pairs(24, seed=1, split="eval")))
    enc = [tok(prompts[i:i + 8], return_tensors="pt", padding=True) for i in (0, 8)]
    loader = [{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in enc]
    opts = HeldoutOptions(true_reward="demo", max_answer_seq_len=12, greedy_check_prompts=2)
    dist = Dist(rank=0, local_rank=0, world_size=1, device="cpu")
    def probe(seed):
        p = HeldoutProbe(opts, tok, loader, dist, zero3=False, max_prompt_seq_len=64, seed=seed)
        # a score that tells sampled answers apart (the demo judge gives an untrained model's
        # near-random tokens all the same score): the number of distinct words
        p.judge = lambda prompt, answer: float(len(set(answer.split())))
        return p

    torch.manual_seed(0)
    first = probe(5).measure(model)
    torch.rand(1000)  # training draws in between
    again = probe(5).measure(model)
    assert first.n == again.n >= 12  # answers of <= 1 token do not count
    assert (first.true_reward, first.true_reward_stderr) == \
        (again.true_reward, again.true_reward_stderr)
    other = probe(6).measure(model)  # another seed draws other answers
    assert (other.true_reward, other.true_reward_stderr) != \
        (first.true_reward, first.true_reward_stderr)
