"""Tensor-parallel rollouts on CPU: two ranks (gloo) decode their prompts together, each holding
half of every attention and MLP weight; the tokens and logprobs each rank gets back must be what
the whole model gives for that rank's prompts alone."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dschat_cli.generation.tensor_parallel import LAYOUTS, check_supported

MAX_NEW = 10


def _prompts(rank: int, pad: int, vocab: int):
    """Rank 0: 4 prompts of width 7; rank 1: 3 prompts of width 5 (a shorter last batch and
    another width: the group pads both)."""
    g = torch.Generator().manual_seed(100 + rank)
    lengths = [[7, 3, 5, 1], [5, 2, 4]][rank]
    P = max(lengths)
    ids = torch.full((len(lengths), P), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = torch.randint(5, vocab - 1, (n,), generator=g)
        mask[i, P - n:] = 1
    return ids, mask


def _fast_kwargs(tok, do_sample):
    return dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                max_new_tokens=MAX_NEW, do_sample=do_sample, bucket=4)


CASES = (("opt", False), ("llama", False), ("opt", True), ("llama", "lora"))  # (family, mode)


def _load(model_dir, lora: bool):
    """The tiny model; with `lora`, LoRA adapters (rank 4) with non-zero B (peft starts B at 0,
    which would leave the merge untested), the same on every process."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    if lora:
        from dschat_cli.config.sections import LoraOptions
        from dschat_cli.models.loading import apply_lora

        torch.manual_seed(5)
        model = apply_lora(model, LoraOptions(lora_dim=4)).eval()
        g = torch.Generator().manual_seed(6)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _worker(rank, world, port, model_dirs, results):
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from dschat_cli.generation.tensor_parallel import TensorParallelRollout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        found = {}
        for family, mode in CASES:
            model_dir = model_dirs[family]
            tok = AutoTokenizer.from_pretrained(model_dir)
            model = _load(model_dir, mode == "lora")
            tp = TensorParallelRollout(model, size=world, device="cpu", dtype=torch.float32,
                                       fast_kwargs=_fast_kwargs(tok, mode is True))
            tp.refresh(model, zero3=False)
            outs = []
            for _ in range(2):  # a second rollout reuses the replica and its buffers
                ids, mask = _prompts(rank, tok.pad_token_id, model.config.vocab_size)
                out = tp.generate(ids, mask)  # ranks drawing other tokens would raise here
                outs.append((ids, mask, out.seq.clone(), out.logprobs.clone()))
            shard = sum(p.numel() for p in tp.replica.parameters())
            found[(family, mode)] = (outs, shard)
        results[rank] = found
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tiny_opt, tiny_llama):
    """Both ranks' rollouts for every case, from one pair of spawned processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dirs = {"opt": str(tiny_opt), "llama": str(tiny_llama)}
    with mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.start_processes(_worker, args=(2, port, dirs, results), nprocs=2,
                           start_method="spawn")
        return dirs, dict(results)


@pytest.mark.parametrize("family,mode", [("opt", False), ("llama", False), ("llama", "lora")])
def test_two_ranks_greedy_equal_the_whole_model(family, mode, two_ranks, tiny_tokenizer):
    """Greedy tokens and logprobs of each rank's rows equal the whole model's for its prompts
    (with LoRA: the unmerged model with its adapters, as the actor trains)."""
    from dschat_cli.generation.fast import FastGenerator, logprob_gap
    from tests.unit.generation.test_fast import _forward_logprobs

    dirs, results = two_ranks
    model = _load(dirs[family], mode == "lora")
    whole = FastGenerator(model, **_fast_kwargs(tiny_tokenizer, False))
    base = model.get_base_model() if mode == "lora" else model
    for rank in (0, 1):
        outs, shard = results[rank][(family, mode)]
        for ids, mask, seq, lps in outs:
            ref = whole.generate(ids, mask)
            n = min(seq.shape[1], ref.seq.shape[1])  # the group may decode a few steps longer
            assert seq.shape[0] == ids.shape[0] and torch.equal(seq[:, :ids.shape[1]], ids)
            assert torch.equal(seq[:, :n], ref.seq[:, :n]), (rank, seq, ref.seq)
            fwd, real = _forward_logprobs(model, seq, mask)
            assert logprob_gap(lps, fwd, real)[1] < 1e-4
        # each rank holds half of every attention and MLP projection, the rest whole
        layers = base.config.num_hidden_layers
        split = sum(m.weight.numel() for name, m in base.named_modules()
                    if name.rpartition(".")[2] in LAYOUTS[family].column + LAYOUTS[family].row
                    and hasattr(m, "weight"))
        whole_n = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
        assert layers and shard < whole_n - split // 2 + split // 10, (shard, whole_n, split)
        assert shard >= whole_n - split // 2 - split // 10


def test_two_ranks_sample_the_same_tokens_and_logprobs_match_the_forward(two_ranks,
                                                                         tiny_tokenizer):
    from dschat_cli.generation.fast import logprob_gap
    from tests.unit.generation.test_fast import _forward_logprobs

    dirs, results = two_ranks
    model = _load(dirs["opt"], False)
    for rank in (0, 1):
        (ids, mask, seq1, lp1), (_, _, seq2, _) = results[rank][("opt", True)][0]
        assert not torch.equal(seq1, seq2)  # fresh noise each rollout
        fwd, real = _forward_logprobs(model, seq1, mask)
        assert logprob_gap(lp1, fwd, real)[1] < 1e-4


def test_supported_layouts_and_divisibility():
    check_supported({"model_type": "opt", "num_attention_heads": 40, "ffn_dim": 20480}, 4)
    check_supported({"model_type": "llama", "num_attention_heads": 32, "num_key_value_heads": 8,
                     "intermediate_size": 11008}, 8)
    with pytest.raises(ValueError, match="gpt2"):
        check_supported({"model_type": "gpt2", "num_attention_heads": 12}, 2)
    with pytest.raises(ValueError, match="key/value heads"):
        check_supported({"model_type": "llama", "num_attention_heads": 32,
                         "num_key_value_heads": 2, "intermediate_size": 11008}, 4)
    assert set(LAYOUTS) >= {"opt", "llama"}


def test_ppo_options_refuse_what_cannot_split():
    import dataclasses

    from dschat_cli.config.ppo import PPOConfig, PPOGenerationOptions
    from dschat_cli.config.schema import ConfigError
    from dschat_cli.config.sections import LoraOptions, ModelOptions

    base = PPOConfig(actor=ModelOptions(model="opt-1.3b"), critic=ModelOptions(model="opt-350m"),
                     output_dir="out",
                     generation=PPOGenerationOptions(generation_tensor_parallel=2))
    base.check()
    with pytest.raises(ConfigError, match="--generation-engine fast"):
        dataclasses.replace(base, generation=dataclasses.replace(
            base.generation, generation_engine="hf")).check()
    dataclasses.replace(base, actor_lora=LoraOptions(lora_dim=8)).check()  # merged into the copy
