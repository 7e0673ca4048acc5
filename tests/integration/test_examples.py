"""The examples run as documented: the README's Python-API example (examples/custom_ppo_loop.py)
trains, and every run config examples/COMMAND.yaml passes `dschat COMMAND --config FILE --dry-run`
with each of its values in the printed resolved config (so a renamed option, a misspelt key or a
value the command would not take fails here). A new examples/*.yaml is picked up by the glob."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "examples").glob("*.yaml"))
STEPS = ("sft", "reward", "ppo")


def leaves(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    """{("optim", "learning_rate"): 9.65e-06, ...} of a nested mapping."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def resolved_configs(output: str) -> dict[str, dict]:
    """The YAML under each `dschat STEP: resolved config` rule of a dry run, by step."""
    found, step, lines = {}, None, []
    for line in output.splitlines() + ["\u2500"]:
        if line.startswith("\u2500"):  # a rule: ends the block being read
            if step is not None:
                found[step] = yaml.safe_load("\n".join(lines))
            m = re.search(r"dschat (\S+): resolved config", line)
            step, lines = (m.group(1) if m else None), []
        elif step is not None:
            lines.append(line)
    return found


def dry_run(invoke_dschat, command: str, config: Path, out: Path, *extra) -> dict[str, dict]:
    """`dschat COMMAND --config CONFIG --dry-run`, the output folder in tmp (the file's is
    replaced: nothing may land in the repository)."""
    r = invoke_dschat(command, "--config", config, "--output-dir", out, *extra, "--dry-run")
    assert r.code == 0, r.explain()
    assert not out.exists(), "a dry run writes nothing"
    return resolved_configs(r.output)


def assert_shown(where: str, values: dict[tuple, object], cfg: dict) -> None:
    for path, value in values.items():
        shown = cfg
        for key in path:
            assert isinstance(shown, dict) and key in shown, \
                f"{where}: {'.'.join(path)} is not in the resolved config"
            shown = shown[key]
        hint = " (YAML reads a number without a dot, like 5e-5, as text: write 5.0e-5)" \
            if isinstance(value, str) and isinstance(shown, (int, float)) else ""
        assert shown == value, f"{where}: {'.'.join(path)} is {value!r} in the file but " \
                               f"{shown!r} in the dry run{hint}"


def pipeline_shows(path: tuple) -> list[tuple[str, tuple]]:
    """Where a pipeline option shows in its dry run: (step, option of that step's config)."""
    if path[0] in ("data", "launch"):
        return [(step, path) for step in STEPS]
    return {
        ("actor",): [("sft", ("model", "model"))],
        ("reward",): [("reward", ("model", "model"))],
        ("seed",): [(step, ("seed",)) for step in STEPS],
        ("actor_zero_stage",): [("sft", ("deepspeed", "zero_stage")),
                                ("ppo", ("deepspeed", "actor_zero_stage"))],
        ("reward_zero_stage",): [("reward", ("deepspeed", "zero_stage")),
                                 ("ppo", ("deepspeed", "critic_zero_stage"))],
        ("save_interval",): [(step, ("checkpoint", "save_interval")) for step in STEPS],
        ("keep_last",): [(step, ("checkpoint", "keep_last")) for step in STEPS],
    }.get(path, [])


# Pipeline options that act only when steps run (a dry run still checks their names and values).
NOT_IN_DRY_RUN = {("min_reward_accuracy",), ("rerun",)}

# What the pipeline sets in every step config (its own options win over a step YAML's).
PIPELINE_OWNS = {("model", "model"), ("model", "random_init"), ("actor", "model"),
                 ("critic", "model"), ("output_dir",), ("overwrite",), ("seed",),
                 ("data", "data_path"), ("data", "data_dir"), ("data", "data_split"),
                 ("data", "data_cache_dir")}


def test_the_readme_run_has_an_example_per_command():
    assert {p.stem for p in CONFIGS} >= {"sft", "reward", "ppo", "pipeline"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_example_config_dry_runs_with_its_values(config, tmp_path, invoke_dschat):
    from dschat_cli.cli.app import app

    command = config.stem
    assert command in {c.name for c in app.registered_commands}, \
        f"examples/{config.name}: there is no `dschat {command}`; name a run config after the " \
        "command that takes it"
    values = leaves(yaml.safe_load(config.read_text(encoding="utf-8")))
    values.pop(("output_dir",), None)  # replaced by a folder in tmp
    out = tmp_path / "out"
    shown = dry_run(invoke_dschat, command, config, out)
    if command != "pipeline":
        assert list(shown) == [command], \
            f"examples/{config.name}: the dry run printed no `dschat {command}: resolved config`"
        assert shown[command]["output_dir"] == str(out)
        assert_shown(f"examples/{config.name}", values, shown[command])
        return
    assert shown and set(shown) <= set(STEPS)
    for cfg in shown.values():
        assert cfg["output_dir"].startswith(str(out) + "/")
    for path, value in values.items():
        if path in NOT_IN_DRY_RUN:
            continue
        if path == ("steps",):  # [1, 2] or "2,3": the steps the dry run plans
            numbers = {int(n) for item in (value if isinstance(value, list) else [value])
                       for n in re.split(r"[,\s]+", str(item)) if n}
            assert set(shown) == {STEPS[n - 1] for n in numbers}
            continue
        places = pipeline_shows(path)
        assert places, f"examples/{config.name}: where does the pipeline's {'.'.join(path)} " \
                       "show in a dry run? Add it to pipeline_shows()"
        for step, step_path in places:
            if step in shown:
                assert_shown(f"examples/{config.name} ({step})", {step_path: value}, shown[step])


def test_the_pipeline_takes_the_step_examples(tmp_path, invoke_dschat):
    """As examples/pipeline.yaml says: --sft-config examples/sft.yaml etc. The step files' options
    reach the steps, except the models, data, seed and folders, which are the pipeline's."""
    examples = ROOT / "examples"
    shown = dry_run(invoke_dschat, "pipeline", examples / "pipeline.yaml", tmp_path / "out",
                    "--steps", "1,2,3",
                    *(a for step in STEPS for a in (f"--{step}-config", examples / f"{step}.yaml")))
    assert set(shown) == set(STEPS)
    for step in STEPS:
        values = leaves(yaml.safe_load((examples / f"{step}.yaml").read_text(encoding="utf-8")))
        assert_shown(f"examples/{step}.yaml in the pipeline",
                     {k: v for k, v in values.items() if k not in PIPELINE_OWNS}, shown[step])


@pytest.mark.slow
def test_custom_ppo_loop_example(tiny_model_dir, pairs_dir, tmp_path, invoke_dschat):
    actor = tiny_model_dir("opt", dropout=0.0)  # any causal LM folder works as the actor
    reward = tmp_path / "reward"
    r = invoke_dschat("reward", "--model", actor, "--data-path", "local/jsonfile", "--data-dir",
                      pairs_dir, "--data-split", "0,10,0", "--output-dir", reward,
                      "--data-cache-dir", tmp_path / "cache", "--launcher", "none",
                      "--num-train-epochs", "1", "--learning-rate", "1e-3",
                      "--max-seq-len", "128", "--max-train-samples", "64")
    assert r.code == 0, r.output
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_ppo_loop.py"),
                           str(actor), str(reward), str(pairs_dir), "2"],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2, proc.stdout
    assert all("reward" in line for line in lines)
