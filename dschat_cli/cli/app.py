"""The `dschat` command line. Each command lives in its own module and registers itself here.
Nothing heavy is imported at module level: `dschat --help` answers at once."""

from __future__ import annotations

import typer

from dschat_cli import __version__
from dschat_cli.cli import bench, chat
from dschat_cli.cli import doctor, dpo
from dschat_cli.cli import eval as eval_cmd
from dschat_cli.cli import eval_reward, pipeline, ppo, reward, sft
from dschat_cli.cli import plan as plan_cmd
from dschat_cli.cli import report

app = typer.Typer(
    name="dschat",
    help="Turn a pretrained Hugging Face causal LM into a chat model with the InstructGPT recipe "
         "(SFT, reward model, PPO) on DeepSpeed.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    # `dschat --install-completion` / `--show-completion [bash|zsh|fish|powershell]` (typer's;
    # the shell is detected when not given)
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dschat {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """dschat: SFT -> reward model -> PPO on DeepSpeed."""


sft.register(app)
reward.register(app)
dpo.register(app)
ppo.register(app)
pipeline.register(app)
plan_cmd.register(app)
eval_cmd.register(app)
eval_reward.register(app)
chat.register(app)
doctor.register(app)
bench.register(app)
report.register(app)


def main() -> None:
    # one program name however it is started (`python -m dschat_cli` too): completion scripts
    # are for the `dschat` command and read _DSCHAT_COMPLETE
    app(prog_name="dschat")
