"""The fast engine's fused q/k/v projections (generation/fused.py): the same answers and logprobs
as separate projections, the trained weights' latest values at every rollout, the model given back
unchanged, and a family that does not fit falls back."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from dschat_cli.generation.fast import FastGenerator, logprob_gap
from dschat_cli.generation.fused import FusionMismatch, QKVFusion

from .test_fast import _forward_logprobs, _model_and_prompts


def _kw(tok, **over):
    kw = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=12,
              do_sample=True, ignore_eos=True, bucket=4)
    kw.update(over)
    return kw


def _attention_linears(model):
    return [(m, n, getattr(m, n)) for m in model.modules() for n in ("q_proj", "k_proj", "v_proj")
            if isinstance(getattr(m, n, None), nn.Linear)]


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_fused_projections_sample_what_separate_ones_do(family, tiny_tokenizer):
    model, ids, mask = _model_and_prompts(family, tiny_tokenizer)
    before = _attention_linears(model)
    torch.manual_seed(5)
    separate = FastGenerator(model, fuse_qkv=False, **_kw(tiny_tokenizer)).generate(ids, mask)
    gen = FastGenerator(model, **_kw(tiny_tokenizer))
    torch.manual_seed(5)
    fused = gen.generate(ids, mask)
    assert gen.fusion is not None and len(gen.fusion.groups) == model.config.num_hidden_layers
    assert torch.equal(fused.seq, separate.seq)
    assert torch.allclose(fused.logprobs, separate.logprobs, atol=1e-5)
    # the model is given back with its own Linears, for training and checkpoints
    assert _attention_linears(model) == before
    assert all(type(lin) is nn.Linear for _, _, lin in before)


def test_each_rollout_uses_the_latest_weights(tiny_tokenizer):
    """Training changes the weights between rollouts: a stale fused copy would sample from the
    previous policy, and its logprobs would no longer match the forward pass."""
    model, ids, mask = _model_and_prompts("llama", tiny_tokenizer)
    gen = FastGenerator(model, **_kw(tiny_tokenizer))
    gen.generate(ids, mask)
    fused_weight = gen.fusion.groups[0].weight
    with torch.no_grad():  # an optimizer step on the attention projections
        for _, _, lin in _attention_linears(model):
            lin.weight.add_(0.05 * torch.randn_like(lin.weight))
    out = gen.generate(ids, mask)
    assert gen.fusion.groups[0].weight is fused_weight  # refreshed in place (graph addresses)
    fwd, real = _forward_logprobs(model, out.seq, mask)
    assert logprob_gap(out.logprobs, fwd, real)[1] < 1e-4


def test_lora_wrapped_projections_are_left_separate(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model, ids, mask = _model_and_prompts("llama", tiny_tokenizer)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False)).eval()
    gen = FastGenerator(model, **_kw(tiny_tokenizer))
    out = gen.generate(ids, mask)
    assert gen.fusion is None and gen.fuse_qkv is False
    fwd, real = _forward_logprobs(model, out.seq, mask)
    assert logprob_gap(out.logprobs, fwd, real)[1] < 1e-4


class _CrossInputs(nn.Module):
    """Projects keys from another tensor than queries: must not be fused silently."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x * 2), self.v_proj(x)


def test_projections_of_different_inputs_are_caught():
    torch.manual_seed(0)
    toy = _CrossInputs()
    fusion = QKVFusion.build(toy)
    assert len(fusion.groups) == 1 and fusion.groups[0].weight.shape == (8, 4)
    x = torch.randn(3, 4)
    with pytest.raises(FusionMismatch, match="_CrossInputs"):
        with fusion.active():
            toy(x)
    assert type(toy.k_proj) is nn.Linear  # put back even when it fails

    class _SameInput(_CrossInputs):
        def forward(self, x):
            return self.v_proj(x), self.q_proj(x), self.k_proj(x)  # any order

    toy2 = _SameInput()
    expected = toy2(x)
    fusion2 = QKVFusion.build(toy2)
    with fusion2.active():
        got = toy2(x)
        got_again = toy2(x + 1)  # the next call computes afresh
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(got_again[0], toy2.v_proj(x + 1), atol=1e-6)


def test_a_family_that_does_not_fit_generates_unfused(tiny_tokenizer, monkeypatch):
    from dschat_cli.generation import fused

    model, ids, mask = _model_and_prompts("opt", tiny_tokenizer)
    kw = _kw(tiny_tokenizer, do_sample=False, ignore_eos=False)
    expected = FastGenerator(model, fuse_qkv=False, **kw).generate(ids, mask)

    def mismatch(self, i, x):
        raise FusionMismatch("OPTAttention projects q/k/v from different inputs")

    monkeypatch.setattr(fused._Group, "take", mismatch)
    gen = FastGenerator(model, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gen.generate(ids, mask)
    assert torch.equal(out.seq, expected.seq)
    assert gen.fusion is None and gen.fuse_qkv is False and "OPTAttention" in gen.fusion_failure
    assert sum("separate q/k/v" in str(w.message) for w in caught) == 1
    assert all(type(lin) is nn.Linear for _, _, lin in _attention_linears(model))
