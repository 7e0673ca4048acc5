"""The decode step's two biggest costs in isolation, for OPT-1.3B at batch 64 on one GPU (issue
18: the kernel profile of benchmarks/decode_profile.py put attention at 1.57 ms and the
q/k/v/out/fc1 matmuls at 0.97 ms of a 3.9 ms step):

    python benchmarks/decode_kernels.py [BATCH]

1. attention of one query token over a static KV cache of 512 slots, the view of the first n
   (a 32-token context bucket), a boolean mask hiding the unwritten slots: each SDPA backend
   that takes the inputs, and the same on a contiguous copy of the view; beside the bytes floor
   (K and V of n positions at the measured copy bandwidth).
   Then FlexAttention's compiled kernel on the same inputs.
2. the q, k, v projections as three (B, 2048) x (2048, 2048) matmuls with bias, against one
   fused (2048, 6144) matmul; and the out projection and fc1/fc2 alone.
Each figure: median of 200 CUDA-graph-free timed calls after warm-up (torch.cuda.Event).
"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

B = int(sys.argv[1]) if len(sys.argv) > 1 else 64
H, D, MAX, LAYERS, HID = 32, 64, 512, 24, 2048
dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)


def timed(fn, reps=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2] * 1e3  # microseconds


x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
y = torch.empty_like(x)
bw = 2 * x.numel() / (timed(lambda: y.copy_(x), 20) * 1e-6)  # bytes per second
del x, y
print(f"copy bandwidth {bw / 1e12:.2f} TB/s; batch {B}, {H} heads x {D}, cache {MAX} slots, "
      f"x {LAYERS} layers per decode step")

q = torch.randn(B, H, 1, D, device=dev, dtype=dt)
K = torch.randn(B, H, MAX, D, device=dev, dtype=dt)
V = torch.randn(B, H, MAX, D, device=dev, dtype=dt)
backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
for n in (288, 384, 512):
    k, v = K[:, :, :n], V[:, :, :n]
    mask = torch.ones(B, 1, 1, n, dtype=torch.bool, device=dev)
    mask[:, :, :, n - 16:] = False  # slots of this bucket not written yet
    floor = 2 * B * H * n * D * 2 / bw * 1e6
    row = [f"n={n}: floor {floor:6.1f} us"]
    for name, be in backends.items():
        for label, (kk, vv, m) in (("view", (k, v, mask)), ("contig", (k.contiguous(),
                                                                       v.contiguous(), mask)),
                                   ("nomask", (k, v, None))):
            try:
                with sdpa_kernel([be]):
                    us = timed(lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=m))
                row.append(f"{name}/{label} {us:6.1f}")
            except RuntimeError:
                row.append(f"{name}/{label}     -")
    with torch.no_grad():
        us = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    row.append(f"default/view {us:6.1f}")
    print(" | ".join(row))

# FlexAttention (compiled): for a query of one token it takes its decoding kernel (split over
# the keys); the mask as a block mask of the written slots
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    for n in (288, 384, 512):
        k, v = K[:, :, :n].contiguous(), V[:, :, :n].contiguous()
        written = torch.full((B,), n - 16, device=dev)
        bm = create_block_mask(lambda b, hh, qi, ki: ki < written[b], B, None, 1, n, device=dev)
        floor = 2 * B * H * n * D * 2 / bw * 1e6
        us = timed(lambda: flex(q, k, v, block_mask=bm))
        print(f"n={n}: flex_attention (compiled, block mask) {us:6.1f} us, floor {floor:6.1f} us")
except Exception as e:  # noqa: BLE001 - a measurement script: say what failed and go on
    print(f"flex_attention: failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")

# The mask as data: an extra key dimension (pad to a multiple of 8) that is 0 at a written slot
# and -30000 at a hidden one, with the query's extra entries 1 (then 0): the scores of written
# slots are unchanged and hidden ones get exp(-30000 * scale) = 0, with no mask argument. Same
# answer as the boolean mask? and its time, with v at 64 or padded like k.
if "nopad" not in sys.argv:
    for n in (288, 384, 512):
        mask = torch.ones(B, 1, 1, n, dtype=torch.bool, device=dev)
        mask[:, :, :, n - 16:] = False
        ref = F.scaled_dot_product_attention(q, K[:, :, :n], V[:, :, :n], attn_mask=mask)
        row = [f"n={n}: bool mask {timed(lambda: F.scaled_dot_product_attention(q, K[:, :, :n], V[:, :, :n], attn_mask=mask)):6.1f} us"]
        for extra in (8, 16):
            Kx = torch.zeros(B, H, MAX, D + extra, device=dev, dtype=dt)
            Kx[..., :D] = K
            Kx[:, :, n - 16:n, D] = -30000.0
            qx = torch.zeros(B, H, 1, D + extra, device=dev, dtype=dt)
            qx[..., :D] = q
            qx[..., D] = 1.0
            Vx = torch.zeros(B, H, MAX, D + extra, device=dev, dtype=dt)
            Vx[..., :D] = V
            scale = D ** -0.5
            for vlabel, vv in (("v64", V[:, :, :n]), (f"v{D + extra}", Vx[:, :, :n])):
                try:
                    out = F.scaled_dot_product_attention(qx, Kx[:, :, :n], vv, scale=scale)
                    err = (out[..., :D].float() - ref.float()).abs().max().item()
                    us = timed(lambda: F.scaled_dot_product_attention(qx, Kx[:, :, :n], vv,
                                                                      scale=scale))
                    row.append(f"k{D + extra}/{vlabel} {us:6.1f} us (max err {err:.1e})")
                except RuntimeError as e:
                    row.append(f"k{D + extra}/{vlabel} - ({str(e).splitlines()[0][:60]})")
        print(" | ".join(row), flush=True)

h = torch.randn(B, HID, device=dev, dtype=dt)
Wq, Wk, Wv, Wo = (torch.randn(HID, HID, device=dev, dtype=dt) for _ in range(4))
bq, bk, bv = (torch.randn(HID, device=dev, dtype=dt) for _ in range(3))
Wqkv, bqkv = torch.cat([Wq, Wk, Wv]), torch.cat([bq, bk, bv])
W1, W2 = torch.randn(4 * HID, HID, device=dev, dtype=dt), torch.randn(HID, 4 * HID, device=dev,
                                                                     dtype=dt)
h4 = torch.randn(B, 4 * HID, device=dev, dtype=dt)
sep = timed(lambda: (F.linear(h, Wq, bq), F.linear(h, Wk, bk), F.linear(h, Wv, bv)))
fused = timed(lambda: F.linear(h, Wqkv, bqkv))
floor_qkv = 3 * HID * HID * 2 / bw * 1e6
print(f"q,k,v: three matmuls {sep:.1f} us, fused {fused:.1f} us, floor {floor_qkv:.1f} us "
      f"(x {LAYERS} layers: {sep * LAYERS / 1e3:.3f} vs {fused * LAYERS / 1e3:.3f} ms per step)")
for name, fn, w in (("out", lambda: F.linear(h, Wo), Wo), ("fc1", lambda: F.linear(h, W1), W1),
                    ("fc2", lambda: F.linear(h4, W2), W2)):
    print(f"{name}: {timed(fn):.1f} us, floor {w.numel() * 2 / bw * 1e6:.1f} us")
