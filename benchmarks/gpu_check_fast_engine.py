"""GPU check of the fast engine's CUDA-graph bookkeeping (no CPU test can run graphs):

    python benchmarks/gpu_check_fast_engine.py

Greedy decoding with CUDA graphs must give exactly the tokens of the same engine run eagerly,
across changes that force new graphs: another batch size (a short last eval batch), another
prompt width, weights that moved to new addresses (a re-gathered ZeRO-3 model), and weights
changed in place (an optimizer step: the fused q/k/v copy must follow). Each case also prints the
tokens' logprob gap to the model's own forward pass, which a stale weight copy would blow up."""
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dschat_cli.generation.fast import FastGenerator
from dschat_cli.models.presets import preset_config
from dschat_cli.rlhf.ppo import answer_logprobs

raw = dict(preset_config("opt-125m"))
cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
kw = dict(eos_token_id=2, pad_token_id=1, max_new_tokens=40, do_sample=False, max_prompt_seq_len=24)
graphs = FastGenerator(model, **kw)
eager = FastGenerator(model, use_cuda_graph=False, **kw)
g = torch.Generator().manual_seed(0)
cases = [(8, 24), (8, 24), (5, 24), (8, 17), (8, 24), (8, 24)]
for i, (B, P) in enumerate(cases):
    if i == 4:  # move every weight to new memory: the graphs must be recorded again
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
    if i == 5:  # an optimizer step: same addresses, new values (the graphs are replayed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    ids = torch.randint(10, 50000, (B, P), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    a, b = graphs.generate(ids, mask), eager.generate(ids, mask)
    same = torch.equal(a.seq, b.seq)
    gap = (a.logprobs - b.logprobs).abs().max().item()
    with torch.no_grad():
        att = torch.cat([mask, torch.ones_like(a.seq[:, P:])], dim=1)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=a.seq, attention_mask=att, position_ids=pos).logits
    is_eos = (a.seq[:, P:] == 2).long()
    real = (is_eos.cumsum(1) - is_eos) == 0  # up to each row's first eos
    fwd = (answer_logprobs(logits, a.seq, P) - a.logprobs).abs()[real].mean().item()
    print(f"case {i}: batch {B}, prompt {P}: tokens equal {same}, max logprob diff {gap:.2e}, "
          f"gap to the forward pass {fwd:.4f}, captures so far {graphs.captures}, "
          f"fused q/k/v: {graphs.fusion is not None}")
    assert same, "graph replay diverged from eager decoding"
    assert fwd < 0.05, "the engine's logprobs are not the model's (stale weights?)"
print("ok")
