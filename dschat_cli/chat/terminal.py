"""`dschat chat --path DIR`: the terminal around a ChatSession (load, read, stream, commands).

Interactive: a "You:" prompt; `clear` starts a new conversation, `quit` or `exit` (or Ctrl-D, or
Ctrl-C at the prompt) ends with exit code 0. Ctrl-C while the model answers stops that answer;
the interrupted turn is not kept. Answers are printed as they are generated, verbatim (never read
as rich markup; control characters replaced).

`--prompt TEXT` (repeatable): one answer per message, consecutive turns of one conversation,
printed alone on stdout, one after the other; everything else (loading, notices) goes to stderr.
"""

from __future__ import annotations

import sys

from dschat_cli.chat.session import ChatSession, PromptTooLong
from dschat_cli.config.chat import ChatConfig
from dschat_cli.config.schema import ConfigError

QUIT_COMMANDS = ("quit", "exit")
CLEAR_COMMANDS = ("clear",)


def check_path(cfg: ChatConfig) -> str:
    """Fail in a second, before torch loads, when --path cannot be chatted with: a missing folder,
    a folder without config.json, a dschat reward model or another non-causal-LM folder, or a hub
    id that is neither cached nor downloadable (no network: fails at once instead of retrying).
    Returns what to load: the folder, or the hub id (an architecture preset name such as opt-1.3b
    means its hub model, as in the other commands)."""
    from dschat_cli.config.sections import ModelOptions
    from dschat_cli.models.inference import check_causal_lm_dir
    from dschat_cli.models.loading import check_model_source, resolve_model_name

    trust = cfg.inference.trust_remote_code
    check_causal_lm_dir(cfg.path, "--path", trust_remote_code=trust)
    opts = ModelOptions(model=cfg.path, trust_remote_code=trust)
    check_model_source(opts, "--path")
    return resolve_model_name(opts)[0]


def load_session(cfg: ChatConfig) -> tuple[ChatSession, str]:
    """-> (session, a one-line description of the model: path, device, dtype, format, context)."""
    import torch

    from dschat_cli.models.inference import load_for_inference, pick_device, pick_dtype
    from dschat_cli.ui.console import err_console, quiet_libraries

    source = check_path(cfg)
    quiet_libraries()
    device = pick_device(cfg.inference.device)
    dtype = pick_dtype(cfg.inference.dtype, device)
    with err_console.status(f"loading {cfg.path}"):
        try:
            model, tok = load_for_inference(source, device=device, dtype=dtype, flag="--path",
                                            trust_remote_code=cfg.inference.trust_remote_code)
        except (OSError, ValueError) as e:  # e.g. a name that is neither a folder nor a hub model
            if isinstance(e, ConfigError):
                raise
            raise ConfigError("--path", f"cannot load '{cfg.path}': "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    torch.manual_seed(cfg.inference.seed)
    session = ChatSession(model, tok, cfg.generation, fmt=cfg.format)
    context = f"context {session.context} tokens" if session.context else "no context limit"
    about = (f"{cfg.path} · {device} {str(dtype).removeprefix('torch.')} · {session.format_name} "
             f"format · {context}")
    return session, about


def _trim_notice(session: ChatSession) -> str:
    return (f"(older turns are dropped to fit the model's context: {session.context} tokens, "
            f"{session.gen.max_new_tokens} of them kept for the answer)")


def answer_prompts(session: ChatSession, prompts: tuple[str, ...]) -> int:
    """--prompt mode: each answer streamed to stdout, then a newline; notices on stderr."""
    from rich.text import Text

    from dschat_cli.ui.console import console, err_console, plain_text

    told = False
    for text in prompts:
        try:
            dropped = session.trim_history(text)
        except PromptTooLong as e:
            raise ConfigError("--prompt", str(e)) from None
        if dropped and not told:
            err_console.print(Text(_trim_notice(session), style="dim"), soft_wrap=True)
            told = True
        session.respond(text, on_token=lambda s: console.print(plain_text(s), end="",
                                                               soft_wrap=True))
        console.print()
    return 0


def interactive(session: ChatSession, about: str) -> int:
    from rich.text import Text

    from dschat_cli.ui.console import console, is_interactive, plain_text

    if is_interactive():
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:  # pragma: no cover - Windows
            pass
    console.print(Text.assemble(("dschat chat", "bold"), " · ", about), soft_wrap=True)
    console.print(Text("Type a message and press Enter. `clear` starts a new conversation; `quit` "
                       "or Ctrl-D ends.", style="dim"), soft_wrap=True)
    told = False
    while True:
        try:
            line = console.input("[bold green]You:[/bold green] ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: a clean end
            console.print()
            return 0
        if not sys.stdin.isatty():  # piped input is not echoed: show it, so the transcript reads
            console.print(plain_text(line), soft_wrap=True)
        text = line.strip()
        if not text:
            continue
        if text.lower() in QUIT_COMMANDS:
            return 0
        if text.lower() in CLEAR_COMMANDS:
            session.clear()
            told = False
            console.print(Text("(conversation cleared)", style="dim"))
            continue
        try:
            dropped = session.trim_history(text)
        except PromptTooLong as e:
            console.print(Text(f"(not sent: {e})", style="yellow"), soft_wrap=True)
            continue
        if dropped and not told:
            console.print(Text(_trim_notice(session), style="dim"), soft_wrap=True)
            told = True
        console.print("[bold cyan]Assistant:[/bold cyan] ", end="")
        try:
            answer = session.respond(text, on_token=lambda s: console.print(
                plain_text(s), end="", soft_wrap=True))
        except KeyboardInterrupt:
            console.print()
            console.print(Text("(interrupted; this turn is not kept)", style="dim"))
            continue
        if not answer:
            console.print(Text("(empty answer)", style="dim"), end="")
        console.print()


def run_chat(cfg: ChatConfig) -> int:
    session, about = load_session(cfg)
    if cfg.prompt:
        return answer_prompts(session, cfg.prompt)
    return interactive(session, about)
