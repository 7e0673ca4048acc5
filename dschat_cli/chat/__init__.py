"""`dschat chat`: multi-turn chat with a trained model.

session.py   ChatSession: history, prompt format (DeepSpeed-Chat text or the chat template),
             context trimming, streamed answers that stop cleanly (pure; no terminal)
terminal.py  run_chat(cfg): load the model, then the interactive loop or the --prompt answers
"""

from dschat_cli.chat.session import AnswerFilter, ChatSession, PromptTooLong, Turn, context_size

__all__ = ["AnswerFilter", "ChatSession", "PromptTooLong", "Turn", "context_size", "run_chat"]


def run_chat(cfg):
    from dschat_cli.chat.terminal import run_chat as _run

    return _run(cfg)
