"""steps/dpo.py's forward_logits makes the logits from the position before the batch's first
counted token on (the shared prompt's logits are never used): the summed logprobs are the same as
from the whole sequence's logits, for every model family."""

from __future__ import annotations

import pytest
import torch

FAMILIES = ("opt", "llama", "gpt2", "gpt_neox")  # as tests/conftest.py


@pytest.mark.parametrize("family", FAMILIES)
def test_trimmed_logits_give_the_same_logprobs(family, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from dschat_cli.rlhf.dpo import answer_masks, summed_logprobs
    from dschat_cli.steps.dpo import forward_logits, pair_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(family), dtype=torch.float32)
    model.eval()
    g = torch.Generator().manual_seed(0)
    # 2 pairs: a shared prompt of 5 tokens, answers of 4 (the rejected of pair 2 is one shorter,
    # right-padded); pair 1 diverges at 5, pair 2 at 6 -> logits from position 4 on
    prompt = torch.randint(10, 60, (2, 5), generator=g)
    chosen = torch.randint(10, 60, (2, 4), generator=g)
    rejected = chosen.clone()
    rejected[0, 0] = chosen[0, 0] + 1
    rejected[1, 1] = chosen[1, 1] + 1
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
    mask = torch.ones_like(ids)
    mask[3, -1] = 0
    ids[3, -1] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        logits = forward_logits(model, batch)
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert logits.shape[1] == 9 - 4  # positions 4..8
    got = pair_logprobs(logits, batch)
    cm, rm = answer_masks(ids[:2], ids[2:], mask[:2], mask[2:])
    sums, counts = summed_logprobs(full, ids, torch.cat([cm, rm]))
    torch.testing.assert_close(torch.cat(got[:2]), sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat(got[2:]), counts)
    # a batch holding identical rows counts every real token: nothing is cut
    same = {"input_ids": torch.cat([ids[:2], ids[:2]]), "attention_mask": torch.ones(4, 9).long()}
    with torch.no_grad():
        assert forward_logits(model, same).shape[1] == 9


def test_a_model_without_logits_to_keep_gets_every_position_and_the_same_logprobs(tiny_opt):
    """An older remote-code model whose forward takes no logits_to_keep: forward_logits asks for
    nothing it cannot take (a forward with **kwargs could drop it silently, or fail), and the
    pair logprobs read the same positions from the whole sequence's logits."""
    from transformers import AutoModelForCausalLM

    from dschat_cli.steps.dpo import forward_logits, pair_logprobs

    model = AutoModelForCausalLM.from_pretrained(tiny_opt, dtype=torch.float32).eval()

    class Old(torch.nn.Module):  # forward(input_ids, attention_mask, use_cache) only
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids=None, attention_mask=None, use_cache=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=use_cache)

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, 60, (1, 5), generator=g)
    chosen = torch.randint(10, 60, (1, 4), generator=g)
    rejected = chosen.clone()
    rejected[0, 0] += 1
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        trimmed = forward_logits(model, batch)
        whole = forward_logits(Old(model), batch)
    assert trimmed.shape[1] == 5 and whole.shape[1] == 9
    for a, b in zip(pair_logprobs(trimmed, batch), pair_logprobs(whole, batch)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
