"""A byte-level BPE tokenizer trained locally in a fraction of a second.

Used where no real tokenizer can be downloaded: tiny test models, the built-in demo, and
`--random-init` architecture presets on an offline machine (the model's embedding keeps the
preset's vocabulary size, which is what sets the compute cost). Byte-level BPE encodes any text,
so nothing is ever <unk>.

Special tokens: <pad>=0, </s>=1, <s>=2, <unk>=3.
"""

from __future__ import annotations

import random
from typing import Iterable

SPECIAL_TOKENS = ("<pad>", "</s>", "<s>", "<unk>")


def default_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Synthetic "Human: ... Assistant: ..." lines covering common English words."""
    rng = random.Random(seed)
    words = ("the a an is are was be to of and in that it for on with as at by from this what how why "
             "who when where which can could would should will do does did have has had not no yes "
             "please thank you thanks sorry help tell me about explain name good bad great nice sure "
             "answer question here there I we they he she my your our their time day year people way "
             "water food house city world music book movie dog cat car money work school friend "
             "happy sad kind rude polite useful helpful stupid idiot go away fine ok hello hi").split()
    lines = []
    for _ in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        a = " ".join(rng.choice(words) for _ in range(rng.randint(3, 16)))
        lines.append(f" Human: {q.capitalize()}? Assistant: {a.capitalize()}.")
    lines.append("".join(chr(c) for c in range(32, 127)))
    return lines


def build_local_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512,
                          model_max_length: int = 2048):
    """Train a byte-level BPE tokenizer on `texts` (default: a built-in synthetic corpus) and wrap it
    as a transformers fast tokenizer with pad/eos/bos/unk set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts) if texts is not None else default_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


# A word, with the space before it (" bread"), or one character of punctuation ("!", ",").
WORD_PATTERN = r" ?[A-Za-z0-9']+| ?[^\sA-Za-z0-9']|\s+"


def build_word_tokenizer(texts: Iterable[str] | None = None, model_max_length: int = 2048,
                         min_frequency: int = 1):
    """A word-level tokenizer trained on `texts` (default: the built-in synthetic corpus): one token
    per word together with its leading space (" bread") and one per punctuation mark, so "!!!" is
    three "!" tokens. An answer is ~4x fewer tokens than with a small BPE vocabulary, which makes
    generation and PPO cheap for the demo. Words not seen in `texts` encode as <unk>.

    Spaces are kept inside the tokens through the byte-level alphabet (" bread" -> "Ġbread"), so
    decoding restores the text exactly, and offsets map tokens back to characters (step 1 needs
    them to find where the prompt ends). Saved as a normal fast tokenizer (tokenizer.json) that
    AutoTokenizer loads. Special tokens as `build_local_tokenizer`: <pad>=0, </s>=1, <s>=2,
    <unk>=3."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS),
                                        min_frequency=min_frequency, show_progress=False)
    tok.train_from_iterator(list(texts) if texts is not None else default_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>", unk_token="<unk>",
                                   model_max_length=model_max_length)
