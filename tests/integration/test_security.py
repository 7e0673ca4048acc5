"""Security hygiene end to end: model code runs only with --trust-remote-code, and credentials in
the environment never reach a run's records.

    dschat chat --path CUSTOM_CODE_MODEL --trust-remote-code --prompt Hello   # its code runs
    HF_TOKEN=... dschat sft ...           # train.log and the terminal never show it

(Without the flag a custom-code model is refused before anything loads: the *-custom-code-model
cases of test_bad_input_all_commands.py. A real launcher run with tokens in the environment whose
output folder must not hold them: test_sft.py's two-worker launcher test. The static checks, no
unpickling and an explicit trust_remote_code at every load: tests/unit/test_security_static.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


SECRETS = {"HF_TOKEN": "hf_secretXyz0123456789",
           "MLFLOW_TRACKING_PASSWORD": "mlflow-secret-77"}


def custom_code_model(src: Path, dst: Path, marker: Path) -> Path:
    """A copy of a tiny OPT folder that only loads through its own Python files (config.json
    auto_map, a model type transformers does not know). Importing its code creates `marker`."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(model_type="dschat_custom", architectures=["CustomForCausalLM"],
               auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                         "AutoModel": "modeling_custom.CustomModel",
                         "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "configuration_custom.py").write_text(
        "from transformers import OPTConfig\n\n\n"
        "class CustomConfig(OPTConfig):\n    model_type = 'dschat_custom'\n")
    (dst / "modeling_custom.py").write_text(
        "from pathlib import Path\n\n"
        "from transformers import OPTForCausalLM, OPTModel\n\n"
        "from .configuration_custom import CustomConfig\n\n"
        f"Path({str(marker)!r}).touch()\n\n\n"
        "class CustomModel(OPTModel):\n    config_class = CustomConfig\n\n\n"
        "class CustomForCausalLM(OPTForCausalLM):\n    config_class = CustomConfig\n")
    return dst


def test_trust_remote_code_runs_the_model_code(tmp_path, tiny_opt, invoke_dschat):
    marker = tmp_path / "code-ran"
    model = custom_code_model(tiny_opt, tmp_path / "custom_chat", marker)

    refused = invoke_dschat("chat", "--path", model, "--prompt", "Hello")
    assert refused.code == 2 and "--trust-remote-code" in refused.output, refused.explain()
    assert not marker.exists(), "the model's code ran without --trust-remote-code"

    r = invoke_dschat("chat", "--path", model, "--trust-remote-code", "--prompt", "Hello",
                      "--max-new-tokens", "4")
    assert r.code == 0, r.explain()
    assert marker.exists(), "--trust-remote-code given, but the model's own code did not load"


def test_trust_remote_code_reaches_the_training_worker(tmp_path, tiny_opt, pairs_dir,
                                                       invoke_dschat):
    """The flag is honoured past the pre-launch check: the worker loads and trains the model
    through its code, and the saved folder still names it."""
    marker = tmp_path / "code-ran"
    # its own folder name: transformers imports the code as a module named after the folder,
    # once per process
    model = custom_code_model(tiny_opt, tmp_path / "custom_sft", marker)
    out = tmp_path / "out"
    r = invoke_dschat("sft", "--model", model, "--trust-remote-code", "--data-path",
                      "local/jsonfile", "--data-dir", pairs_dir, "--data-split", "10,0,0",
                      "--max-steps", "1", "--max-train-samples", "8", "--max-eval-samples", "8",
                      "--per-device-train-batch-size", "8", "--max-seq-len", "64",
                      "--output-dir", out, "--data-cache-dir", tmp_path / "cache",
                      "--launcher", "none")
    assert r.code == 0, r.explain()
    assert marker.exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "dschat_custom"


def test_launcher_log_redacts_credentials(tmp_path, monkeypatch):
    """DeepSpeed's multi-node runner logs its pdsh command with `export NAME=value;` for MLFLOW*
    and NCCL* variables and every line of .deepspeed_env (where users put HF_TOKEN for the other
    nodes): what reaches train.log and the terminal has *** instead of the values."""
    import io
    import subprocess
    import sys

    from dschat_cli.launch.runner import LaunchPlan, run_launch

    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRETS["MLFLOW_TRACKING_PASSWORD"])
    lines = [
        "[INFO] [runner.py:618:main] cmd = pdsh -S -f 1024 -w worker-0,worker-1 export "
        f"PYTHONPATH=/work; export MLFLOW_TRACKING_PASSWORD={SECRETS['MLFLOW_TRACKING_PASSWORD']}; "
        "export NCCL_DEBUG=INFO; export AWS_SECRET_ACCESS_KEY=from-deepspeed-env; "
        f"export HF_TOKEN={SECRETS['HF_TOKEN']}; export TOKENIZERS_PARALLELISM=false; cd /work;",
        f"[rank 0] downloading with token {SECRETS['HF_TOKEN']}",
    ]
    script = "".join(f"print({line!r});" for line in lines)

    def popen(argv, **kw):
        return subprocess.Popen([sys.executable, "-c", script], **kw)

    shown = io.BytesIO()
    assert run_launch(LaunchPlan(argv=["x"]), log_path=tmp_path / "train.log", popen=popen,
                      out=shown, verbose=True) == 0
    for text in (shown.getvalue().decode(), (tmp_path / "train.log").read_text()):
        assert "export HF_TOKEN=***;" in text and "MLFLOW_TRACKING_PASSWORD=***;" in text
        assert "AWS_SECRET_ACCESS_KEY=***;" in text and "from-deepspeed-env" not in text
        assert "token ***" in text and not [v for v in SECRETS.values() if v in text]
        # what is not a credential stays readable
        assert "NCCL_DEBUG=INFO" in text and "TOKENIZERS_PARALLELISM=false" in text
