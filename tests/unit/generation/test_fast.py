"""The fast rollout engine on CPU (eager decode steps): the same tokens as transformers' generate
when greedy, logprobs equal to the model's own forward pass (the parity gate), every family."""

from __future__ import annotations

import pytest
import torch

from dschat_cli.generation.fast import (FastGenerator, GenerationMismatch, check_parity,
                                        logprob_gap)
from dschat_cli.rlhf.ppo import answer_logprobs


def _model_and_prompts(family, tiny_tokenizer, seed=0, batch=4):
    from dschat_cli.models.tiny import build_tiny_model

    torch.manual_seed(seed)
    model = build_tiny_model(family, tiny_tokenizer).eval()
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 5, 1][:batch]
    P = max(lengths)
    ids = torch.full((batch, P), tiny_tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(batch, P, dtype=torch.long)
    for i, n in enumerate(lengths):  # left-padded, ragged
        ids[i, P - n:] = torch.randint(5, model.config.vocab_size - 1, (n,), generator=g)
        mask[i, P - n:] = 1
    return model, ids, mask


def _forward_logprobs(model, seq, prompt_mask):
    P = prompt_mask.shape[1]
    answer = seq[:, P:]
    is_eos = (answer == model.config.eos_token_id).long()
    real = ((is_eos.cumsum(1) - is_eos) == 0).long()
    att = torch.cat([prompt_mask, real], dim=1)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=att, position_ids=pos, use_cache=False).logits
    return answer_logprobs(logits, seq, P), real


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2", "neox"])
def test_greedy_matches_hf_generate_and_forward_logprobs(family, tiny_tokenizer):
    model, ids, mask = _model_and_prompts(family, tiny_tokenizer)
    tok = tiny_tokenizer
    gen = FastGenerator(model, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        max_new_tokens=12, do_sample=False, bucket=4)  # 4-slot context views
    out = gen.generate(ids, mask)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12,
                             do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    A = out.seq.shape[1] - ids.shape[1]
    assert torch.equal(out.seq, ref[:, :ids.shape[1] + A])
    fwd, real = _forward_logprobs(model, out.seq, mask)
    mean, worst = logprob_gap(out.logprobs, fwd, real)
    assert worst < 1e-4, (mean, worst)


def test_sampled_logprobs_match_forward_with_lora_and_eager_attention(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from dschat_cli.models.tiny import build_tiny_model

    torch.manual_seed(1)
    model = build_tiny_model("llama", tiny_tokenizer)
    model.set_attn_implementation("eager")  # the additive float mask path
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False)).eval()
    _, ids, mask = _model_and_prompts("llama", tiny_tokenizer, seed=3)
    gen = FastGenerator(model, eos_token_id=tiny_tokenizer.eos_token_id,
                        pad_token_id=tiny_tokenizer.pad_token_id, max_new_tokens=10,
                        do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    out = gen.generate(ids, mask)
    fwd, real = _forward_logprobs(model, out.seq, mask)
    assert logprob_gap(out.logprobs, fwd, real)[1] < 1e-4
    # the buffers are reused: a second rollout of another prompt width gives fresh results
    out2 = gen.generate(ids[:, 2:], mask[:, 2:])
    fwd2, real2 = _forward_logprobs(model, out2.seq, mask[:, 2:])
    assert logprob_gap(out2.logprobs, fwd2, real2)[1] < 1e-4


def test_stops_early_once_every_row_ended_and_pads_after_eos(tiny_tokenizer):
    model, ids, mask = _model_and_prompts("opt", tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    model.lm_head = _ForceEos(model.get_output_embeddings(), eos)  # greedy: eos at once
    gen = FastGenerator(model, eos_token_id=eos, pad_token_id=tiny_tokenizer.pad_token_id,
                        max_new_tokens=40, do_sample=False, check_every=4)
    out = gen.generate(ids, mask)
    answer = out.seq[:, ids.shape[1]:]
    assert answer.shape[1] == 4  # checked after 4 steps: every row had ended
    assert (answer[:, 0] == eos).all() and (answer[:, 1:] == tiny_tokenizer.pad_token_id).all()


def test_ignore_eos_generates_exactly_max_new_tokens(tiny_tokenizer):
    model, ids, mask = _model_and_prompts("opt", tiny_tokenizer)
    eos = tiny_tokenizer.eos_token_id
    model.lm_head = _ForceEos(model.get_output_embeddings(), eos)
    gen = FastGenerator(model, eos_token_id=eos, pad_token_id=tiny_tokenizer.pad_token_id,
                        max_new_tokens=9, do_sample=True, ignore_eos=True, check_every=2)
    out = gen.generate(ids, mask)
    answer = out.seq[:, ids.shape[1]:]
    assert answer.shape[1] == 9 and not (answer == eos).any()


class _ForceEos(torch.nn.Module):
    """An LM head whose eos logit is far above the rest."""

    def __init__(self, head, eos):
        super().__init__()
        self.head, self.eos = head, eos

    def forward(self, h):
        logits = self.head(h)
        logits[..., self.eos] += 1e4
        return logits


def test_parity_gate_stops_on_wrong_logprobs():
    gen = torch.tensor([[-1.0, -2.0, -3.0]])
    fwd = torch.tensor([[-1.0, -2.5, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    # real tokens only: |0| and |0.5| -> mean 0.25, max 0.5 (the masked -6 difference is ignored)
    assert logprob_gap(gen, fwd, mask) == (0.25, 0.5)
    assert check_parity(gen, fwd, mask, tolerance=0.3, step=3) == (0.25, 0.5)
    with pytest.raises(GenerationMismatch, match="rollout 3.*0.2500.*--generation-engine hf"):
        check_parity(gen, fwd, mask, tolerance=0.2, step=3)
    with pytest.raises(GenerationMismatch):  # NaN never passes
        check_parity(gen * float("nan"), fwd, mask, tolerance=0.2, step=1)


def test_parity_gaps_are_the_largest_over_the_ranks():
    """Every rank decides from the same gap (a rank that stopped, or skipped a forward pass the
    others run, would leave them waiting): reduce_max stands in for Dist.all_reduce_max."""
    gen = torch.tensor([[-1.0, -2.0]])
    fwd = torch.tensor([[-1.0, -2.5]])
    mask = torch.tensor([[1, 1]])
    seen = []

    def other_rank_is_worse(x):  # another rank's mean gap 0.4, max 0.9
        seen.append(x)
        return max(x, 0.4 if len(seen) == 1 else 0.9)

    with pytest.raises(GenerationMismatch, match="0.4000"):  # this rank's 0.25 alone would pass
        check_parity(gen, fwd, mask, tolerance=0.3, step=2, reduce_max=other_rank_is_worse)
    seen.clear()
    assert check_parity(gen, fwd, mask, tolerance=0.5, step=2,
                        reduce_max=other_rank_is_worse) == (0.4, 0.9)
    # a nan gap here goes to the other ranks as infinite (a max over nan is not defined)
    seen.clear()
    with pytest.raises(GenerationMismatch):
        check_parity(gen * float("nan"), fwd, mask, tolerance=0.5, step=2,
                     reduce_max=other_rank_is_worse)
    assert seen[0] == float("inf")


def test_failed_graph_capture_falls_back_to_eager_decoding(tiny_tokenizer, monkeypatch):
    """CUDA graphs cannot run on CPU; this drives the capture path with stand-ins whose capture
    fails (as PyTorch's allocator can): generation must go on eagerly, with the same tokens."""
    import contextlib
    import warnings

    model, ids, mask = _model_and_prompts("opt", tiny_tokenizer)
    kw = dict(eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
              max_new_tokens=10, do_sample=False, bucket=4)
    expected = FastGenerator(model, **kw).generate(ids, mask)

    class FailingGraph:
        def __init__(self, *a, **k):
            raise RuntimeError("it->second->use_count > 0 INTERNAL ASSERT FAILED")

    class FakeStream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FailingGraph)
    gen = FastGenerator(model, **kw)
    monkeypatch.setattr(gen, "_use_graph", lambda device: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gen.generate(ids, mask)
    assert torch.equal(out.seq, expected.seq)
    assert torch.allclose(out.logprobs, expected.logprobs)
    assert gen.use_cuda_graph is False and gen.captures == 0
    assert sum("CUDA graph capture" in str(w.message) for w in caught) == 1


def test_attention_without_4d_masks_is_refused_with_the_flag(tiny_tokenizer):
    from dschat_cli.config.schema import ConfigError

    model, _, _ = _model_and_prompts("llama", tiny_tokenizer)
    model.config._attn_implementation = "flex_attention"  # takes no 4D boolean mask
    with pytest.raises(ConfigError) as e:
        FastGenerator(model, eos_token_id=2, pad_token_id=1, max_new_tokens=4)
    assert e.value.where == "--generation-engine fast" and "--generation-engine hf" in e.value.message


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_compiled_decode_step_samples_the_same_answers(family, tiny_tokenizer):
    """--compile-decode on: the decode step traced whole (fullgraph) and run through AOT autograd's
    functionalised graph (aot_eager: the same tracing inductor compiles, without its C++/Triton
    code generation, which CI has no time for) gives the uncompiled engine's tokens and logprobs,
    over several context buckets (one recompile with the bucket symbolic)."""
    model, ids, mask = _model_and_prompts(family, tiny_tokenizer)
    kw = dict(eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
              max_new_tokens=12, do_sample=True, ignore_eos=True, bucket=4)
    torch.manual_seed(7)  # separate q/k/v uncompiled against fused q/k/v compiled
    expected = FastGenerator(model, fuse_qkv=False, **kw).generate(ids, mask)
    gen = FastGenerator(model, compile_decode=True, compile_backend="aot_eager", **kw)
    torch.manual_seed(7)
    out = gen.generate(ids, mask)
    assert gen.compile_failure is None and gen.compile_decode and gen._compiled is not None
    assert gen.fusion is not None
    assert torch.equal(out.seq, expected.seq)
    assert torch.allclose(out.logprobs, expected.logprobs, atol=1e-5)
    fwd, real = _forward_logprobs(model, out.seq, mask)
    assert logprob_gap(out.logprobs, fwd, real)[1] < 1e-4


def test_failed_compile_falls_back_to_the_uncompiled_step(tiny_tokenizer, monkeypatch):
    import warnings

    model, ids, mask = _model_and_prompts("opt", tiny_tokenizer)
    kw = dict(eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id,
              max_new_tokens=10, do_sample=False, bucket=4)
    expected = FastGenerator(model, **kw).generate(ids, mask)

    def failing_compile(fn, **kwargs):
        def compiled(*a, **k):
            raise RuntimeError("Unsupported: a graph break in fullgraph mode\nmore detail")
        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    gen = FastGenerator(model, compile_decode=True, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = gen.generate(ids, mask)
    assert torch.equal(out.seq, expected.seq)
    assert gen.compile_decode is False
    assert gen.compile_failure == "RuntimeError: Unsupported: a graph break in fullgraph mode"
    assert sum("torch.compile of the decode step failed" in str(w.message) for w in caught) == 1
