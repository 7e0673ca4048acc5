"""--report-to none|tensorboard|wandb: one repeatable flag on every training command (and the
pipeline, which hands it to its steps), resolved once into the run record, checked before launch
(packages, W&B login), and fed by ui/metrics.MetricsLog under the metrics.jsonl names.

tests/integration/test_trackers.py runs it for real (W&B offline, TensorBoard)."""

from __future__ import annotations

import json
import sys
import types

import pytest
from typer.testing import CliRunner

from dschat_cli.checks import check_trackers
from dschat_cli.cli.app import app
from dschat_cli.config.dpo import DPOConfig
from dschat_cli.config.pipeline import PipelineConfig
from dschat_cli.config.ppo import PPOConfig
from dschat_cli.config.resolved import ResolvedRun, resolve_run
from dschat_cli.config.reward import RewardConfig
from dschat_cli.config.schema import ConfigError, from_dict, from_flags, to_dict
from dschat_cli.config.sft import SFTConfig
from dschat_cli.ui.metrics import WANDB_RUN_ID, MetricsLog

runner = CliRunner()

# each training command with its required flags
COMMANDS = {
    "sft": (SFTConfig, {"model": "m"}),
    "reward": (RewardConfig, {"model": "m"}),
    "ppo": (PPOConfig, {"actor_model": "a", "critic_model": "c"}),
    "dpo": (DPOConfig, {"model": "m"}),
}


def record(step, tmp_path, **flags):
    cls, required = COMMANDS[step]
    cfg = from_flags(cls, output_dir=str(tmp_path / "run"), **required, **flags)
    return resolve_run(step, cfg, world_size=1, device="cpu", bf16_supported=False,
                       hub_reachable=False)


def cli_args(step, tmp_path):
    _, required = COMMANDS[step]
    args = [step, "--output-dir", str(tmp_path / "run"), "--dry-run"]
    for k, v in required.items():
        args += ["--" + k.replace("_", "-"), v]
    return args


# ------------------------------------------------------------------------------ the flag
@pytest.mark.parametrize("step", COMMANDS)
def test_every_training_command_takes_repeated_report_to_into_its_record(step, tmp_path):
    r = runner.invoke(app, [*cli_args(step, tmp_path), "--report-to", "wandb",
                            "--report-to", "tensorboard"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert '"report_to": [\n    "tensorboard",\n    "wandb"\n  ]' in r.output  # the record
    assert f'"job_type": "{step}"' in r.output and '"project": "dschat"' in r.output
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


@pytest.mark.parametrize("step", COMMANDS)
def test_default_is_no_tracker(step, tmp_path):
    r = record(step, tmp_path)
    assert (r.report_to, r.tensorboard_dir, r.wandb) == ((), None, None)


@pytest.mark.parametrize("args, where, says", [
    (["--report-to", "mlflow"], "--report-to", "'mlflow' is not valid; choose one of none, "
                                               "tensorboard, wandb"),
    (["--report-to", "wandb", "--report-to", "comet"], "--report-to", "'comet' is not valid"),
    (["--report-to", "none", "--report-to", "wandb"], "--report-to",
     "none cannot be combined with wandb"),
    (["--wandb-project", "p"], "--wandb-project", "needs --report-to wandb"),
    (["--report-to", "tensorboard", "--wandb-run-name", "x"], "--wandb-run-name",
     "needs --report-to wandb"),
])
def test_mistakes_are_one_line_naming_the_flag(args, where, says, tmp_path):
    r = runner.invoke(app, [*cli_args("sft", tmp_path), *args], terminal_width=200)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {where}: ") and says in lines[0], \
        r.output


def test_the_record_names_trackers_once_each_and_where_they_write(tmp_path):
    r = record("ppo", tmp_path, report_to=("wandb", "tensorboard", "wandb"),
               wandb_project="rlhf", wandb_run_name="try-1")
    out = str((tmp_path / "run").resolve())
    assert r.report_to == ("tensorboard", "wandb")
    assert r.tensorboard_dir == f"{out}/tensorboard"
    assert r.wandb == {"project": "rlhf", "name": "try-1", "job_type": "ppo", "dir": out}
    assert record("sft", tmp_path, report_to=("wandb",)).wandb["name"] == "run"  # the folder
    # written for the ranks and read back as it was (JSON has lists, the record tuples)
    (tmp_path / "run").mkdir()
    r.write(tmp_path / "run")
    assert ResolvedRun.read(tmp_path / "run") == r


@pytest.mark.parametrize("step", COMMANDS)
def test_enable_tensorboard_is_report_to_tensorboard(step, tmp_path):
    alias = record(step, tmp_path, enable_tensorboard=True)
    assert alias == record(step, tmp_path, report_to=("tensorboard",))
    assert alias.report_to == ("tensorboard",) and alias.tensorboard_dir
    # DeepSpeed's own monitor gets the folder too, as before
    role = "actor" if step == "ppo" else "model"
    assert alias.ds_config(role)["tensorboard"]["enabled"] is True
    both = record(step, tmp_path, enable_tensorboard=True, report_to=("wandb",))
    assert both.report_to == ("tensorboard", "wandb")


def test_run_config_yaml_round_trips_the_trackers(tmp_path):
    cfg = from_flags(SFTConfig, model="m", output_dir="o", report_to=("tensorboard", "wandb"),
                     wandb_project="p")
    assert from_dict(SFTConfig, to_dict(cfg)) == cfg
    assert to_dict(cfg)["report"] == {"report_to": ["tensorboard", "wandb"],
                                      "wandb_project": "p", "wandb_run_name": None}


# ------------------------------------------------------------------------------ the pipeline
def test_pipeline_hands_report_to_and_the_project_to_every_step(tmp_path):
    from dschat_cli.pipeline import plan_pipeline

    plans = plan_pipeline(from_flags(PipelineConfig, demo=True, output_dir=str(tmp_path),
                                     report_to=("wandb",), wandb_project="demo"))
    assert [p.name for p in plans] == ["sft", "reward", "ppo"]
    for p in plans:
        assert p.cfg.report.report_to == ("wandb",) and p.cfg.report.wandb_project == "demo"
        r = resolve_run(p.name, p.cfg, world_size=1, device="cpu", bf16_supported=False,
                        hub_reachable=False)
        assert r.wandb["job_type"] == p.name and r.wandb["dir"] == str(p.out)
    dpo = plan_pipeline(from_flags(PipelineConfig, demo=True, method="dpo", output_dir=str(tmp_path),
                                   report_to=("tensorboard",)))
    assert [p.cfg.report.report_to for p in dpo] == [("tensorboard",)] * 2
    # unset: each step's own (YAML or default)
    yaml = tmp_path / "sft.yaml"
    yaml.write_text("report:\n  report_to: [tensorboard]\n")
    plans = plan_pipeline(from_flags(PipelineConfig, demo=True, output_dir=str(tmp_path),
                                     sft_config=str(yaml)))
    assert [p.cfg.report.report_to for p in plans] == [("tensorboard",), ("none",), ("none",)]


def test_pipeline_dry_run_refuses_none_with_a_tracker(tmp_path):
    r = runner.invoke(app, ["pipeline", "--demo", "--output-dir", str(tmp_path), "--dry-run",
                            "--report-to", "none", "--report-to", "tensorboard"],
                      terminal_width=200)
    assert r.exit_code == 2 and "--report-to: none cannot be combined with tensorboard" in \
        r.output, r.output


# ------------------------------------------------------------------------------ before launch
@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No W&B credentials anywhere: no key, an empty config dir, no netrc, online mode."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_DISABLED",
                "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.chdir(tmp_path)  # no ./wandb/settings of the repository either
    return tmp_path


@pytest.mark.parametrize("package, says", [
    ("wandb", "--report-to wandb: needs the wandb package: pip install 'dschat[wandb]'"),
    ("tensorboard", "--report-to tensorboard: needs the tensorboard package: pip install "
                    "tensorboard (or pip install 'dschat[tensorboard]')"),
])
def test_a_missing_package_is_one_line_before_anything_is_written(package, says, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    with pytest.raises(ConfigError) as e:
        check_trackers((package,))
    assert f"{e.value.where}: {e.value.message}" == says
    check_trackers(())  # no tracker needs no package
    # through the command: exit 2, one line, no output folder (the check runs before it exists)
    out = tmp_path / "run"
    r = runner.invoke(app, ["sft", "--model", "m", "--output-dir", str(out), "--launcher", "none",
                            "--report-to", package], terminal_width=300)
    assert r.exit_code == 2 and r.output.strip().endswith("error: " + says), r.output
    assert not out.exists()


def test_wandb_online_without_a_login_says_how_to_log_in(no_wandb_login, monkeypatch):
    pytest.importorskip("wandb")
    with pytest.raises(ConfigError, match="no W&B login found: run `wandb login`, set "
                       "WANDB_API_KEY, or set WANDB_MODE=offline") as e:
        check_trackers(("wandb",))
    assert e.value.where == "--report-to wandb"
    check_trackers(("tensorboard",))  # W&B's login is W&B's alone


def test_an_earlier_offline_wandb_in_this_process_does_not_count_as_a_login(no_wandb_login):
    """W&B keeps its settings in a process-wide singleton: an offline run before (an in-process
    step, a Python caller) must not let an online run without a login through."""
    wandb = pytest.importorskip("wandb")
    wandb.setup(wandb.Settings(mode="offline", silent=True))
    try:
        with pytest.raises(ConfigError, match="no W&B login found"):
            check_trackers(("wandb",))
    finally:
        wandb.teardown()


@pytest.mark.parametrize("how", ["offline", "disabled", "api key", "netrc"])
def test_wandb_offline_or_with_a_stored_key_passes(how, no_wandb_login, monkeypatch):
    pytest.importorskip("wandb")
    key = "0123456789abcdef" * 2 + "01234567"  # 40 characters, as W&B's keys
    if how in ("offline", "disabled"):
        monkeypatch.setenv("WANDB_MODE", how)
    elif how == "api key":
        monkeypatch.setenv("WANDB_API_KEY", key)
    else:  # what `wandb login` leaves
        monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")
        (no_wandb_login / "netrc").write_text(f"machine api.wandb.ai\n  login user\n"
                                              f"  password {key}\n")
        (no_wandb_login / "netrc").chmod(0o600)
    check_trackers(("wandb",))  # no prompt (pytest's stdin would fail it), no error


# ------------------------------------------------------------------------------ the log
class FakeRun:
    def __init__(self, step=0):
        self.step, self.logged, self.finished = step, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """wandb.init recorded (what MetricsLog asks of W&B); its run a FakeRun."""
    calls = []
    module = types.SimpleNamespace(Settings=lambda **kw: kw, torn_down=0)

    def teardown():
        module.torn_down += 1
    module.teardown = teardown

    def init(**kw):
        calls.append(kw)
        return FakeRun(step=module.resumed_step if kw["resume"] else 0)
    module.init, module.calls, module.resumed_step = init, calls, 0
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_numbers_go_to_wandb_under_their_names_and_the_id_is_kept_for_resume(tmp_path,
                                                                          fake_wandb):
    init = {"project": "dschat", "name": "run", "job_type": "sft", "dir": str(tmp_path),
            "config": {"seed": 1}}
    log = MetricsLog(tmp_path / "metrics.jsonl", wandb=init)
    log.log(0, eval_loss=2.5)
    log.log(1, loss=2.0, lr=1e-3, epoch=1, skipped=True, note="x", lr_change={"from": 1})
    run = log._wandb
    log.close()
    call = fake_wandb.calls[0]
    assert {k: call[k] for k in init} == init and call["resume"] == "allow"
    assert call["settings"]["console"] == "off"  # the terminal stays dschat's
    run_id = (tmp_path / WANDB_RUN_ID).read_text().strip()
    assert call["id"] == run_id and len(run_id) == 8
    assert run.logged == [(0, {"eval_loss": 2.5}), (1, {"loss": 2.0, "lr": 1e-3, "epoch": 1})]
    assert run.finished and fake_wandb.torn_down == 1  # finished, and W&B's service stopped
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["skipped"] is True  # metrics.jsonl keeps everything

    # a resumed run continues the same W&B run, from where that run got to (step 5): the rows
    # logged again between the checkpoint and step 5 are W&B's already
    fake_wandb.resumed_step = 5
    log = MetricsLog(tmp_path / "metrics.jsonl", mode="a", wandb=init)
    for step in (3, 4, 5, 6):
        log.log(step, loss=1.0)
    run = log._wandb
    log.close()
    assert fake_wandb.calls[1]["id"] == run_id
    assert [s for s, _ in run.logged] == [5, 6]
    # a fresh run in the same folder (--overwrite) is a new W&B run
    MetricsLog(tmp_path / "metrics.jsonl", wandb=init).close()
    assert fake_wandb.calls[2]["id"] != run_id


def test_only_rank_0_reports(tmp_path, fake_wandb):
    log = MetricsLog(None, tensorboard_dir=tmp_path / "tb", wandb={"dir": str(tmp_path)})
    log.log(1, loss=1.0)
    log.close()
    assert fake_wandb.calls == [] and not (tmp_path / "tb").exists()
