"""`dschat chat --path DIR`: multi-turn chat with a trained model (runs in this process, CPU or
GPU). The loop and the model live in dschat_cli/chat; nothing heavy is imported here."""

from __future__ import annotations

import typer

from dschat_cli.cli.options import config_command, show_config
from dschat_cli.config.chat import ChatConfig


def _run(cfg: ChatConfig, *, dry_run: bool) -> int:
    from dschat_cli.chat.terminal import check_path

    check_path(cfg)  # a wrong folder fails at once, before torch loads
    if dry_run:
        return show_config(cfg)
    from dschat_cli.chat import run_chat

    return run_chat(cfg)


def register(app: typer.Typer) -> None:
    config_command(app, "chat", ChatConfig, handler=_run,
                   help="Chat with a trained model: multi-turn, answers streamed as they are "
                        "generated. Type `clear` to start over, `quit` (or Ctrl-D) to end; "
                        "--prompt answers one message and exits.",
                   epilog="Example: dschat chat --path out/ppo/actor   |   dschat chat --path "
                          "out/actor --prompt \"How do I bake bread?\" --max-new-tokens 64",
                   dry_run_help="Print the resolved config and exit.")
