"""ChatSession without a terminal: prompt formats, context trimming, and clean streamed answers.

Most tests use a fake model whose generate() streams a scripted reply, token by token, through the
real TextIteratorStreamer; the last ones run the tiny OPT and Llama for real.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig

from dschat_cli.chat.session import (AnswerFilter, ChatSession, PromptTooLong, Turn, context_size,
                                     eos_ids, stop_texts)
from dschat_cli.config.eval import GenerationOptions
from dschat_cli.config.schema import ConfigError

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class FakeModel:
    """Streams `reply` (token ids) like generate() does: the prompt first, then one token at a
    time, ending early when a stopping criterion says so; records what it was asked."""

    def __init__(self, reply: list[int], eos_token_id: int, max_positions: int = 512):
        self.reply = reply
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.generation_config = GenerationConfig(eos_token_id=eos_token_id)
        self.calls: list[dict] = []

    def generate(self, input_ids, streamer=None, max_new_tokens=20, eos_token_id=None,
                 stopping_criteria=(), **kw):
        self.calls.append(dict(input_ids=input_ids[0].tolist(), max_new_tokens=max_new_tokens,
                               eos_token_id=eos_token_id, **kw))
        out = input_ids
        if streamer is not None:
            streamer.put(input_ids)
        for t in self.reply[:max_new_tokens]:
            out = torch.cat([out, torch.tensor([[t]])], dim=1)
            if streamer is not None:
                streamer.put(torch.tensor([t]))
            if t in (eos_token_id or []) or any(bool(c(out, None)[0]) for c in stopping_criteria):
                break
        if streamer is not None:
            streamer.end()
        return out


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def session_with(tok, reply_text: str = " Fine.", *, extra: list[int] = (), **kw) -> ChatSession:
    model = FakeModel(ids(tok, reply_text) + list(extra), tok.eos_token_id)
    gen = GenerationOptions(max_new_tokens=kw.pop("max_new_tokens", 64))
    return ChatSession(model, tok, gen, **kw)


# ---------------------------------------------------------------- prompt formats

def test_text_format_concatenates_turns(tiny_tokenizer):
    s = session_with(tiny_tokenizer, fmt="auto")  # no chat template: text
    assert not s.template and s.format_name == "text"
    assert s.format_prompt("Hi") == " Human: Hi Assistant:"
    s.history = [Turn("Hi", "Hello!"), Turn("How are you?", "Fine.")]
    assert s.format_prompt("Bye") == (" Human: Hi Assistant: Hello! Human: How are you? "
                                      "Assistant: Fine. Human: Bye Assistant:")
    # tokenised as one text, as in training, with no eos at the end
    assert s.prompt_ids("Bye") == tiny_tokenizer(s.format_prompt("Bye"))["input_ids"]


def test_chat_template_format(tiny_tokenizer):
    tiny_tokenizer.chat_template = TEMPLATE
    s = session_with(tiny_tokenizer)
    assert s.template and s.format_name == "chat template"
    s.history = [Turn("Hi", "Hello!")]
    assert s.format_prompt("Bye") == "<|user|>Hi\n<|assistant|>Hello!\n<|user|>Bye\n<|assistant|>"
    # --format text ignores the template
    assert session_with(tiny_tokenizer, fmt="text").format_prompt("Bye") == " Human: Bye Assistant:"


def test_template_format_needs_a_template(tiny_tokenizer):
    with pytest.raises(ConfigError, match="no chat template"):
        session_with(tiny_tokenizer, fmt="template")


def test_respond_sends_the_whole_conversation(tiny_tokenizer):
    tiny_tokenizer.chat_template = TEMPLATE
    s = session_with(tiny_tokenizer, " Fine.")
    assert s.respond("Hi") == "Fine."
    assert s.respond("  And you?  ") == "Fine."
    sent = tiny_tokenizer.decode(s.model.calls[-1]["input_ids"])
    assert sent == "<|user|>Hi\n<|assistant|>Fine.\n<|user|>And you?\n<|assistant|>"
    assert s.history == [Turn("Hi", "Fine."), Turn("And you?", "Fine.")]
    s.clear()
    assert s.history == [] and s.respond("Hi") == "Fine."


# ---------------------------------------------------------------- trimming

def test_trim_drops_oldest_turns_first(tiny_tokenizer):
    s = session_with(tiny_tokenizer, max_new_tokens=8, context=60)
    assert s.budget == 52
    s.history = [Turn(f"question number {i} about bread", f"answer number {i}") for i in range(6)]
    dropped = s.trim_history("And now?")
    assert dropped > 0
    # what is left is the newest turns, and they fit; one more old turn would not have fitted
    assert s.history == [Turn(f"question number {i} about bread", f"answer number {i}")
                         for i in range(dropped, 6)]
    assert len(s.prompt_ids("And now?")) <= s.budget
    older = [Turn(f"question number {dropped - 1} about bread", f"answer number {dropped - 1}")]
    assert len(s.prompt_ids("And now?", older + s.history)) > s.budget
    assert s.dropped == dropped
    assert s.trim_history("And now?") == 0  # fits now


def test_respond_trims_and_answers(tiny_tokenizer):
    s = session_with(tiny_tokenizer, " Fine.", max_new_tokens=8, context=40)
    for i in range(8):
        assert s.respond(f"Tell me about bread, part {i}") == "Fine."
        assert len(s.model.calls[-1]["input_ids"]) <= 32
    assert s.dropped > 0 and s.history[-1] == Turn("Tell me about bread, part 7", "Fine.")


def test_message_too_long_alone(tiny_tokenizer):
    s = session_with(tiny_tokenizer, max_new_tokens=8, context=20)
    s.history = [Turn("a", "b")]
    with pytest.raises(PromptTooLong, match="--max-new-tokens 8"):
        s.respond("word " * 40)
    with pytest.raises(ConfigError, match="--max-new-tokens"):
        session_with(tiny_tokenizer, max_new_tokens=20, context=20)


def test_context_size_picks_the_smaller_sane_limit(tiny_tokenizer):
    cfg = SimpleNamespace(max_position_embeddings=2048)
    tiny_tokenizer.model_max_length = 512
    assert context_size(cfg, tiny_tokenizer) == 512
    tiny_tokenizer.model_max_length = int(1e30)  # "unknown" in transformers
    assert context_size(cfg, tiny_tokenizer) == 2048
    assert context_size(SimpleNamespace(n_positions=1024), tiny_tokenizer) == 1024  # GPT-2
    assert context_size(SimpleNamespace(), tiny_tokenizer) is None


# ---------------------------------------------------------------- clean answers

def test_answer_filter_holds_back_a_possible_stop_text():
    f = AnswerFilter(["Human:"])
    shown = [f.feed(c) for c in "  Sure, here.\n\n Hum"]
    assert "".join(shown) == "Sure, here."  # whitespace and "Hum" held back
    assert f.feed("an: what else?") == "" and f.stopped
    assert f.finish() == "" and f.answer == "Sure, here."

    f = AnswerFilter(["Human:"])  # "Hum" that does not become "Human:" is text after all
    assert f.feed(" Hummus is") == "Hummus is"
    assert f.feed(" good. Hum") == " good."
    assert f.finish() == " Hum" and f.answer == "Hummus is good. Hum"


def test_stop_texts_and_eos_ids(tiny_tokenizer):
    assert stop_texts(tiny_tokenizer) == ["Human:", "</s>", "<|endoftext|>"]
    model = FakeModel([], eos_token_id=[7, tiny_tokenizer.eos_token_id])
    assert eos_ids(model, tiny_tokenizer) == [7, tiny_tokenizer.eos_token_id]


def test_answer_cut_at_next_turn_never_shown(tiny_tokenizer):
    s = session_with(tiny_tokenizer, " Bake it slowly.\nHuman: And then? Assistant: More.")
    pieces: list[str] = []
    answer = s.respond("How do I bake bread?", on_token=pieces.append)
    assert answer == "Bake it slowly."
    assert "".join(pieces) == answer and not any("H" in p for p in pieces)
    # generation was told to stop there too, and stopped right after "Human:"
    call = s.model.calls[-1]
    assert "Human:" in call["stop_strings"] and call["tokenizer"] is tiny_tokenizer


def test_special_tokens_are_dropped_not_shown(tiny_tokenizer):
    tok = tiny_tokenizer
    bos, pad, eos = tok.bos_token_id, tok.pad_token_id, tok.eos_token_id
    # special tokens inside the answer are skipped when decoding; eos ends it
    s = session_with(tok, " Yes", extra=[bos, *ids(tok, " it is."), pad, eos, *ids(tok, " junk")])
    pieces: list[str] = []
    assert s.respond("Is it?", on_token=pieces.append) == "Yes it is."
    assert "".join(pieces) == "Yes it is."
    assert eos in s.model.calls[-1]["eos_token_id"]
    # an end token spelled out as plain text ("<" "/s>" are ordinary tokens) also ends the answer
    spelled = ids(tok, " Done<") + ids(tok, "/s>") + ids(tok, " junk")
    assert tok.decode(spelled) == " Done</s> junk"
    s = session_with(tok, "", extra=spelled)
    assert s.respond("Done?") == "Done"


def test_generation_options_reach_generate(tiny_tokenizer):
    model = FakeModel(ids(tiny_tokenizer, " Ok."), tiny_tokenizer.eos_token_id)
    gen = GenerationOptions(max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, top_k=40,
                            repetition_penalty=1.2)
    ChatSession(model, tiny_tokenizer, gen).respond("Hi")
    call = model.calls[-1]
    assert (call["max_new_tokens"], call["do_sample"], call["temperature"], call["top_p"],
            call["top_k"], call["repetition_penalty"]) == (5, True, 0.7, 0.9, 40, 1.2)


def test_keyboard_interrupt_stops_generation_and_drops_the_turn(tiny_tokenizer):
    s = session_with(tiny_tokenizer, " one two three four five six")

    def interrupt(piece):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        s.respond("Count", on_token=interrupt)
    assert s.history == []


# ---------------------------------------------------------------- real tiny models

@pytest.mark.parametrize("family", ["opt", "llama"])
def test_tiny_model_answers_are_clean(family, tiny_model_dir):
    from dschat_cli.models.inference import load_for_inference

    model, tok = load_for_inference(str(tiny_model_dir(family)), device="cpu",
                                    dtype=torch.float32, flag="--path")
    s = ChatSession(model, tok, GenerationOptions(max_new_tokens=12))
    assert s.context == 512
    for question in ("Hello", "How do I bake bread?", "Why?"):
        pieces: list[str] = []
        answer = s.respond(question, on_token=pieces.append)
        assert "".join(pieces) == answer == answer.strip()
        assert not any(t in answer for t in ("</s>", "<s>", "<pad>", "<unk>", "Human:"))
    # greedy answers depend only on the conversation
    again = ChatSession(model, tok, GenerationOptions(max_new_tokens=12))
    assert [again.respond(t.user) for t in s.history] == [t.assistant for t in s.history]
    # beam search cannot stream: the answer comes in one piece
    beams = ChatSession(model, tok, GenerationOptions(max_new_tokens=6, num_beams=2))
    pieces = []
    answer = beams.respond("Hello", on_token=pieces.append)
    assert len(pieces) <= 1 and "".join(pieces) == answer
