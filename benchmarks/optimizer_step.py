"""Where DeepSpeed's optimizer step goes for an OPT-1.3B actor on one GPU (issue 18: `dschat bench
--step sft` measured 0.078 s per step against a 0.009 s bytes floor, whatever the batch):

    python benchmarks/optimizer_step.py [VARIANTS]

VARIANTS: comma-separated of z0, z1, z2 (dschat's own DeepSpeed config at that ZeRO stage,
FusedAdam), a -torch suffix (the same with --torch-adam), a -nocheck suffix (bf16
check_grad_overflow off), a -fp32acc suffix (data_types.grad_accum_dtype fp32: at ZeRO-1 DeepSpeed's
BF16_Optimizer, flat fp32 gradients and an inf/nan test of the global norm only; dschat's z1 in bf16
has it already), a -noimm suffix (with it, bf16.immediate_grad_update off: the gradients added into
the fp32 buffer after backward instead of from hooks in it), plain (no DeepSpeed: fp32 master weights,
torch's fused AdamW, foreach gradient copy, norm and clipping: what the step could cost).
Each variant: 3 warm-up steps of 4 x 512 tokens, then backward and step timed (synchronised)
over 5 steps, then one step under torch.profiler: its CPU wall time, the summed kernel time, the
kernel count and the costliest kernels and CPU ops.
"""
import gc
import os
import statistics
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dschat_cli.config.ds_config import train_ds_config
from dschat_cli.config.sections import DeepSpeedOptions, OptimOptions
from dschat_cli.dist import _fix_cuda_arch_list
from dschat_cli.models.loading import optimizer_groups
from dschat_cli.models.presets import preset_config

variants = (sys.argv[1] if len(sys.argv) > 1 else "z0,z1,z2,plain").split(",")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")
# as the dschat workers do: an image's TORCH_CUDA_ARCH_LIST of "9.0a" fails DeepSpeed's FusedAdam
# build ("invalid literal for int() with base 10: '0a'")
_fix_cuda_arch_list(torch.cuda.get_device_capability(0))
raw = dict(preset_config("opt-1.3b"))
cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
B, S = 4, 512


def model_and_batch():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    ids = torch.randint(10, cfg.vocab_size - 10, (B, S), device="cuda")
    return model, ids


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def profile(label, fn):
    from torch.profiler import ProfilerActivity, profile as prof_ctx

    torch.cuda.synchronize()
    with prof_ctx(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ktime = sum(getattr(e, "device_time_total", 0) or 0 for e in kernels) / 1e3
    print(f"  {label} under the profiler: wall {wall * 1e3:.1f} ms, kernels {len(kernels)} "
          f"summing {ktime:.1f} ms", flush=True)
    by_kernel = {}
    for e in kernels:
        k = by_kernel.setdefault(e.name[:90], [0.0, 0])
        k[0] += (getattr(e, "device_time_total", 0) or 0) / 1e3
        k[1] += 1
    for name, (ms, n) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:8]:
        print(f"    {ms:7.2f} ms {n:5d}x  {name}")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                      max_name_column_width=60)
    print("\n".join("    " + line for line in table.splitlines()[:16]), flush=True)


def run_deepspeed(stage, torch_adam, nocheck, fp32acc=False, noimm=False):
    import deepspeed

    model, ids = model_and_batch()
    ds = train_ds_config(DeepSpeedOptions(zero_stage=stage),
                         OptimOptions(per_device_train_batch_size=B), world_size=1,
                         dtype="bf16", torch_adam=torch_adam)
    if nocheck:  # skip DeepSpeed's per-tensor inf/nan scan of the gradients (bf16 default: on)
        ds["bf16"]["check_grad_overflow"] = False
    if fp32acc:
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if noimm:
        ds["bf16"]["immediate_grad_update"] = False
    engine, *_ = deepspeed.initialize(model=model, config=ds, model_parameters=optimizer_groups(
        model, weight_decay=0.0, lora_lr=0.0))
    back, step = [], []
    for i in range(8):
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        b = timed(lambda: engine.backward(loss))
        s = timed(engine.step)
        if i >= 3:
            back.append(b)
            step.append(s)
    name = f"z{stage}{'-torch' if torch_adam else ''}{'-nocheck' if nocheck else ''}" \
           f"{'-fp32acc' if fp32acc else ''}{'-noimm' if noimm else ''} " \
           f"({type(engine.optimizer).__name__}, immediate_grad_update " \
           f"{ds['bf16'].get('immediate_grad_update', False)})"
    print(f"{name}: backward {statistics.mean(back) * 1e3:.1f} "
          f"ms, optimizer step {statistics.mean(step) * 1e3:.1f} ms "
          f"({', '.join(f'{x * 1e3:.1f}' for x in step)})", flush=True)
    loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
    engine.backward(loss)
    profile("step", engine.step)
    engine.destroy() if hasattr(engine, "destroy") else None
    del engine, model, loss
    gc.collect()
    torch.cuda.empty_cache()


def run_plain():
    model, ids = model_and_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float() for p in params]
    for m in masters:
        m.grad = torch.zeros_like(m)
    opt = torch.optim.AdamW(masters, lr=1e-5, weight_decay=0.0, fused=True)

    def step():
        torch._foreach_copy_([m.grad for m in masters], [p.grad for p in params])
        torch.nn.utils.clip_grad_norm_(masters, 1.0, foreach=True)
        opt.step()
        torch._foreach_copy_([p.data for p in params], masters)
        for p in params:
            p.grad = None

    back, st = [], []
    for i in range(8):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        back.append(timed(loss.backward))
        st.append(timed(step))
    print(f"plain: backward {statistics.mean(back[3:]) * 1e3:.1f} ms, step "
          f"{statistics.mean(st[3:]) * 1e3:.1f} ms", flush=True)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    profile("plain step", step)
    del model, opt, masters
    gc.collect()
    torch.cuda.empty_cache()


print(f"OPT-1.3B, batch {B} x {S}; floor of the step at 4.1 TB/s: 28 bytes x 1.32e9 params = "
      f"{28 * 1.32e9 / 4.1e12 * 1e3:.1f} ms", flush=True)
for v in variants:
    try:
        if v == "plain":
            run_plain()
        else:
            run_deepspeed(int(v[1]), "-torch" in v, "-nocheck" in v, "-fp32acc" in v,
                          "-noimm" in v)
    except Exception as e:  # noqa: BLE001 - a measurement script: say what failed and go on
        import traceback

        traceback.print_exc()
        print(f"{v}: failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})", flush=True)
