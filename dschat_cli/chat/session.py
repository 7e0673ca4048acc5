"""One conversation with a causal LM: history, prompt, context trimming and a streamed, clean answer.

    dschat chat --path out/actor            (dschat_cli/chat/terminal.py drives a ChatSession)

    session = ChatSession(model, tokenizer, GenerationOptions(max_new_tokens=64))
    answer = session.respond("How do I bake bread?", on_token=lambda s: print(s, end=""))
    session.respond("And without yeast?")         # the first turn is part of this prompt
    session.clear()                                # a new conversation

Nothing here touches a terminal; the model only needs `generate()`, `.device` and `.config`, so a
fake model can stand in for tests.

How the conversation is written (`fmt`):
  text      DeepSpeed-Chat's format, what `dschat sft` trains on: every turn " Human: {q} Assistant:
            {a}", concatenated, then " Human: {question} Assistant:". Tokenised as one text, with
            the special tokens the tokenizer adds (e.g. Llama's BOS), as in training.
  template  the tokenizer's chat template: apply_chat_template(messages, add_generation_prompt=True),
            tokenised without adding special tokens (the template writes them).
  auto      template when tokenizer.chat_template is set, else text.

Where an answer ends. Generation stops on any eos id (the tokenizer's and the generation config's;
a chat model's end-of-turn token is usually listed there) and when the text reaches a stop text:
"Human:" (the model starting the next turn) or an end token spelled out as plain text ("</s>",
"<|endoftext|>", the tokenizer's eos). Special tokens are dropped when decoding
(skip_special_tokens), never by deleting strings afterwards, which is what left DeepSpeed-Chat's
chatbot with stray end tokens. The answer is the text before the first stop text, stripped.

Streaming. A TextIteratorStreamer receives tokens from generate() running in a thread; the text
goes through AnswerFilter, which holds back whatever might still become a stop text (a trailing
"Hum") and trailing whitespace, so the streamed pieces add up to exactly the returned answer.

Context. The prompt may take at most context_size - max_new_tokens tokens (context_size: the
smaller of the model's position limit and the tokenizer's model_max_length). trim_history() drops
the oldest turns until it fits; a message that does not fit alone raises PromptTooLong.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from dschat_cli.config.eval import GenerationOptions
from dschat_cli.config.schema import ConfigError
from dschat_cli.models.inference import STOP_STRINGS, generation_kwargs

# End tokens that models trained on text with literal end markers sometimes spell out as plain text.
END_TEXTS = ("</s>", "<|endoftext|>")
# tokenizer.model_max_length is 1e30 when a tokenizer does not know its limit.
_SANE_MAX_LENGTH = 10_000_000
_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                   "n_ctx")


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str


class PromptTooLong(ValueError):
    """The message alone (with no history) leaves no room for the answer."""


def context_size(model_config, tokenizer) -> int | None:
    """Tokens the model can attend to: the smaller of the config's position limit and the
    tokenizer's model_max_length, ignoring values that are unset or absurd. None: no known limit."""
    sizes = []
    cfg = model_config
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()  # multimodal configs keep the LM's limit in text_config
    for attr in _POSITION_ATTRS:
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and 0 < value < _SANE_MAX_LENGTH:
            sizes.append(value)
            break
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _SANE_MAX_LENGTH:
        sizes.append(value)
    return min(sizes) if sizes else None


def use_chat_template(tokenizer, fmt: str = "auto") -> bool:
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if fmt == "template" and not has_template:
        raise ConfigError("--format", "the tokenizer has no chat template; use --format text")
    return fmt == "template" or (fmt == "auto" and has_template)


def stop_texts(tokenizer) -> list[str]:
    """"Human:" and the end tokens as plain text, without duplicates."""
    out = list(STOP_STRINGS) + list(END_TEXTS)
    eos = getattr(tokenizer, "eos_token", None)
    if isinstance(eos, str) and len(eos) >= 3:  # a one- or two-character eos would cut real text
        out.append(eos)
    return list(dict.fromkeys(out))


def eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos and every eos id of the model's generation config (chat models list
    their end-of-turn token there)."""
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    for value in (getattr(gen_cfg, "eos_token_id", None), tokenizer.eos_token_id):
        if value is None:
            continue
        ids.extend(value if isinstance(value, (list, tuple)) else [value])
    return list(dict.fromkeys(int(i) for i in ids))


class AnswerFilter:
    """Streamed text pieces -> the clean answer, shown as early as it is safe.

    feed(piece) returns the text that can be shown now; finish() the rest once generation ended.
    The answer has no leading or trailing whitespace and ends before the first stop text. Text that
    could still be the start of a stop text ("Hum" for "Human:") or is trailing whitespace is held
    back, so what was shown is always a prefix of the final answer, never to be taken back."""

    def __init__(self, stops: list[str] | tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.raw = ""
        self.shown = 0  # characters of the answer handed out so far
        self.stopped = False  # a stop text was seen: the answer is complete
        self._answer: str | None = None

    def _held(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop text."""
        held = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return held

    def _emit(self, safe: str) -> str:
        out = safe[self.shown:]
        self.shown = max(self.shown, len(safe))
        return out

    def feed(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        self.raw += piece
        text = self.raw.lstrip()
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            self._answer = text[:min(cuts)].rstrip()
            return self._emit(self._answer)
        return self._emit(text[:len(text) - self._held(text)].rstrip())

    def finish(self) -> str:
        """The text still held back (generation ended without a stop text: it was real text)."""
        if self._answer is None:
            self._answer = self.raw.strip()
        return self._emit(self._answer)

    @property
    def answer(self) -> str:
        return self._answer if self._answer is not None else self.raw.strip()


def _event_stopping_criteria(event: threading.Event):
    """A StoppingCriteria that ends generate() once `event` is set (by the reader of the stream)."""
    import torch
    from transformers import StoppingCriteria

    class EventStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool,
                              device=input_ids.device)

    return EventStop()


class ChatSession:
    """History of one conversation and the model that continues it. See the module docstring."""

    def __init__(self, model, tokenizer, gen: GenerationOptions | None = None, *, fmt: str = "auto",
                 context: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.gen = gen or GenerationOptions()
        self.template = use_chat_template(tokenizer, fmt)
        self.context = context if context is not None else context_size(
            getattr(model, "config", None), tokenizer)
        self.budget = None if self.context is None else self.context - self.gen.max_new_tokens
        if self.budget is not None and self.budget < 1:
            raise ConfigError("--max-new-tokens", f"{self.gen.max_new_tokens} leaves no room for the "
                              f"conversation in the model's context of {self.context} tokens; use "
                              f"less than {self.context}")
        self.stops = stop_texts(tokenizer)
        self.history: list[Turn] = []
        self.dropped = 0  # turns dropped to fit the context since the last clear()

    @property
    def format_name(self) -> str:
        return "chat template" if self.template else "text"

    def clear(self) -> None:
        self.history = []
        self.dropped = 0

    # ---------------------------------------------------------------- prompt

    def format_prompt(self, text: str, history: list[Turn] | None = None) -> str:
        """The model's input for `text` after `history` (default: this session's), as a string."""
        turns = self.history if history is None else history
        if self.template:
            messages = []
            for t in turns:
                messages += [{"role": "user", "content": t.user},
                             {"role": "assistant", "content": t.assistant}]
            messages.append({"role": "user", "content": text})
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=True)
            except Exception as e:  # jinja's TemplateError and the template's own raise_exception
                raise ConfigError("--format", f"the tokenizer's chat template failed ({e}); try "
                                  "--format text") from None
        return "".join(f" Human: {t.user} Assistant: {t.assistant}" for t in turns) + \
            f" Human: {text} Assistant:"

    def prompt_ids(self, text: str, history: list[Turn] | None = None) -> list[int]:
        prompt = self.format_prompt(text, history)
        if self.template:  # the template wrote the special tokens itself
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = list(self.tokenizer(prompt)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if eos is not None and len(ids) > 1 and ids[-1] == eos:  # the model must continue, not end
            ids.pop()
        return ids

    def trim_history(self, text: str) -> int:
        """Drop the oldest turns until the prompt for `text` leaves max_new_tokens of room; returns
        how many were dropped. Raises PromptTooLong when `text` alone does not fit."""
        if self.budget is None:
            return 0
        dropped = 0
        while len(self.prompt_ids(text)) > self.budget:
            if not self.history:
                n = len(self.prompt_ids(text, []))
                raise PromptTooLong(
                    f"the message takes {n} tokens; with --max-new-tokens {self.gen.max_new_tokens} "
                    f"the model's context of {self.context} tokens leaves {self.budget} for it")
            self.history.pop(0)
            dropped += 1
        self.dropped += dropped
        return dropped

    # ---------------------------------------------------------------- answer

    def respond(self, text: str, on_token: Callable[[str], None] | None = None) -> str:
        """Answer `text`, calling on_token(piece) as the answer grows (the pieces add up to the
        returned answer), and keep the turn in the history. A KeyboardInterrupt stops generation
        and propagates; the turn is then not kept."""
        text = text.strip()
        if not text:
            raise ValueError("empty message")
        self.trim_history(text)
        ids = self.prompt_ids(text)
        answer = AnswerFilter(self.stops)

        def emit(piece: str) -> bool:
            shown = answer.feed(piece)
            if shown and on_token is not None:
                on_token(shown)
            return answer.stopped

        self._generate(ids, emit)
        rest = answer.finish()
        if rest and on_token is not None:
            on_token(rest)
        self.history.append(Turn(text, answer.answer))
        return answer.answer

    def _generate(self, ids: list[int], emit: Callable[[str], bool]) -> None:
        """Run generate() on one prompt, handing the decoded text to `emit` as it arrives; emit
        returns True once the answer is complete (generation is then stopped)."""
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        tok = self.tokenizer
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        kw = generation_kwargs(self.gen, tok)
        kw.update(eos_token_id=eos_ids(self.model, tok), stop_strings=self.stops,
                  attention_mask=torch.ones_like(input_ids))
        done = threading.Event()
        kw["stopping_criteria"] = StoppingCriteriaList([_event_stopping_criteria(done)])

        if self.gen.num_beams > 1:  # transformers cannot stream beam search: answer at once
            with torch.no_grad():
                out = self.model.generate(input_ids=input_ids, **kw)
            emit(tok.decode(out[0, len(ids):], skip_special_tokens=True))
            return

        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(input_ids=input_ids, streamer=streamer, **kw)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
                streamer.end()  # unblock the reader

        thread = threading.Thread(target=work, name="dschat-generate", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if emit(piece):
                    done.set()  # stop generating; keep reading until generate() ends
        except BaseException:  # Ctrl-C while answering: stop the model, then let it propagate
            done.set()
            thread.join()
            raise
        thread.join()
        if errors:
            raise errors[0]
