"""GPU check of the fast engine's CUDA-graph bookkeeping (no CPU test can run graphs):

    python benchmarks/gpu_check_fast_engine.py

Greedy decoding with CUDA graphs must give exactly the tokens of the same engine run eagerly,
across changes that force new graphs: another batch size (a short last eval batch), another
prompt width, and weights that moved to new addresses (a re-gathered ZeRO-3 model)."""
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dschat_cli.generation.fast import FastGenerator
from dschat_cli.models.presets import preset_config

raw = dict(preset_config("opt-125m"))
cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
kw = dict(eos_token_id=2, pad_token_id=1, max_new_tokens=40, do_sample=False, max_prompt_seq_len=24)
graphs = FastGenerator(model, **kw)
eager = FastGenerator(model, use_cuda_graph=False, **kw)
g = torch.Generator().manual_seed(0)
cases = [(8, 24), (8, 24), (5, 24), (8, 17), (8, 24)]
for i, (B, P) in enumerate(cases):
    if i == 4:  # move every weight to new memory: the graphs must be recorded again
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
    ids = torch.randint(10, 50000, (B, P), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    a, b = graphs.generate(ids, mask), eager.generate(ids, mask)
    same = torch.equal(a.seq, b.seq)
    gap = (a.logprobs - b.logprobs).abs().max().item()
    print(f"case {i}: batch {B}, prompt {P}: tokens equal {same}, max logprob diff {gap:.2e}, "
          f"captures so far {graphs.captures}")
    assert same, "graph replay diverged from eager decoding"
print("ok")
