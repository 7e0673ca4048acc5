"""`dschat ppo` (step 3) end to end on CPU: four models, ZeRO 0-3, LoRA, reference offload, EMA.

    dschat ppo --actor-model SFT_DIR --critic-model REWARD_DIR --data-path local/jsonfile \
        --data-dir PAIRS --data-split 0,0,10 --actor-zero-stage 3 --critic-zero-stage 3 \
        --actor-lora-dim 4 --critic-lora-dim 4 --offload-reference-model --enable-ema \
        --test-stop-step 2 --output-dir out

Every run must stop after exactly --test-stop-step PPO steps (one metrics.jsonl row per step,
train_summary.json "steps"), record itself (run_config.yaml, launch.sh, the four DeepSpeed JSONs)
and save an actor folder that AutoModelForCausalLM loads and generates with, a critic folder that
load_reward_model scores with, and with --enable-ema an actor_ema folder: all three hold trained
weights (not the initial ones) and no LoRA leftovers.

Actors are step-1 outputs (the session's `sft_run`) or a raw tiny model; critics are step-2 outputs
trained here (one in-process `dschat reward` per family, ~1.5 s). All share the tiny tokenizer.

    actor <- critic       how                  actor      critic     extra
    opt <- opt            in process           z0 full    z0 full    EMA, reference offload
    llama <- llama        in process           z2 LoRA 4  z2 LoRA 4  one mini-batch per step
    gpt2 (raw) <- opt     in process           z3 full    z1 full    EMA
    opt <- opt            in process           z0 full    z0 full    unsupervised .txt data
    opt <- opt            launcher, 2 workers  z3 LoRA 4  z3 LoRA 4  EMA, reference offload
    llama <- llama        launcher, 1 worker   z2 full    z0 full

--offload-reference-model: DeepSpeed offloads parameters only at ZeRO-3, so the reference's eval
config is promoted to stage 3 with offload_param whatever the actor's stage (checked in the JSON;
the opt z0 run exercises a stage-3 reference next to a stage-0 actor).

ZeRO-3 + LoRA generation is slow on CPU (DeepSpeed's per-submodule release hooks run for every
generated token, 0.3-0.4 s per token here vs ~0.01 s without LoRA), so that combination runs
once, with short answers.

Error cases (exit 2, one `error: WHERE: ...` line, nothing written) need no PPO run.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

PPO_FILES = ("run_config.yaml", "resolved.json", "launch.sh", "ds_config_actor.json", "ds_config_critic.json",
             "ds_config_ref.json", "ds_config_reward.json", "metrics.jsonl", "train_summary.json")
ACTOR_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json")
CRITIC_FILES = ("model.safetensors", "value_head.safetensors", "config.json", "tokenizer.json",
                "tokenizer_config.json")
STEP_KEYS = ("actor_loss", "critic_loss", "unsup_loss", "reward", "kl", "answer_length", "clipfrac",
             "value_clipfrac", "approx_kl", "advantage_mean", "return_mean", "ema_reward",
             "lr_actor")
GEN_BATCH, TRAIN_BATCH, ANSWER_LEN, EVAL_PROMPTS = 4, 2, 8, 4
ERROR_LINE = re.compile(r"^error: (?P<where>.+?): \S")
POLITE = " Of course! Start with onions and vegetables, then add stock. I hope this helps!"
RUDE = " Go away, that is a stupid question."


def ppo_args(actor: Path, critic: Path, out: Path, cache: Path, data_dir: Path, *,
             actor_stage: int, critic_stage: int, actor_lora: int = 0, critic_lora: int = 0,
             steps: int = 2, gen_batch: int = GEN_BATCH, train_batch: int = TRAIN_BATCH,
             answer_len: int = ANSWER_LEN, extra: tuple = ()) -> list:
    """A short step-3 run on the prompts of the synthetic pairs (all in step 3's share)."""
    return ["ppo", "--actor-model", actor, "--critic-model", critic,
            "--data-path", "local/jsonfile", "--data-dir", data_dir, "--data-split", "0,0,10",
            "--output-dir", out, "--data-cache-dir", cache,
            "--actor-zero-stage", str(actor_stage), "--critic-zero-stage", str(critic_stage),
            "--actor-lora-dim", str(actor_lora), "--critic-lora-dim", str(critic_lora),
            "--per-device-generation-batch-size", str(gen_batch),
            "--per-device-training-batch-size", str(train_batch),
            "--max-answer-seq-len", str(answer_len), "--test-stop-step", str(steps),
            "--max-eval-samples", str(EVAL_PROMPTS), "--num-warmup-steps", "0",
            "--actor-learning-rate", "1e-4", "--critic-learning-rate", "1e-4", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _distance(a: dict, b: dict) -> float:
    """L2 distance between two state dicts over their common keys."""
    return math.sqrt(sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a if k in b))


def _no_lora_keys(sd: dict) -> bool:
    return bool(sd) and not [k for k in sd if "lora_" in k or "base_layer" in k
                             or "base_model" in k]


def check_ppo_output(out: Path, *, steps: int, actor_stage: int, critic_stage: int,
                     actor_lora: int, critic_lora: int, base_actor: Path, reward_dir: Path,
                     ema: bool = False, ref_offload: bool = False, unsup: bool = False,
                     world_size: int = 1, launcher: bool = False, dropout_free: bool = True,
                     train_batch: int = TRAIN_BATCH, answer_len: int = ANSWER_LEN) -> dict:
    """What a finished `dschat ppo` must leave: record files, exactly `steps` metric rows, DeepSpeed
    JSONs that say what ran, and actor/critic(/actor_ema) folders that reload, with trained weights
    and no LoRA leftovers."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dschat_cli.models.reward import is_reward_dir, load_reward_model
    from dschat_cli.rlhf.reward import sequence_scores

    files = {p.name for p in out.iterdir()}
    expected = set(PPO_FILES) | {"actor", "critic"} | ({"actor_ema"} if ema else set()) \
        | ({"train.log"} if launcher else set())
    assert expected <= files, f"missing {sorted(expected - files)} in {sorted(files)}"
    assert ema == ("actor_ema" in files), sorted(files)

    # --test-stop-step: exactly `steps` PPO steps, one metrics row each
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == steps and summary["world_size"] == world_size, summary
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), rows
    vocab = json.loads((out / "actor" / "config.json").read_text())["vocab_size"]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in STEP_KEYS), r
        # the actor's entropy over its answer tokens (nats): a distribution over the vocabulary
        assert 0.0 < r["entropy"] < math.log(vocab), r
        # answers of <= 1 token count 0 (dropped); a poorly trained actor does emit eos first
        assert 0 <= r["answer_length"] <= answer_len, r
        assert 0.0 <= r["clipfrac"] <= 1.0 and 0.0 <= r["value_clipfrac"] <= 1.0, r
        assert (r["unsup_loss"] > 0) if unsup else (r["unsup_loss"] == 0.0), r
    assert max(r["answer_length"] for r in rows) > 1, rows  # something was learned from
    # step 1's experience is sampled before any update: actor == frozen reference, and both score
    # it in eval mode (dropout off), so its KL is exactly 0, with or without dropout in the model.
    if dropout_free:
        assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5), rows[0]
    else:
        assert abs(rows[0]["kl"]) < 0.1, rows[0]
    assert summary["first"] == {k: v for k, v in rows[0].items() if k != "time"}
    assert summary["last"] == {k: v for k, v in rows[-1].items() if k != "time"}
    assert math.isfinite(summary["reward_heldout_start"]), summary
    assert math.isfinite(summary["reward_heldout_end"]), summary

    # the four DeepSpeed configs
    ds = {n: json.loads((out / f"ds_config_{n}.json").read_text())
          for n in ("actor", "critic", "ref", "reward")}
    assert ds["actor"]["zero_optimization"]["stage"] == actor_stage
    assert ds["critic"]["zero_optimization"]["stage"] == critic_stage
    assert ds["actor"]["train_batch_size"] == train_batch * world_size
    ref_zero = ds["ref"]["zero_optimization"]
    # offload promotes the frozen reference to ZeRO-3 whatever the actor's stage
    assert ref_zero["stage"] == (3 if actor_stage == 3 or ref_offload else 0), ref_zero
    assert ("offload_param" in ref_zero) == ref_offload, ref_zero
    if ref_offload:
        assert ref_zero["offload_param"]["device"] == "cpu"
    reward_zero = ds["reward"]["zero_optimization"]
    assert reward_zero["stage"] == (3 if critic_stage == 3 else 0) and \
        "offload_param" not in reward_zero, reward_zero
    assert "optimizer" not in ds["ref"] and "optimizer" not in ds["reward"]

    run_cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_cfg["train"]["test_stop_step"] == steps
    assert run_cfg["deepspeed"]["actor_zero_stage"] == actor_stage
    assert run_cfg["deepspeed"]["critic_zero_stage"] == critic_stage
    assert run_cfg["deepspeed"]["offload_reference_model"] == ref_offload
    assert run_cfg["actor_lora"]["lora_dim"] == actor_lora
    assert run_cfg["critic_lora"]["lora_dim"] == critic_lora
    assert run_cfg["ppo"]["enable_ema"] == ema
    launch_sh = (out / "launch.sh").read_text()
    if launcher:
        assert "deepspeed.launcher.runner" in launch_sh and "dschat_cli.worker ppo" in launch_sh
        assert f"--num_gpus {world_size}" in launch_sh, launch_sh
    else:
        assert "--launcher none" in launch_sh

    # the actor: a plain causal LM folder that generates, with trained (LoRA-merged) weights
    base = _weights(base_actor)
    actor_sd = _weights(out / "actor")
    assert {p.name for p in (out / "actor").iterdir()} >= set(ACTOR_FILES)
    assert _no_lora_keys(actor_sd) and set(actor_sd) <= set(base) | {"lm_head.weight"}
    moved = _distance(actor_sd, base)
    assert moved > 0, "the saved actor holds the initial weights"
    tok = AutoTokenizer.from_pretrained(out / "actor")
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(base_actor).get_vocab()
    enc = tok([" Human: How do I bake bread? Assistant:"], return_tensors="pt")
    prompt_len = enc["input_ids"].shape[1]
    for folder in ("actor", "actor_ema") if ema else ("actor",):
        model = AutoModelForCausalLM.from_pretrained(out / folder).eval()
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        assert gen.shape[0] == 1 and gen.shape[1] > prompt_len, folder
        assert isinstance(tok.decode(gen[0, prompt_len:]), str)

    # EMA (beta 0.992, updated after each of the few actor updates): moved from the start, but
    # far less than the actor itself (observed ratio 0.01-0.04 for 2-3 steps)
    if ema:
        ema_sd = _weights(out / "actor_ema")
        assert set(ema_sd) == set(actor_sd) and _no_lora_keys(ema_sd)
        ema_moved = _distance(ema_sd, base)
        assert 0 < ema_moved < 0.25 * moved, (ema_moved, moved)

    # the critic: a reward folder (trained from the reward model) that scores
    assert is_reward_dir(out / "critic")
    assert {p.name for p in (out / "critic").iterdir()} >= set(CRITIC_FILES)
    critic_sd = _weights(out / "critic")
    assert _no_lora_keys(critic_sd) and set(critic_sd) == set(_weights(reward_dir))
    assert _distance(critic_sd, _weights(reward_dir)) > 0, "the saved critic was not trained"
    critic = load_reward_model(out / "critic").eval()
    texts = [" Human: How do I make soup? Assistant:" + a for a in (POLITE, RUDE)]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = sequence_scores(critic(batch["input_ids"], batch["attention_mask"]),
                                 batch["attention_mask"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    return summary


def check_one_line_error(result, where: str) -> None:
    assert result.code == 2, result.explain()
    assert "Traceback" not in result.output, result.explain()
    errors = [ln for ln in result.output.splitlines() if "error:" in ln]
    assert len(errors) == 1, result.explain()
    m = ERROR_LINE.match(errors[0].strip())
    assert m and m.group("where") == where, result.explain()


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, pairs_dir, tmp_path_factory, invoke_dschat):
    """Factory: reward_dir("opt") -> a step-2 folder (in-process `dschat reward`, one epoch on the
    pairs: held-out accuracy ~1.0), trained once per family."""
    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            root = tmp_path_factory.mktemp(f"ppo_reward_{family}")
            r = invoke_dschat("reward", "--model", tiny_model_dir(family),
                              "--data-path", "local/jsonfile", "--data-dir", pairs_dir,
                              "--data-split", "0,10,0", "--output-dir", root / "out",
                              "--data-cache-dir", root / "data-cache", "--num-train-epochs", "1",
                              "--learning-rate", "1e-3", "--per-device-train-batch-size", "16",
                              "--max-seq-len", "128", "--launcher", "none")
            assert r.code == 0, r.explain()
            cache[family] = root / "out"
        return cache[family]

    return make


@pytest.fixture(scope="module")
def actor_dir(sft_run):
    """Factory: actor_dir("opt") -> the session's step-1 output (ZeRO-0, LoRA 8, merged)."""
    def get(family: str) -> Path:
        result, out = sft_run(family, 0, 8)
        assert result.code == 0, result.explain()
        return out

    return get


@pytest.fixture(scope="module")
def unsup_txt(tmp_path_factory) -> Path:
    """A local pre-training text file, one document per line."""
    from dschat_cli.models.local_tokenizer import default_corpus

    path = tmp_path_factory.mktemp("unsup") / "corpus.txt"
    path.write_text("\n".join(default_corpus(n=200, seed=3)) + "\n", encoding="utf-8")
    return path


# --- training runs --------------------------------------------------------------------------------

# id -> (actor: ("sft"|"raw", family), critic family, actor stage, critic stage, actor LoRA,
#        critic LoRA, steps, EMA, reference offload, training batch, extra flags)
IN_PROCESS = {
    # the reference generation path (transformers' generate); the others use the fast engine
    "opt-z0-full-ema-refoffload": (("sft", "opt"), "opt", 0, 0, 0, 0, 3, True, True, 2,
                                   ("--generation-engine", "hf")),
    # one mini-batch per step and a model without dropout: the first (only) update of each step
    # starts from exactly the rollout policy, so the PPO ratio is 1 (approx_kl 0, no clipping):
    # the old logprobs from the same forward pass (the engine's agree to ~1e-7, not exactly)
    "llama-z2-lora": (("sft", "llama"), "llama", 2, 2, 4, 4, 2, False, False, 4,
                      ("--old-logprobs", "forward")),
    # old logprobs from the fast engine's sampling pass, checked against a forward every 2
    # also the adaptive KL coefficient (checked below) and the missing-eos penalty
    "gpt2raw-z3-full-ema": (("raw", "gpt2"), "opt", 3, 1, 0, 0, 3, True, False, 2,
                            ("--old-logprobs", "generation", "--parity-check-interval", "2",
                             "--kl-target", "0.5", "--kl-horizon", "20",
                             "--missing-eos-penalty", "1.0")),
    # regression: OPT has dropout 0.1; rollouts must be scored with dropout off (eval mode), so
    # with LoRA (identical to the reference at step 1) the step-1 KL is exactly 0 (the PPO update
    # itself runs in train mode, with dropout, as the reference does); old logprobs: the default
    # (auto)
    "opt-z0-lora-dropout": (("sft", "opt"), "opt", 0, 0, 4, 0, 2, False, False, 4, ()),
}


@pytest.mark.parametrize("case", list(IN_PROCESS))
def test_ppo_in_process(case, tmp_path, actor_dir, reward_dir, tiny_model_dir, pairs_dir,
                        invoke_dschat):
    (kind, fam), critic_fam, a_stage, c_stage, a_lora, c_lora, steps, ema, ref_off, tb, extra = \
        IN_PROCESS[case]
    actor = actor_dir(fam) if kind == "sft" else tiny_model_dir(fam)
    critic = reward_dir(critic_fam)
    out, cache = tmp_path / "out", tmp_path / "data-cache"
    flags = (*extra, "--launcher", "none") + (("--enable-ema",) if ema else ()) \
        + (("--offload-reference-model",) if ref_off else ())
    r = invoke_dschat(*ppo_args(actor, critic, out, cache, pairs_dir, actor_stage=a_stage,
                                critic_stage=c_stage, actor_lora=a_lora, critic_lora=c_lora,
                                steps=steps, train_batch=tb, extra=flags))
    assert r.code == 0, r.explain()
    assert "Traceback" not in r.output
    assert "ppo summary" in r.output and "held-out reward (before -> after)" in r.output
    assert f"actor ZeRO-{a_stage} / critic ZeRO-{c_stage};" in r.output, r.explain()
    assert f"{steps} PPO steps of {GEN_BATCH} prompts" in r.output, r.explain()
    check_ppo_output(out, steps=steps, actor_stage=a_stage, critic_stage=c_stage,
                     actor_lora=a_lora, critic_lora=c_lora, base_actor=actor, reward_dir=critic,
                     ema=ema, ref_offload=ref_off, train_batch=tb,
                     dropout_free=True)  # rollouts are scored in eval mode: no dropout noise
    assert any(cache.iterdir()), "tokenised prompts not cached in --data-cache-dir"
    if "--kl-target" in extra:  # Ziegler's rule, from the logged KL of each update
        rows = read_jsonl(out / "metrics.jsonl")
        assert rows[0]["kl_coef"] == pytest.approx(0.1), rows[0]
        for before, after in zip(rows, rows[1:]):
            error = min(max(before["kl"] / 0.5 - 1.0, -0.2), 0.2)
            assert after["kl_coef"] == pytest.approx(
                before["kl_coef"] * (1 + error * GEN_BATCH / 20), rel=1e-5), (before, after)
        assert rows[-1]["kl_coef"] != pytest.approx(0.1), rows
    else:
        assert all(r["kl_coef"] == 0.1 for r in read_jsonl(out / "metrics.jsonl"))
    if "--generation-engine" not in extra and "--old-logprobs" not in extra:
        # the default, auto: rollout 1 (the held-out start) is scored by the forward pass and
        # checked; fp32 on CPU agrees to ~1e-6 nats, so the engine's are used from rollout 2
        assert "old logprobs: from the fast engine's sampling pass from rollout 2 on" in r.output
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["old_logprobs"] == "fast engine's sampling pass (from rollout 2)"
        # --compile-decode auto on CPU: said so in the log and the summary
        assert "decode step: uncompiled (--compile-decode auto: on CPU)" in r.output
        assert summary["decode_step"] == "uncompiled (--compile-decode auto: on CPU)"
    if "--old-logprobs" in extra and "generation" in extra:  # checked on rollouts 1 and 3: fp32
        # on CPU, same numbers
        rows = read_jsonl(out / "metrics.jsonl")
        assert all(0.0 <= row["logprob_gap"] < 1e-4 for row in rows), rows
    if tb == GEN_BATCH and fam == "llama":  # no dropout anywhere: the PPO ratio is exactly 1
        rows = read_jsonl(out / "metrics.jsonl")
        assert all(r["approx_kl"] == 0.0 and r["clipfrac"] == 0.0 for r in rows), rows


def test_ppo_stops_when_fast_generation_disagrees_with_forward(tmp_path, actor_dir, reward_dir,
                                                                pairs_dir, invoke_dschat,
                                                                monkeypatch):
    """The parity gate: logprobs from a broken engine stop the run before any update."""
    from dschat_cli.generation.fast import FastGenerator, Generated

    real_generate = FastGenerator.generate

    def broken(self, input_ids, attention_mask):
        out = real_generate(self, input_ids, attention_mask)
        return Generated(out.seq, out.logprobs - 0.5)  # off by half a nat everywhere

    monkeypatch.setattr(FastGenerator, "generate", broken)
    out = tmp_path / "out"
    r = invoke_dschat(*ppo_args(actor_dir("opt"), reward_dir("opt"), out, tmp_path / "cache",
                                pairs_dir, actor_stage=0, critic_stage=0, steps=2,
                                extra=("--launcher", "none")))
    assert r.code == 1, r.explain()
    assert "fast generation disagrees with the actor's forward pass at rollout" in r.output
    assert "--generation-engine hf" in r.output
    assert not (out / "actor").exists()


def test_ppo_unsupervised_txt(tmp_path, actor_dir, reward_dir, pairs_dir, unsup_txt,
                              invoke_dschat):
    """--unsupervised-dataset-name with a local .txt file: its LM loss is mixed into the actor's
    updates and logged (> 0) at every step; its blocks are cached beside the prompts."""
    actor, critic = actor_dir("opt"), reward_dir("opt")
    out, cache = tmp_path / "out", tmp_path / "data-cache"
    r = invoke_dschat(*ppo_args(actor, critic, out, cache, pairs_dir, actor_stage=0,
                                critic_stage=0, steps=2,
                                extra=("--launcher", "none", "--max-prompt-seq-len", "32",
                                       "--unsupervised-dataset-name", unsup_txt,
                                       "--unsup-coef", "1.0")))
    assert r.code == 0, r.explain()
    assert "Traceback" not in r.output
    summary = check_ppo_output(out, steps=2, actor_stage=0, critic_stage=0, actor_lora=0,
                               critic_lora=0, base_actor=actor, reward_dir=critic, unsup=True)
    rows = read_jsonl(out / "metrics.jsonl")
    # an LM loss of a model that has seen this kind of text, not a broken batch (0, nan, huge)
    assert all(0.5 < row["unsup_loss"] < 20 for row in rows), rows
    # tokenised prompts and unsupervised blocks, both under --data-cache-dir
    assert len([p for p in cache.iterdir() if p.is_dir()]) >= 2, sorted(cache.iterdir())
    assert summary["last"]["unsup_loss"] == rows[-1]["unsup_loss"]
    import yaml

    run_cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_cfg["data"]["unsupervised_dataset_name"] == str(unsup_txt)


@pytest.mark.slow
@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_ppo_launcher_two_workers_zero3_lora(tensor_parallel, tmp_path, actor_dir, reward_dir,
                                             pairs_dir, run_dschat):
    """The done-when command through deepspeed.launcher on 2 ranks: actor and critic ZeRO-3 with
    LoRA (merged when saving), the reference offloaded, EMA; answers kept short (ZeRO-3 + LoRA
    generation is the slow part on CPU). Also with tensor-parallel generation over the 2 ranks
    (adapters merged into the sharded copy; the first rollout's logprobs are checked against the
    actor's own forward before --old-logprobs auto uses them, so a wrong copy stops the run; the
    ranks decide from the largest gap, so under ZeRO-3 they skip the scoring forward together)."""
    actor, critic = actor_dir("opt"), reward_dir("opt")
    out, cache = tmp_path / "out", tmp_path / "data-cache"
    r = run_dschat(*ppo_args(actor, critic, out, cache, pairs_dir, actor_stage=3, critic_stage=3,
                             actor_lora=4, critic_lora=4, steps=2, gen_batch=2, train_batch=2,
                             extra=("--deployment-type", "single_node", "--num-gpus", "2",
                                    "--offload-reference-model", "--enable-ema",
                                    "--generation-tensor-parallel", str(tensor_parallel))),
                   timeout=300)
    assert r.code == 0, r.explain()
    assert "Traceback" not in r.output, r.explain()
    assert "launching 2 worker(s)" in r.output, r.explain()
    tail = r.output[r.output.index("ppo summary"):]
    for row in ("PPO steps", "held-out reward (before -> after)", "KL to reference (last step)",
                "saved"):
        assert row in tail, r.explain()
    assert "actor_ema" in tail, r.explain()
    assert "2 rank(s) on cpu" in r.output and "2 PPO steps of 4 prompts" in r.output
    check_ppo_output(out, steps=2, actor_stage=3, critic_stage=3, actor_lora=4, critic_lora=4,
                     base_actor=actor, reward_dir=critic, ema=True, ref_offload=True,
                     world_size=2, launcher=True)
    log = (out / "train.log").read_text()
    assert "ppo summary" in log and "\x1b[" not in log
    assert any(cache.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("actor_stage,critic_stage", [(2, 0)])
def test_ppo_launcher_one_worker_full(actor_stage, critic_stage, tmp_path, actor_dir, reward_dir,
                                      pairs_dir, run_dschat):
    """One worker through deepspeed.launcher, full fine-tuning, --test-stop-step 3: a ZeRO-2 actor
    next to a ZeRO-0 critic (with the two-worker ZeRO-3 run above, the actor runs at ZeRO 2 and 3
    through the launcher; the other stage combinations run in process)."""
    actor, critic = actor_dir("llama"), reward_dir("llama")
    out, cache = tmp_path / "out", tmp_path / "data-cache"
    r = run_dschat(*ppo_args(actor, critic, out, cache, pairs_dir, actor_stage=actor_stage,
                             critic_stage=critic_stage, steps=3), timeout=300)
    assert r.code == 0, r.explain()
    assert "Traceback" not in r.output, r.explain()
    assert "3 PPO steps of 4 prompts" in r.output, r.explain()
    check_ppo_output(out, steps=3, actor_stage=actor_stage, critic_stage=critic_stage,
                     actor_lora=0, critic_lora=0, base_actor=actor, reward_dir=critic,
                     launcher=True, dropout_free=True)


# --- errors ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_tokenizer_reward(tmp_path_factory) -> Path:
    """A reward folder (as save_reward_model writes it) whose tokenizer has another vocabulary."""
    from transformers import AutoModel

    from dschat_cli.models.local_tokenizer import build_local_tokenizer
    from dschat_cli.models.reward import RewardModel, save_reward_model
    from dschat_cli.models.tiny import save_tiny_model

    tok = build_local_tokenizer(vocab_size=300)
    base = save_tiny_model("opt", tmp_path_factory.mktemp("othertok_opt"), tokenizer=tok)
    out = tmp_path_factory.mktemp("othertok_reward")
    save_reward_model(RewardModel(AutoModel.from_pretrained(base)), tok, out, zero_stage=0,
                      is_main=True)
    return out


# case -> (flags added to an otherwise valid command, WHERE of the error line)
BAD = {
    "critic-is-sft-folder": ((), "--critic-model"),  # an SFT (causal LM) folder as critic
    "critic-other-tokenizer": ((), "--critic-model"),
    "training-batch-not-dividing": (("--per-device-generation-batch-size", "4",
                                     "--per-device-training-batch-size", "3"),
                                    "--per-device-training-batch-size"),
    "offload-with-actor-zero0": (("--offload", "--actor-zero-stage", "0",
                                  "--critic-zero-stage", "2"), "--offload"),
    "only-optimize-lora-without-dim": (("--actor-only-optimize-lora",),
                                       "--actor-only-optimize-lora"),
    "missing-critic-model": ((), "--critic-model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_ppo_bad_input(case, tmp_path, actor_dir, reward_dir, other_tokenizer_reward, pairs_dir,
                       invoke_dschat):
    actor = actor_dir("opt")
    critic = {"critic-is-sft-folder": actor,
              "critic-other-tokenizer": other_tokenizer_reward,
              "missing-critic-model": None}.get(case, reward_dir("opt"))
    flags, where = BAD[case]
    out, cache = tmp_path / "out", tmp_path / "data-cache"
    args = ["ppo", "--actor-model", actor, "--data-path", "local/jsonfile", "--data-dir",
            pairs_dir, "--data-split", "0,0,10", "--output-dir", out, "--data-cache-dir", cache,
            "--launcher", "none", "--test-stop-step", "1", "--max-answer-seq-len", "4"]
    if critic is not None:
        args += ["--critic-model", critic]
    args += list(flags)
    r = invoke_dschat(*args)
    check_one_line_error(r, where)
    assert not out.exists(), sorted(p.name for p in out.iterdir())
    assert not cache.exists()
    if case == "critic-is-sft-folder":
        assert "dschat reward" in r.output  # says how to make one
    if case == "critic-other-tokenizer":
        assert "different tokenizer" in r.output and str(other_tokenizer_reward) in r.output



# --- experience pooled over rollouts, mini-batches, schedule ---------------------------------------

def test_minibatches_span_rollouts_one_step_each_and_the_plan_agrees(tmp_path, actor_dir,
                                                                     reward_dir, pairs_dir,
                                                                     invoke_dschat):
    """Generation batch 4 x --generation-batches 2 with a training batch of 8: the experience of
    two rollouts is pooled, then cut into one mini-batch of 8 (as DeepSpeed-Chat does). 4 PPO
    steps = 2 updates = 2 optimizer steps, which the cosine schedule (no warm-up) is sized for:
    the LR after the last one is its minimum, 0. `dschat plan ppo` says 2 as well."""
    actor, critic = actor_dir("opt"), reward_dir("opt")
    out, cache = tmp_path / "out", tmp_path / "data-cache"
    args = ppo_args(actor, critic, out, cache, pairs_dir, actor_stage=0, critic_stage=0,
                    steps=4, gen_batch=4, train_batch=8,
                    extra=("--generation-batches", "2", "--lr-scheduler-type", "cosine",
                           "--launcher", "none"))
    r = invoke_dschat(*args)
    assert r.code == 0, r.explain()
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["step"] for row in rows] == [2, 4], rows  # one row per update
    summary = json.loads((out / "train_summary.json").read_text())
    steps = summary["optimizer_steps"]
    assert steps["actor"] == steps["critic"] == steps["planned_actor"] == 2, steps
    # cosine over 2 steps: 1e-4 * 0.5 * (1 + cos(pi * 1 / 2)) = 5e-5 after the first, 0 after the
    # second (an LR schedule sized for another step count ends elsewhere)
    assert rows[0]["lr_actor"] == pytest.approx(5e-5, rel=1e-6), rows
    assert rows[-1]["lr_actor"] == pytest.approx(0.0, abs=1e-12), rows

    from typer.testing import CliRunner

    from dschat_cli.cli.app import app

    plan_args = [str(a) for a in args[1:] if str(a) not in ("--launcher", "none")]
    plan = CliRunner().invoke(app, ["plan", "ppo", *plan_args, "--gpu-memory", "80", "--json"],
                              terminal_width=200)
    assert plan.exit_code == 0, plan.output
    lines = {x["what"]: x["value"] for x in json.loads(plan.output)["schedule"]}
    assert lines["optimizer steps"] == "actor 2, critic 2", lines


def test_minibatch_with_no_real_answer_takes_no_step(tmp_path, actor_dir, reward_dir, pairs_dir,
                                                     invoke_dschat, monkeypatch):
    """Every answer is eos at once (<= 1 token: dropped, its action mask all zero): no mini-batch
    has anything to learn from, so no backward and no optimizer or LR-scheduler step is taken
    (the LR stays at its peak), and the summary says how many mini-batches were skipped."""
    from dschat_cli.generation.fast import FastGenerator, Generated

    real_generate = FastGenerator.generate

    def eos_first(self, input_ids, attention_mask):
        out = real_generate(self, input_ids, attention_mask)
        seq = out.seq.clone()
        seq[:, input_ids.shape[1]:] = self.eos
        return Generated(seq, None)  # no engine logprobs: the actor's forward gives them

    monkeypatch.setattr(FastGenerator, "generate", eos_first)
    out, cache = tmp_path / "out", tmp_path / "data-cache"
    r = invoke_dschat(*ppo_args(actor_dir("opt"), reward_dir("opt"), out, cache, pairs_dir,
                                actor_stage=0, critic_stage=0, steps=2,
                                extra=("--launcher", "none", "--lr-scheduler-type", "cosine")))
    assert r.code == 0, r.explain()
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(rows) == 2 and all(row["answer_length"] == 0 for row in rows), rows
    assert all(row["lr_actor"] == pytest.approx(1e-4) for row in rows), rows
    steps = json.loads((out / "train_summary.json").read_text())["optimizer_steps"]
    assert steps["actor"] == 0 and steps["critic"] == 0, steps
    assert steps["skipped_minibatches"] == 2 * GEN_BATCH // TRAIN_BATCH, steps
    assert "mini-batch(es) with no real answer token skipped" in r.output


def test_python_api_refuses_a_reward_model_with_another_tokenizer(tmp_path, actor_dir,
                                                                   reward_dir,
                                                                   other_tokenizer_reward,
                                                                   pairs_dir):
    """PPOModels.build (the Python API custom loops and `dschat bench` use) checks a separate
    --reward-model's tokenizer against the actor's, not only the critic's: step 3 feeds the
    actor's token ids to the reward model."""
    import subprocess
    import sys

    code = f"""
import sys
from dschat_cli.config.ppo import PPOConfig
from dschat_cli.config.schema import ConfigError, from_flags
from dschat_cli.dist import Dist
from dschat_cli.steps.ppo import PPOModels
cfg = from_flags(PPOConfig, actor_model={str(actor_dir("opt"))!r},
                 critic_model={str(reward_dir("opt"))!r},
                 reward_model={str(other_tokenizer_reward)!r}, output_dir={str(tmp_path)!r})
try:
    PPOModels.build(cfg, Dist.init(), 1, 1)
except ConfigError as e:
    print("ConfigError", e.where, e.message)
    sys.exit(0)
print("built")
"""
    env = {**__import__("os").environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29733", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, stdin=subprocess.DEVNULL)
    assert "ConfigError --reward-model" in proc.stdout, proc.stdout + proc.stderr
    assert "different tokenizer" in proc.stdout
