"""`dschat pipeline`: the plan of a 13B run without network, and the built-in demo as the learning
test of the whole recipe (SFT perplexity falls, the reward model ranks held-out pairs, PPO raises
the held-out reward), with stage-level resume after a kill during step 3."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

# The demo's learning bounds hold on every trajectory measured, not on one: float sums differ
# between CPUs (a fresh CI machine's SFT model answered better than the one the bounds were first
# set on, leaving step 3 less to gain), so they were set from the spread over --seed 1234, 1, 2
# and 3 on one 2-core machine (2026-12-06), with room to spare; the figures are quoted at each.
# Held-out answers before and after are drawn with the same noise (steps/common.same_draws), so
# their difference is the policy's.


def dschat(*args, timeout=600):
    env = {**os.environ, "COLUMNS": "200"}
    if "--launcher" in args and args[args.index("--launcher") + 1] == "none":
        # in process, the step gets the threads the launcher gives a CPU worker (all cores, one
        # rank), not the suite's OMP_NUM_THREADS=1: the same numbers as `make demo`, and faster
        env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    proc = subprocess.run([sys.executable, "-m", "dschat_cli", *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env)
    return proc.returncode, proc.stdout


def test_dry_run_plans_all_three_steps_without_network(tmp_path):
    rc, out = dschat("pipeline", "--actor", "opt-13b", "--deployment-type", "single_node",
                     "--output-dir", tmp_path / "out", "--dry-run", timeout=120)
    assert rc == 0, out
    for n, name in ((1, "sft"), (2, "reward"), (3, "ppo")):
        assert f"step {n}: dschat {name}" in out
    assert "size preset: 13b" in out and "size preset: <=350m" in out
    assert "actor_zero_stage: 3" in out  # 13B actor: ZeRO-3
    assert out.count("DeepSpeed config") == 1 + 1 + 4  # sft, reward, and PPO's four models
    assert "opt-13b" in out and not (tmp_path / "out").exists()  # a dry run writes nothing


def _greedy_true_reward(model_dir, eval_json, n: int = 32) -> dict:
    """Mean true reward and fraction stuck repeating of greedy answers to n held-out questions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dschat_cli.demo.judge import judge

    prompts = list(dict.fromkeys(r["prompt"] for r in json.loads(eval_json.read_text())))[:n]
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=48, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    answers = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    judged = [judge(p, a) for p, a in zip(prompts, answers)]
    return {"true_reward": sum(j.score for j in judged) / n,
            "on_topic": sum(j.topic == 1 for j in judged) / n,
            "stuck": sum(j.well_formed == 0 for j in judged) / n, "answers": answers[:3]}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    t0 = time.perf_counter()
    # in this process's pipeline (--launcher none): the same numbers as `make demo` through the
    # real launcher (compared on 2 CPU cores: every figure of summary.json equal), ~30 s sooner;
    # test_rerun_skips_finished_steps_and_resumes_a_killed_step_3 runs the demo's step 3 through
    # the launcher, and the steps' own tests each run them through it
    rc, log = dschat("pipeline", "--demo", "--output-dir", out, "--launcher", "none", timeout=900)
    return rc, log, out, time.perf_counter() - t0


@pytest.mark.slow
def test_demo_learns_every_step(demo):
    rc, log, out, seconds = demo
    assert rc == 0, log
    assert "time breakdown" in log and "dschat chat --path" in log
    summary = json.loads((out / "summary.json").read_text())
    m = {row["step"]: row["metrics"] for row in summary["steps"]}
    assert m[1]["eval_ppl_end"] < 0.5 * m[1]["eval_ppl_start"], m[1]  # SFT learns the format
    # the reward model ranks held-out pairs; not all: a third of them are hard negatives (another
    # topic's tip, a missing closing) in phrasings it never saw; another topic's tip it ranks
    # near chance (0.5 measured on 128 pairs), so the actor's on-topic tips come from SFT
    assert m[2]["accuracy_end"] >= 0.75, m[2]
    # PPO raises the held-out reward-model score, by several standard errors (the scale of the
    # scores differs between reward models)
    gain = m[3]["reward_heldout_end"] - m[3]["reward_heldout_start"]
    assert gain >= 2 * m[3]["reward_heldout_end_stderr"] > 0, m[3]
    assert abs(m[3]["kl_last"]) < 5.0, m[3]  # ... without running away from the reference
    assert (out / "summary.md").is_file()
    # one report page for the pipeline: the steps' curves and the answers before and after
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "step3-models/demo-base/report.html" in page and "data:image/png;base64," in page
    assert seconds < 300, f"the demo took {seconds:.0f} s"
    # judged by the known true reward, not only the learned one. Sampled answers to the held-out
    # questions get better (measured +0.055 .. +0.087, 0.73-0.76 -> 0.79-0.85; one standard
    # error ~0.017 each side, less for the paired difference).
    assert m[3]["true_reward_heldout_end"] >= m[3]["true_reward_heldout_start"] + 0.03, m[3]
    # The greedy answers (what `dschat chat` says) are better than SFT's, on topic and not stuck:
    # on 32 questions SFT 0.88-0.91 -> PPO 0.93-0.95 (+0.030 .. +0.060, on topic 0.81-0.97, none
    # stuck); on step 3's own 8 questions 0.91-0.98.
    sft, ppo = (_greedy_true_reward(out / d, out / "demo-data" / "eval.json")
                for d in ("actor-models/demo-base", "step3-models/demo-base/actor"))
    assert ppo["true_reward"] >= max(0.85, sft["true_reward"] + 0.01), (sft, ppo)
    assert ppo["stuck"] <= 1 / 32 and ppo["on_topic"] >= 0.75, ppo
    assert m[3]["greedy_true_reward_end"] >= 0.85, m[3]
    # the chat command it prints answers
    actor = out / "step3-models" / "demo-base" / "actor"
    rc, answer = dschat("chat", "--path", actor, "--prompt", "Can you help me with cooking?",
                        "--max-new-tokens", "16", timeout=120)
    assert rc == 0 and answer.strip(), answer


@pytest.mark.slow
def test_demo_step3_with_grpo_learns_without_a_critic(demo):
    """`dschat pipeline --demo --advantage-estimator grpo` on the same steps 1 and 2: GRPO's
    folder beside PPO's, no critic, and judged by the true reward, not only the proxy.
    Measured over seeds 1234, 1, 2, 3 (2 CPU cores, ~40 s): sampled answers +0.043 .. +0.078 (to
    0.78-0.82), greedy answers to 32 questions 0.91-0.99 against SFT's 0.88-0.91 (on topic
    0.69-0.97, none stuck)."""
    rc, log, out, _ = demo
    assert rc == 0, log
    rc, log = dschat("pipeline", "--demo", "--output-dir", out, "--steps", "3",
                     "--advantage-estimator", "grpo", "--launcher", "none", timeout=600)
    assert rc == 0, log
    step3 = out / "step3-models" / "demo-base-grpo"
    assert (out / "step3-models" / "demo-base" / "critic").is_dir()  # PPO's run, untouched
    assert (step3 / "actor").is_dir() and not (step3 / "critic").exists()
    summary = json.loads((step3 / "train_summary.json").read_text())
    assert summary["advantage_estimator"] == "grpo" and summary["samples_per_prompt"] == 4
    assert "critic" not in summary["optimizer_steps"], summary["optimizer_steps"]
    gain = summary["true_reward_heldout_end"] - summary["true_reward_heldout_start"]
    assert gain >= 0.03, summary
    assert summary["greedy_true_reward_end"] >= 0.85, summary  # 0.93-1.00 on its 8 questions
    assert summary["greedy_repetition_end"] <= 0.05, summary
    sft, grpo = (_greedy_true_reward(out / d, out / "demo-data" / "eval.json")
                 for d in ("actor-models/demo-base", "step3-models/demo-base-grpo/actor"))
    assert grpo["true_reward"] >= sft["true_reward"] + 0.01, (sft, grpo)  # +0.023 .. +0.082
    assert grpo["stuck"] <= 1 / 32 and grpo["on_topic"] >= 0.6, grpo


@pytest.mark.slow
def test_demo_dpo_instead_of_steps_2_and_3_improves_the_greedy_answers(demo):
    """`dschat pipeline --demo --method dpo` on the same step 1: DPO on the step-2 pairs in its
    own folder, no reward model, no step 3, judged by the demo's true reward and by its greedy
    answers, and `dschat chat` loads the result. Measured over seeds 1234, 1, 2, 3 (2 CPU cores):
    eval accuracy 0.88-0.95; greedy answers to 32 questions 0.93-0.95 against SFT's 0.88-0.91
    (+0.037 .. +0.056, on topic 0.75-0.88); on the step's own 8 questions 0.78-0.93 -> 0.88-0.96.
    Its sampled answers barely move (-0.012 .. +0.043; an earlier machine measured 0.70 -> 0.76):
    DPO sharpens the answer the model prefers more than it reshapes the rest of its
    distribution. The DPO step ~30 s (~35 s with the pipeline's start)."""
    rc, log, out, _ = demo
    assert rc == 0, log
    t0 = time.perf_counter()
    rc, log = dschat("pipeline", "--demo", "--method", "dpo", "--output-dir", out,
                     "--launcher", "none", timeout=600)
    seconds = time.perf_counter() - t0
    assert rc == 0, log
    flat = log.replace("\n", " ")
    assert "step 1 (sft) finished earlier" in flat and "step 2: dschat dpo" in flat
    dpo = out / "dpo-models" / "demo-base"
    assert "dschat chat --path" in log and str(dpo) in log.replace("\n", "")
    assert (dpo / ".dschat_done.json").is_file() and (dpo / "config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "dpo"
    assert [(r["step"], r["name"], r["status"]) for r in summary["steps"]] == \
        [(1, "sft", "done earlier"), (2, "dpo", "ran")]
    assert "before and after step 2 (dpo)" in (out / "summary.md").read_text()
    s = json.loads((dpo / "train_summary.json").read_text())
    assert s["eval_accuracy_end"] >= 0.85, s  # the implicit reward ranks held-out pairs
    # the true reward of one sampled answer per held-out prompt does not fall beyond noise (a
    # standard error is ~0.018 each side) ...
    gain = s["true_reward_heldout_end"] - s["true_reward_heldout_start"]
    assert gain >= -0.03 and s["heldout_end_n"] >= 100, s
    # ... and the greedy answers get better (+0.037 .. +0.10 measured)
    assert s["greedy_true_reward_end"] > s["greedy_true_reward_start"], s
    assert s["greedy_repetition_end"] <= 0.05 and s["greedy_eos_share_end"] == 1.0, s
    # judged on 32 held-out questions, greedy (what `dschat chat` says): better than SFT's answers,
    # on topic and not stuck repeating
    sft, d = (_greedy_true_reward(out / p, out / "demo-data" / "eval.json")
              for p in ("actor-models/demo-base", "dpo-models/demo-base"))
    assert d["true_reward"] >= sft["true_reward"] + 0.02, (sft, d)
    assert d["stuck"] <= 1 / 32 and d["on_topic"] >= 0.7, d
    assert seconds < 90, f"the DPO step took {seconds:.0f} s"
    rc, answer = dschat("chat", "--path", dpo, "--prompt", "Can you help me with cooking?",
                        "--max-new-tokens", "16", timeout=120)
    assert rc == 0 and answer.strip(), answer


def _degenerate_forms(answer: str) -> dict[str, str]:
    """The three ways the old demo's PPO gamed its reward model, applied to a real answer."""
    words = answer.split()
    return {"first words + !!!!!!": " " + " ".join(words[:2]).rstrip("!.,") + "!!!!!!",
            "first word repeated": " " + " ".join([words[0].rstrip("!.,")] * 8),
            "cut to a third": " " + " ".join(words[:max(1, len(words) // 3)])}


@pytest.mark.slow
def test_demo_reward_model_prefers_real_answers_to_degenerate_ones(demo):
    """The reward model PPO optimises must not pay for the degenerate answers PPO finds first:
    on held-out questions, each full chosen answer against three degenerate versions of it."""
    import torch
    from transformers import AutoTokenizer

    from dschat_cli.demo.judge import true_reward
    from dschat_cli.eval.reward import _score
    from dschat_cli.models.reward import load_reward_model

    rc, log, out, _ = demo
    assert rc == 0, log
    rm_dir = out / "reward-models" / "demo-base"
    rows = json.loads((out / "demo-data" / "eval.json").read_text())
    full = [(r["prompt"], r["chosen"]) for r in rows if true_reward(r["prompt"], r["chosen"]) >= 0.85]
    full = list(dict.fromkeys(full))[:120]
    assert len(full) >= 60, len(full)
    tok = AutoTokenizer.from_pretrained(rm_dir)
    model = load_reward_model(rm_dir).eval()
    with torch.no_grad():
        real = _score(model, tok, [p for p, _ in full], [a for _, a in full], max_len=96,
                      batch_size=32, device="cpu")
        wins = {}
        for form in _degenerate_forms("a b c"):
            bad = _score(model, tok, [p for p, _ in full],
                         [_degenerate_forms(a)[form] for _, a in full], max_len=96,
                         batch_size=32, device="cpu")
            wins[form] = sum(r > b for r, b in zip(real, bad)) / len(full)
    # observed on 120 held-out answers (the demo as `make demo` runs it): 1.00, 0.975 and 0.975
    assert all(w >= 0.8 for w in wins.values()), wins
    assert sum(wins.values()) / len(wins) >= 0.85, wins


@pytest.mark.slow
def test_rerun_skips_finished_steps_and_resumes_a_killed_step_3(demo):
    rc, log, out, _ = demo
    assert rc == 0, log
    rc, again = dschat("pipeline", "--demo", "--output-dir", out, "--launcher", "none")
    assert rc == 0, again
    assert again.count("finished earlier") == 3

    # kill the pipeline during step 3 (real launcher: the whole process group goes)
    step3 = out / "step3-models" / "demo-base"
    (step3 / ".dschat_done.json").unlink()
    small = out.parent / "ppo-small.yaml"
    small.write_text("train:\n  test_stop_step: 3\ndata:\n  max_eval_samples: 16\n")
    args = [sys.executable, "-m", "dschat_cli", "pipeline", "--demo", "--output-dir", str(out),
            "--ppo-config", str(small), "--rerun"]
    proc = subprocess.Popen(args[:-1] + ["--steps", "3"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "COLUMNS": "200"})
    seen = ""
    deadline = time.time() + 300
    for line in proc.stdout:  # wait until step 3 is under way
        seen += line
        if "held-out reward before PPO" in line or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert "step 3: dschat ppo" in seen, seen
    assert not (step3 / ".dschat_done.json").exists()

    rc, resumed = dschat("pipeline", "--demo", "--output-dir", out, "--ppo-config", small)
    assert rc == 0, resumed
    assert "step 1 (sft) finished earlier" in resumed.replace("\n", " ")
    assert "step 2 (reward) finished earlier" in resumed.replace("\n", " ")
    assert "step 3: dschat ppo" in resumed
    assert (step3 / ".dschat_done.json").is_file()
    assert len([json.loads(x) for x in (step3 / "metrics.jsonl").read_text().splitlines()]) == 3
