"""GPU memory per rank of a training step, from the model architectures and the DeepSpeed configs the
run will use (no torch: `dschat plan` and the line every training command prints before launch).

    est = estimate_single("sft", arch, ds_config, source="opt-1.3b", world_size=8, ...)
    est = estimate_dpo(arch, {"model": ds, "ref": ref_ds}, reference="copy", ...)
    est = estimate_ppo(archs, configs, sources, world_size=8, ...)
    est.peak, est.peak_phase, est.models[0].optimizer       # bytes per GPU

(plan/planner.py's `estimate_step(step, cfg, configs, world_size=...)` fills these from a run
config.) Checked against measured peaks on an H200 (README, `dschat plan`): within 3%. The DPO
and PPO logits terms were rewritten since for chunked logprobs (issue 18, rlhf/logprobs.py)
from what the code allocates; those full steps have not been measured again on a GPU.

What is estimated is comparable to `torch.cuda.max_memory_allocated()`: every tensor the step
allocates through PyTorch. The CUDA context, NCCL's buffers and the caching allocator's
fragmentation come on top (`overhead_bytes`, reported separately). Sequences are taken at their
maximum lengths (--max-seq-len; prompt + answer for PPO): batches of shorter samples need less.

Formulas, per rank, with N parameters (Nt trainable), D data-parallel ranks, p bytes per weight
(2 in bf16/fp16, 4 in fp32). They follow DeepSpeed 0.19's code (runtime/fp16/fused_optimizer.py,
runtime/bf16_optimizer.py, runtime/zero/stage_1_and_2.py, runtime/zero/stage3.py):

  weights     p*N; ZeRO-3: p*N/D (plus the parameters gathered for the layer running);
              ZeRO-3 with offload: only the gathered ones
  gradients   ZeRO-0: p*Nt (bf16/fp16 grads, freed by the step); ZeRO-1/2: a p*Nt/D partition
              (ZeRO-1 with gradient accumulation also keeps full p*Nt grads); ZeRO-3: a p*Nt/D
              buffer kept for the whole run; offload: on the CPU
  optimizer   fp32 master copy (4 B) + Adam m and v (8 B) per trainable parameter: 12*Nt at
              ZeRO-0 (DeepSpeed's bf16/fp16 optimizer keeps a full master copy), 12*Nt/D at ZeRO
              >= 1 (fp32 at ZeRO-0 needs no master: 8*Nt); offload: on the CPU
  buffers     ZeRO-1/2: two reduce buckets (overlap_comm double-buffers them) of
              reduce_bucket_size elements, whatever the model size, allocated during backward;
              ZeRO-3: one reduce bucket for the whole run
  step        ZeRO-0 bf16/fp16: fp32 copies of the gradients, one per parameter then one flat
              (8*Nt) while the bf16 grads still exist; ZeRO-1/2: an fp32 copy of the gradient
              partition (4*Nt/D); ZeRO-3: same per sub-group (at most 1e9 elements);
              --torch-adam adds one fp32 temporary per parameter (foreach sqrt)
  fp32 grads  bf16 at ZeRO-1 with --fp32-grad-accum (DeepSpeed's BF16_Optimizer,
              runtime/bf16_optimizer.py): bf16 grads p*Nt as at ZeRO-0, plus a flat 4*Nt fp32
              buffer they are added into, kept for the whole run, not partitioned; no reduce
              buckets; the end-of-backward all-reduce copies that buffer (4*Nt) unless its first
              parameter group alone fills a 5e8-element bucket
  activations per token and layer, arch.activation_bytes (saved for backward); with gradient
              checkpointing only each layer's input (p*h) plus one layer recomputed; plus one
              layer's gradients as working set
  logits      SFT loss: fp32 log-softmax saved + its gradient + the incoming one, 12 B per
              element of (B, S, vocab); eval: bf16 logits + fp32 copy + log-softmax (10 B);
              DPO and PPO score tokens with rlhf/logprobs.py, which upcasts one chunk of
              positions at a time (`logprob_chunk_bytes`): the bf16 logits (p B per element),
              kept for the backward, plus the bf16 gradient it writes (p B) at the backward's
              start; a no-grad forward holds the bf16 logits. DPO counts the 2B chosen +
              rejected rows of S positions; PPO's actor and ref make logits of the A + 1 answer
              positions only (logits_to_keep; a model without it makes all P + A)
  KV cache    2 (keys, values) x layers x B x (P + A) x kv width x p: the fast engine's static
              cache, kept between rollouts; HF generate's dynamic cache, freed after each
              rollout, plus one layer's copy while it grows. For PPO, B counts the rollout's
              sequences: prompts x --samples-per-prompt (each prompt repeated per answer)

Each phase (training forward/backward, optimizer step, evaluation; for DPO the reference's forward
or its precompute; for PPO generation, scoring, actor and critic training and steps, no critic
for a critic-free estimator) adds its transients to what stays resident; the peak is the largest. A backward pass is judged at its three heaviest moments (see `_backward_peak`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from dschat_cli.plan.arch import Arch

GiB = 1024 ** 3
# DeepSpeed defaults for the keys our DS configs leave out (runtime/zero/config.py).
REDUCE_BUCKET = 500_000_000
STAGE3_PREFETCH = 50_000_000
STAGE3_SUB_GROUP = 1_000_000_000
# engine.py's allreduce_gradients bucket (MEMORY_OPT_ALLREDUCE_SIZE), elements
ALLREDUCE_BUCKET = 500_000_000
# Memory the GPU needs beyond what PyTorch allocates: the CUDA context and kernels of one process
# (~0.5 GiB on an H200 with CUDA 12/13), NCCL's buffers when several ranks talk, and an allowance
# for the caching allocator's fragmentation (memory reserved above what is allocated).
CONTEXT_BYTES = 0.6 * GiB
NCCL_BYTES = 0.5 * GiB
FRAGMENTATION = 0.07


# rlhf/logprobs.py's CHUNK_ELEMENTS, repeated here because plan/ imports no torch (a test keeps
# the two equal)
LOGPROB_CHUNK_ELEMENTS = 1 << 24


def logprob_chunk_bytes(positions: int, vocab: int, per_element: float) -> float:
    """The float32 work of rlhf/logprobs.py over `positions` positions: one chunk of at most
    LOGPROB_CHUNK_ELEMENTS // vocab positions at a time, `per_element` bytes per element of it:
    8 in the forward (the chunk in fp32 and logsumexp's temporary, or the entropy's
    probabilities), 4 in the backward (the chunk, turned into its gradient in place)."""
    rows = min(positions, max(1, LOGPROB_CHUNK_ELEMENTS // vocab))
    return per_element * rows * vocab


def overhead_bytes(peak: float, world_size: int) -> float:
    """What comes on top of the estimate on a real GPU (not counted by max_memory_allocated)."""
    return CONTEXT_BYTES + (NCCL_BYTES if world_size > 1 else 0.0) + FRAGMENTATION * peak


@dataclass(frozen=True)
class Engine:
    """What one DeepSpeed config says about memory."""
    stage: int
    dtype: str  # bf16 / fp16 / fp32
    offload_optimizer: bool
    offload_param: bool
    torch_adam: bool
    reduce_bucket: int
    double_bucket: bool  # overlap_comm
    prefetch: int
    grad_accum: int
    fp32_accum: bool = False  # bf16 at ZeRO-1 with grad_accum_dtype fp32: DeepSpeed's BF16_Optimizer
    immediate: bool = False  # its bf16.immediate_grad_update: each gradient added and freed in backward

    @property
    def elem(self) -> int:
        return 4 if self.dtype == "fp32" else 2

    @classmethod
    def from_ds(cls, ds: dict) -> "Engine":
        z = ds.get("zero_optimization", {})
        stage = int(z.get("stage", 0))
        dtype = "bf16" if ds.get("bf16", {}).get("enabled") else \
            "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"
        opt = ds.get("optimizer")
        # the rule of DeepSpeed's engine (_do_optimizer_sanity_check): only there does it build
        # the BF16_Optimizer; other stages ignore the key (ZeRO-0 refuses it)
        fp32_accum = (ds.get("data_types", {}).get("grad_accum_dtype") == "fp32"
                      and dtype == "bf16" and stage == 1 and "offload_optimizer" not in z)
        return cls(stage=stage, dtype=dtype, offload_optimizer="offload_optimizer" in z,
                   offload_param="offload_param" in z,
                   torch_adam=bool(opt and opt.get("params", {}).get("torch_adam")),
                   reduce_bucket=int(z.get("reduce_bucket_size", REDUCE_BUCKET)),
                   double_bucket=bool(z.get("overlap_comm", stage == 3)),
                   prefetch=int(z.get("stage3_prefetch_bucket_size", STAGE3_PREFETCH)),
                   grad_accum=int(ds.get("gradient_accumulation_steps", 1)),
                   fp32_accum=fp32_accum,
                   immediate=fp32_accum and bool(ds["bf16"].get("immediate_grad_update")))


@dataclass(frozen=True)
class ModelMemory:
    """One model's bytes on each GPU. `grads` and `buffers` exist only in some phases (see
    `resident`); `activations` is the largest transient of this model's own work (training
    forward + backward with logits, or its scoring forward); `kv_cache` the generation cache."""
    role: str  # model, reward model, actor, critic, ref, reward
    source: str  # the model argument
    params: int
    trainable: int
    stage: int
    offload: bool
    weights: float
    grads: float = 0.0
    optimizer: float = 0.0
    buffers: float = 0.0
    step_extra: float = 0.0  # transient of the optimizer step beyond the gradients
    activations: float = 0.0
    kv_cache: float = 0.0
    grads_resident: bool = False  # ZeRO-3 keeps its gradient buffer between steps
    buffers_resident: bool = False  # ZeRO-3's bucket stays; ZeRO-1/2's live only in backward
    bucket_elements: int = 0  # ZeRO-1/2: one reduce bucket's elements
    head_grad: float = 0.0  # the output head's weight gradient, the first one backward makes
    hp_grads: float = 0.0  # BF16_Optimizer's fp32 gradient buffer, allocated once and kept

    @property
    def resident(self) -> float:
        """Allocated between steps (generation, scoring, evaluation)."""
        return (self.weights + self.optimizer + self.hp_grads
                + (self.grads if self.grads_resident else 0.0)
                + (self.buffers if self.buffers_resident else 0.0))


def trained_model(arch: Arch, eng: Engine, *, role: str, source: str, world_size: int,
                  lora_dim: int = 0, lora_filter: str = "", only_lora: bool = False,
                  value_head: bool = False) -> ModelMemory:
    """Weights, gradients, optimizer states and DeepSpeed buffers of a model that trains.
    `value_head`: a reward model / critic (the backbone plus Linear(head_in, 1))."""
    D, p = world_size, eng.elem
    base = arch.backbone_params if value_head else arch.params
    head = arch.head_in if value_head else 0
    lora = arch.lora_params(lora_dim, lora_filter, backbone_only=value_head)
    n = base + lora + head
    # apply_lora leaves every weight trainable unless --only-optimize-lora; the value head trains
    nt = (lora + head) if (lora_dim > 0 and only_lora) else n
    s = eng.stage
    if s == 3:
        weights = 0.0 if eng.offload_param else p * n / D
        # the parameters of the module running, and the next ones fetched ahead; stage3.py's
        # one reduce (ipg) bucket, allocated at init
        buffers = p * min(n, arch.largest_tensor + eng.prefetch) + p * eng.reduce_bucket
    else:
        weights = p * n
        buffers = (2 if eng.double_bucket else 1) * p * eng.reduce_bucket if s in (1, 2) else 0.0
    hp_grads = 0.0
    if eng.fp32_accum:
        # DeepSpeed's BF16_Optimizer (bf16_optimizer.py): backward writes bf16 gradients as at
        # ZeRO-0, which are added into a flat fp32 buffer of every trainable parameter (kept for
        # the run) and freed by the step; no reduce buckets. The fp32 master copy and Adam's m, v
        # are partitioned. At the end of backward the all-reduce flattens its bucket: a copy of
        # the fp32 buffer when the parameter groups share one bucket, none when the first group
        # alone fills it (torch's flatten of a single tensor is a view).
        # With immediate_grad_update a hook adds each bf16 gradient into the buffer as backward
        # makes it (through an fp32 copy of it) and frees it: at most the largest tensor's bf16
        # gradient and its fp32 copy exist at once, besides the output head's (`head_grad`: a
        # head tied to the embedding gets its gradient at the head and frees it only at the end).
        # The optimizer step counts that transient too, where none is left: a slight overestimate.
        buffers = 0.0
        grads = (p + 4) * min(nt, arch.largest_tensor) if eng.immediate else p * nt
        hp_grads = 4 * nt
        optimizer = 12 * nt / D
        step_extra = 0.0 if nt > ALLREDUCE_BUCKET else 4 * nt
    elif eng.offload_optimizer:
        grads = 0.0
        optimizer = 0.0
        step_extra = 0.0
    elif s == 0:
        grads = p * nt
        optimizer = (12 if p == 2 else 8) * nt  # fp32 master + Adam m, v; fp32: no master copy
        step_extra = 8 * nt if p == 2 else 0.0
    else:
        grads = p * nt / D
        if s == 1 and eng.grad_accum > 1:
            grads += p * nt  # stage 1 accumulates full gradients between boundaries
        optimizer = 12 * nt / D
        step_extra = 4 * min(nt / D, STAGE3_SUB_GROUP if s == 3 else math.inf)
    if eng.torch_adam and not eng.offload_optimizer:
        step_extra += 4 * nt / (1 if s == 0 else D)
    return ModelMemory(role=role, source=source, params=n, trainable=nt, stage=s,
                       offload=eng.offload_optimizer or eng.offload_param, weights=weights,
                       grads=grads, optimizer=optimizer, buffers=buffers, step_extra=step_extra,
                       grads_resident=s == 3, buffers_resident=s == 3,
                       bucket_elements=eng.reduce_bucket if s in (1, 2) and
                       not eng.fp32_accum else 0,
                       head_grad=p * arch.vocab * arch.head_in if (s == 0 or eng.fp32_accum)
                       and not value_head and nt == n else 0.0,
                       hp_grads=hp_grads)


def frozen_model(arch: Arch, eng: Engine, *, role: str, source: str, world_size: int,
                 value_head: bool = False) -> ModelMemory:
    """A model without optimizer (PPO's reference and reward models): weights only."""
    p = eng.elem
    n = (arch.backbone_params + arch.head_in) if value_head else arch.params
    if eng.stage == 3:
        gathered = p * min(n, arch.largest_tensor + eng.prefetch)
        weights = (0.0 if eng.offload_param else p * n / world_size) + gathered
    else:
        weights = p * n
    return ModelMemory(role=role, source=source, params=n, trainable=0, stage=eng.stage,
                       offload=eng.offload_param, weights=weights)


def activation_bytes(arch: Arch, tokens: int, elem: int, *, checkpointing: bool,
                     dropout: float | None = None) -> float:
    """Activations of one training forward + backward over `tokens` tokens (B x S)."""
    layer = tokens * arch.activation_bytes(elem, dropout)
    # the final norm's and the head's inputs, the embedding dropout's mask
    base = tokens * (2 * elem * arch.hidden + (arch.hidden if arch.residual_dropout(dropout) else 0))
    if checkpointing:
        # each layer's input is kept; backward recomputes one layer and holds its gradients
        return arch.layers * tokens * elem * arch.hidden + 2 * layer + base
    return arch.layers * layer + layer + base


def forward_bytes(arch: Arch, tokens: int, elem: int) -> float:
    """Working set of a no-grad forward (scoring, eval, generation prefill): about one layer's
    activations at a time, bounded by the training figure."""
    return tokens * (arch.activation_bytes(elem, 0.0) + 2 * elem * arch.hidden)


def _backward_peak(m: ModelMemory, act: float, logits_peak: float, logits_after: float,
                   one_layer: float, grad_accum: int) -> float:
    """This model's activations, logits and gradient-side memory at the worst moment of its
    forward + backward pass, from three moments (weight gradients appear layer by layer while
    the activations of those layers are freed, so between them memory stays below the larger):
      start  the loss's backward: every activation and the logits' fp32 gradients (`logits_peak`),
             no weight gradient yet;
      head   the first weight gradient (the output head's): the logits are down to their bf16
             gradient (`logits_after`), DeepSpeed's ZeRO-1/2 reduce buckets are allocated;
      end    all gradients (ZeRO-1/2: the partition, filled from the buckets), one layer's work.
    ZeRO-1/2 allocate the gradient partition when the first bucket is full: the layers whose
    gradients filled it have freed their activations. Gradient accumulation at ZeRO-0/1 keeps
    the previous micro-batches' gradients throughout."""
    if m.stage == 3:
        return act + logits_peak  # gradient buffer and bucket are resident
    buckets = m.buffers if m.stage in (1, 2) else 0.0
    if grad_accum > 1 and m.stage in (0, 1):
        return m.grads + buckets + act + logits_peak
    start = act + logits_peak
    head = act + logits_after + buckets + m.head_grad
    end = m.grads + buckets + one_layer
    moments = [start, head, end]
    if m.bucket_elements and m.trainable > m.bucket_elements:
        left = 1.0 - m.bucket_elements / m.trainable
        moments.append(act * left + buckets + m.grads)
    return max(moments)


@dataclass
class Estimate:
    """The plan of one step: per-model memory and the per-phase peaks (bytes per GPU)."""
    step: str  # sft, reward, dpo, ppo
    world_size: int
    dtype: str
    models: list[ModelMemory]
    phases: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k])

    @property
    def peak(self) -> float:
        return self.phases[self.peak_phase]

    @property
    def overhead(self) -> float:
        return overhead_bytes(self.peak, self.world_size)


def estimate_single(step: str, arch: Arch, ds: dict, *, source: str, world_size: int,
                    micro_batch: int, eval_batch: int, seq_len: int, checkpointing: bool,
                    lora_dim: int, lora_filter: str, only_lora: bool,
                    dropout: float | None) -> Estimate:
    """Step 1 (sft: causal LM with its loss) or step 2 (reward: backbone + value head on
    chosen and rejected sequences, so 2 x micro_batch sequences)."""
    eng = Engine.from_ds(ds)
    reward = step == "reward"
    m = trained_model(arch, eng, role="reward model" if reward else "actor", source=source,
                      world_size=world_size, lora_dim=lora_dim, lora_filter=lora_filter,
                      only_lora=only_lora, value_head=reward)
    e = eng.elem
    seqs = 2 * micro_batch if reward else micro_batch
    tokens = seqs * seq_len
    act = activation_bytes(arch, tokens, e, checkpointing=checkpointing, dropout=dropout)
    logits = 0.0 if reward else 12.0 * tokens * arch.vocab
    one_layer = tokens * arch.activation_bytes(e, dropout)
    transient = act + logits
    train = m.resident + _backward_peak(m, act, logits, 0.0 if reward else e * tokens * arch.vocab,
                                        one_layer, eng.grad_accum)
    eval_tokens = (2 if reward else 1) * eval_batch * seq_len
    eval_logits = 0.0 if reward else (e + (4 if e < 4 else 0) + 4) * eval_tokens * arch.vocab
    phases = {
        "training forward + backward": train,
        "optimizer step": m.resident + m.grads + m.step_extra,
        "evaluation": m.resident + eval_logits + forward_bytes(arch, eval_tokens, e),
    }
    m = replace(m, activations=transient)
    return Estimate(step=step, world_size=world_size, dtype=eng.dtype, models=[m], phases=phases)


def estimate_dpo(arch: Arch, configs: dict[str, dict], *, source: str, world_size: int,
                 micro_batch: int, eval_batch: int, seq_len: int, checkpointing: bool,
                 lora_dim: int, lora_filter: str, only_lora: bool, dropout: float | None,
                 reference: str) -> Estimate:
    """DPO (`dschat dpo`): the policy trains on 2 x micro_batch sequences per micro-batch (the
    chosen and the rejected row of each pair, each up to seq_len tokens) against a frozen
    reference, which is (`reference`)
      "copy"          a second model held for the whole run (configs["ref"]: a full replica
                      below ZeRO-3, partitioned at ZeRO-3, in CPU memory with
                      --offload-reference-model), scoring each batch before the policy's pass;
      "precomputed"   that copy scoring every pair once, `eval_batch` pairs at a time, before the
                      policy is built; then freed (no second model while the policy trains);
      "adapters-off"  the LoRA policy itself with its adapters off (no second model).
    Logits: the policy's training forward makes bf16 logits (2B, S, V), which the logprobs'
    autograd node keeps (rlhf/logprobs.py: no fp32 copy of the whole); at the loss's backward
    they sit beside the bf16 gradient it writes (2e B per element) and one fp32 chunk, then the
    gradient alone (e B) while the output head's weight gradient is made. A no-grad forward (the
    reference's, evaluation's) holds the bf16 logits and one chunk's fp32 work.
    All rows are taken at seq_len and every position's logits counted (a pair whose answers
    differ from their first token); a shared prompt makes them fewer (steps/dpo.py computes the
    logits from the batch's first counted position)."""
    eng = Engine.from_ds(configs["model"])
    policy = trained_model(arch, eng, role="policy", source=source, world_size=world_size,
                           lora_dim=lora_dim, lora_filter=lora_filter, only_lora=only_lora)
    e, V = eng.elem, arch.vocab
    tokens = 2 * micro_batch * seq_len
    eval_tokens = 2 * eval_batch * seq_len
    act = activation_bytes(arch, tokens, e, checkpointing=checkpointing, dropout=dropout)
    logits = 2 * e * tokens * V + logprob_chunk_bytes(tokens, V, 4)
    one_layer = tokens * arch.activation_bytes(e, dropout)

    def scoring(n: int) -> float:  # a no-grad forward over n tokens with its logprobs
        return e * n * V + logprob_chunk_bytes(n, V, 8) + forward_bytes(arch, n, e)

    ref = None
    if reference != "adapters-off":
        ref = frozen_model(arch, Engine.from_ds(configs["ref"]), role="ref",
                           source=f"{source} (frozen copy)", world_size=world_size)
    resident = policy.resident + (ref.weights if reference == "copy" else 0.0)
    # with gradient accumulation at ZeRO-0/1 the reference scores the next micro-batch while the
    # policy's gradients of the previous ones are held
    held = policy.grads if eng.grad_accum > 1 and policy.stage in (0, 1) else 0.0
    phases: dict[str, float] = {}
    notes = [f"{micro_batch} pair(s) per micro-batch = {2 * micro_batch} sequences (chosen + "
             f"rejected) of up to {seq_len} tokens per GPU"]
    if reference == "precomputed":
        phases["reference precompute"] = ref.weights + scoring(eval_tokens)
        notes.append("--precompute-ref-logprobs: the reference copy scores every pair once before "
                     "the policy is built, then is freed; it is not in memory while the policy "
                     "trains")
        ref = replace(ref, role="ref (before training)", activations=scoring(eval_tokens))
    else:
        phases["reference forward"] = resident + held + scoring(tokens)
        if ref is not None:
            ref = replace(ref, activations=scoring(tokens))
        else:
            notes.append("the reference is the policy with its LoRA adapters off: no second model")
    phases["policy forward + backward"] = resident + _backward_peak(
        policy, act, logits, e * tokens * V, one_layer, eng.grad_accum)
    phases["optimizer step"] = resident + policy.grads + policy.step_extra
    phases["evaluation"] = resident + scoring(eval_tokens)
    models = [replace(policy, activations=act + logits)] + ([ref] if ref is not None else [])
    return Estimate(step="dpo", world_size=world_size, dtype=eng.dtype, models=models,
                    phases=phases, notes=notes)


def fused_qkv_bytes(a: Arch, elem: int, tp: int = 1, *, lora_dim: int = 0,
                    lora_filter: str = "") -> float:
    """The fast engine's copy of every attention layer's q/k/v weights as one matrix
    (generation/fused.py); none where peft wraps them (LoRA on q/k/v: left separate)."""
    groups: dict[str, list] = {}
    for lin in a.linears:
        owner, _, leaf = lin.name.rpartition(".")
        if leaf in ("q_proj", "k_proj", "v_proj"):
            groups.setdefault(owner, []).append(lin)
    wrapped = tp == 1 and lora_dim > 0  # the tensor-parallel replica holds plain Linears
    return elem * sum(lin.fan_in * lin.fan_out for group in groups.values() if len(group) == 3
                      and not (wrapped and any(lora_filter in lin.name for lin in group))
                      for lin in group) / tp


def estimate_ppo(archs: dict[str, Arch], configs: dict[str, dict], sources: dict[str, str], *,
                 world_size: int, generation_batch: int, training_batch: int,
                 generation_batches: int, ppo_epochs: int, max_prompt_seq_len: int, max_answer_seq_len: int,
                 actor_checkpointing: bool, critic_checkpointing: bool,
                 actor_lora: tuple[int, str, bool], critic_lora: tuple[int, str, bool],
                 actor_dropout: float | None, critic_dropout: float | None,
                 unsupervised: bool, ema: bool, generation_engine: str = "hf",
                 generation_tp: int = 1, samples_per_prompt: int = 1) -> Estimate:
    """Step 3: actor and critic train; ref and reward are frozen. `archs` and `sources` are keyed
    actor / critic / ref / reward; `configs` are the DeepSpeed configs by the same keys. Without
    a "critic" in `archs` (a critic-free estimator: grpo, rloo, ...) there is no critic at all: no
    weights, gradients, optimizer states, activations or training phases.
    `generation_batch` counts prompts; a rollout holds `generation_batch` x `samples_per_prompt`
    answers, and generation (KV cache, sampling buffers, prefill) and scoring are sized for them.
    `generation_engine`: "fast" keeps one static KV cache of the full length for the whole run
    (generation/fast.py reuses it for every rollout), "hf" grows a dynamic cache per rollout and
    frees it. `generation_tp` > 1: the tensor-parallel replica of the actor (generation/
    tensor_parallel.py) stays allocated, the group's prompts are decoded together.
    `generation_batches` and `ppo_epochs` (how many mini-batches an update trains on) no longer
    move the peak: no mini-batch's logits outlive its actor backward (they did while the learner
    held them until the next mini-batch)."""
    has_critic = "critic" in archs
    roles = ("actor", "critic", "ref", "reward") if has_critic else ("actor", "ref", "reward")
    eng = {k: Engine.from_ds(configs[k]) for k in roles}
    D = world_size
    actor = trained_model(archs["actor"], eng["actor"], role="actor", source=sources["actor"],
                          world_size=D, lora_dim=actor_lora[0], lora_filter=actor_lora[1],
                          only_lora=actor_lora[2])
    critic = trained_model(archs["critic"], eng["critic"], role="critic", source=sources["critic"],
                           world_size=D, lora_dim=critic_lora[0], lora_filter=critic_lora[1],
                           only_lora=critic_lora[2], value_head=True) if has_critic else None
    ref = frozen_model(archs["ref"], eng["ref"], role="ref", source=sources["ref"], world_size=D)
    reward = frozen_model(archs["reward"], eng["reward"], role="reward", source=sources["reward"],
                          world_size=D, value_head=True)
    a = archs["actor"]
    e = eng["actor"].elem
    S, A, V = max_prompt_seq_len + max_answer_seq_len, max_answer_seq_len, a.vocab
    # rows of a rollout: every prompt is repeated for each of its answers (no shared prefix)
    Bg, Bt = generation_batch * samples_per_prompt, training_batch
    notes: list[str] = []
    if samples_per_prompt > 1:
        notes.append(f"a rollout holds {generation_batch} prompts x {samples_per_prompt} answers "
                     f"= {Bg} sequences per GPU: generation and scoring are sized for them")
    if not has_critic:
        notes.append("no critic: the advantage estimator needs none (no critic weights, "
                     "gradients, optimizer states or training)")

    ema_bytes = 0.0
    if ema and actor.stage != 3:  # rank 0 keeps an fp32 copy beside the model (ZeRO-3: on CPU)
        ema_bytes = 4.0 * actor.params
        notes.append(f"--enable-ema keeps an fp32 copy of the actor on GPU 0 "
                     f"({ema_bytes / GiB:.1f} GiB, included)")
    resident = actor.resident + (critic.resident if critic else 0.0) + ref.weights \
        + reward.weights + ema_bytes

    # 1. generate: keys and values of the whole batch at full length (the fast engine's static
    # cache, or HF's dynamic cache at its end, which grows by concatenation: one layer twice);
    # ZeRO-3 gathers the whole actor for the rollout
    kv = 2.0 * a.layers * Bg * S * a.kv_dim * e
    T = max(1, generation_tp)
    if generation_engine == "fast":
        # the cache stays allocated between rollouts; sampling buffers of (B, vocab): the logits
        # in fp32, the noise, the probabilities (captured in the CUDA graph's pool). With T-way
        # tensor parallelism every GPU decodes T x B rows with 1/T of the heads: the same cache
        kv_resident, sampling = kv, 16.0 * T * Bg * V
        notes.append(f"the fast generation engine keeps its static KV cache ({kv / GiB:.1f} GiB) "
                     "allocated through training, so it counts in every phase")
        # (not under ZeRO-3 without tensor parallelism: there the weights are gathered afresh
        # for each rollout, and the engine does not fuse them)
        fused = fused_qkv_bytes(a, e, T, lora_dim=actor_lora[0], lora_filter=actor_lora[1]) \
            if (actor.stage != 3 or T > 1) else 0.0
        if fused:
            resident += fused
            notes.append(f"it also keeps each attention layer's q/k/v weights fused into one "
                         f"matrix ({fused / GiB:.2f} GiB)")
    else:
        kv_resident, sampling = 0.0, 0.0
        kv += 2.0 * Bg * S * a.kv_dim * e
    resident += kv_resident
    if T > 1:
        from dschat_cli.generation.tp_layouts import LAYOUTS

        layout = LAYOUTS.get(a.model_type)
        names = (layout.column + layout.row) if layout else ()
        split = sum(lin.fan_in * lin.fan_out for lin in a.linears
                    if lin.name.rpartition(".")[2] in names)
        replica = e * (a.params - split + split / T)
        resident += replica
        gathered = 0.0  # the replica is refreshed a chunk of parameters at a time
        notes.append(f"--generation-tensor-parallel {T} keeps a copy of the actor with 1/{T} of "
                     f"its attention and MLP weights on every GPU ({replica / GiB:.1f} GiB)")
    else:
        gathered = e * actor.params if actor.stage == 3 else 0.0
    if gathered:
        notes.append(f"under ZeRO-3 each rollout gathers the whole actor on every GPU "
                     f"({gathered / GiB:.1f} GiB)")
    generation = resident - kv_resident + kv + sampling + gathered \
        + forward_bytes(a, T * Bg * max_prompt_seq_len, e)
    # 2. score: the actor's and the ref's forward make bf16 logits of the A + 1 answer positions
    # only (logits_to_keep), scored one fp32 chunk at a time (rlhf/logprobs.py)
    score_logits = e * Bg * (A + 1) * V + logprob_chunk_bytes(Bg * A, V, 8)
    scoring = resident + score_logits + forward_bytes(a, Bg * S, e)
    # 4. update, per mini-batch: actor forward/backward with its logits, then its step, then the
    # critic's. The actor's bf16 logits (Bt, A + 1, V) are kept by the logprobs' autograd node
    # only: the backward starts with them, the bf16 gradient it writes and one fp32 chunk, then
    # frees them (the gradient alone while the output head's weight gradient is made). Nothing
    # of them outlives the actor's backward: the step and the critic see no logits.
    kept_logits = e * Bt * (A + 1) * V
    actor_act = activation_bytes(a, Bt * S, e, checkpointing=actor_checkpointing,
                                 dropout=actor_dropout)
    actor_logits = 2 * kept_logits + logprob_chunk_bytes(Bt * A, V, 4)
    actor_one = Bt * S * a.activation_bytes(e, actor_dropout)
    actor_train = resident + _backward_peak(actor, actor_act, actor_logits, kept_logits,
                                            actor_one, eng["actor"].grad_accum)
    actor_step = resident + actor.grads + actor.step_extra
    phases = {"generation": generation, "scoring": scoring,
              "actor training": actor_train, "actor step": actor_step}
    if critic is not None:
        c = archs["critic"]
        critic_act = activation_bytes(c, Bt * S, e, checkpointing=critic_checkpointing,
                                      dropout=critic_dropout)
        critic_one = Bt * S * c.activation_bytes(e, critic_dropout)
        phases["critic training"] = resident + _backward_peak(
            critic, critic_act, 0.0, 0.0, critic_one, eng["critic"].grad_accum)
        phases["critic step"] = resident + critic.grads + critic.step_extra
    if unsupervised:  # the LM loss on pretraining text (transformers' loss over all positions)
        lm = 12.0 * Bt * S * V
        phases["unsupervised LM loss"] = resident + _backward_peak(
            actor, actor_act, lm, e * Bt * S * V, actor_one, eng["actor"].grad_accum)
    actor = replace(actor, activations=max(actor_act + actor_logits, score_logits), kv_cache=kv)
    ref = replace(ref, activations=score_logits)
    reward = replace(reward, activations=forward_bytes(archs["reward"], Bg * S, e))
    models = [actor, ref, reward]
    if critic is not None:
        models.insert(1, replace(critic, activations=critic_act))
    return Estimate(step="ppo", world_size=D, dtype=eng["actor"].dtype, models=models,
                    phases=phases, notes=notes)
