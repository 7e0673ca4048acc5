"""`dschat chat` config: which model, how to format the conversation, and how to generate.

No torch import here: `dschat --help` must stay instant.
"""

from __future__ import annotations

from dataclasses import dataclass

from dschat_cli.config.eval import GenerationOptions, InferenceOptions
from dschat_cli.config.schema import ConfigError, opt, section

FORMATS = ("auto", "text", "template")


@dataclass(frozen=True)
class ChatInferenceOptions(InferenceOptions):
    """InferenceOptions less the batch size: a chat is one conversation (the flag stays accepted, so
    a YAML written for `dschat eval` still loads, but is hidden from --help)."""

    batch_size: int = opt(1, "Unused by chat: one conversation at a time.", min=1, hidden=True)


@dataclass(frozen=True)
class ChatConfig:
    path: str | None = opt(None, "Model to chat with: a causal LM folder (e.g. OUT/actor or "
                           "OUT/ppo/actor, as saved by dschat sft/ppo or save_pretrained) or a hub "
                           "id. A dschat reward model is refused.")
    prompt: tuple[str, ...] = opt((), "Answer this message and exit, printing only the answer on "
                                  "stdout (for scripts). Repeat for consecutive turns of one "
                                  "conversation: one answer is printed per --prompt.")
    format: str = opt("auto", "How the conversation is written for the model: text (DeepSpeed-Chat's "
                      "' Human: {q} Assistant: {a}' turns, what dschat sft trains on), template "
                      "(the tokenizer's chat template), auto (the template when the tokenizer has "
                      "one, else text).", choices=FORMATS)
    generation: GenerationOptions = section(GenerationOptions, panel="Generation")
    inference: ChatInferenceOptions = section(ChatInferenceOptions, panel="Inference")

    def check(self) -> None:
        if not self.path:
            raise ConfigError("--path", "give the model folder to chat with, e.g. --path out/actor")
        for p in self.prompt:
            if not p.strip():
                raise ConfigError("--prompt", "a message must not be empty")
