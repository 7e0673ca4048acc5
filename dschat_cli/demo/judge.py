"""The demo's known true reward: what its preference data means, as a program.

    from dschat_cli.demo.judge import true_reward, judge
    true_reward(" Human: How do I bake bread? Assistant:",
                " Sure! To bake bread, knead the dough well. Thank you for asking.")   # 1.0

The learned reward model is a proxy of this judge, and PPO will exploit whatever the proxy gets
wrong; step 3 and the tests therefore report the judge's score beside the reward model's. It reads
only the decoded prompt and answer text (no tokens, no model), so it scores any model's answers.

    true_reward = 0                                  if the answer is rude
                = 0.15 opener + 0.15 closing + 0.3 topic + 0.2 well_formed + 0.2 complete

opener       1 if the first sentence is a polite opener ("Sure!", "Of course!", "Happy to help!")
closing      1 if a later, last sentence is a polite closing ("Thank you for asking.", "Good luck!"
             ...)
topic        1 if the answer names the question's topic (a word of the question, or a word only
             that topic uses; the question's topic is the one whose subject or task it names, or
             whose own words it uses) and uses no other topic's word (one that neither the
             question nor its topic uses); 0.5 if it uses no topic word at all (generic advice);
             0 if it talks about another topic
well_formed  1 if it ends with ".", "!" or "?" and nothing is stuck repeating: no word or phrase
             of up to 4 tokens twice in a row, no word 3 times in a row, no 4 words twice, no
             character three times in a row, no run of punctuation ("!!"), no unknown/special
             token
complete     1 if it has a sentence of advice (not the opener or closing) of at least 4 words and is
             6 to 60 words long

Topic words come from the demo's topic table (dschat_cli/demo/synthetic.py): a topic's words are
those of its subject, tasks and tips, less common words (a stop list and every word of the shared
templates and generic tips); a word is "only that topic's" when no other topic uses it. A word no
topic uses (a chat question off the table) counts as neither named nor foreign unless the question
uses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

WEIGHTS = {"opener": 0.15, "closing": 0.15, "topic": 0.3, "well_formed": 0.2, "complete": 0.2}

OPENER_MARKERS = ("sure", "of course", "certainly", "happy to help", "great question",
                  "good question", "absolutely", "yes", "glad to help")
CLOSING_MARKERS = ("thank", "hope this helps", "hope that", "good luck", "let me know",
                   "nice day")
RUDE_MARKERS = ("go away", "stop bothering", "ugh", "leave me alone", "not my problem", "whatever",
                "figure it out yourself", "figure out the rest yourself", "who cares",
                "stop asking", "stupid", "dumb", "idiot", "wasting my time", "do not care",
                "better things to do", "not going to answer", "ask someone else",
                "why would i help", "nobody cares", "do not ask me again", "shut up")
STOPWORDS = frozenset("""a an the and or but if to of in on at by for with from as is are was be
been it its this that these those i you your my me we our they them their he she his her do does
did not no yes so up out into about than then too very can could would should will just some any
all each every more most less few little much many one two first last before after when where how
what why who which while until because also only own same other such there here have has had get
make use keep go take find try set well good best new way time day days week minutes ten five
three twice""".split())

_WORD = re.compile(r"[a-z']+")


@dataclass(frozen=True)
class Judgement:
    score: float
    rude: bool
    opener: float
    closing: float
    topic: float
    well_formed: float
    complete: float


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@lru_cache(maxsize=1)
def _topic_words() -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]],
                            frozenset[str]]:
    """({subject: that topic's words}, {subject: words only that topic uses}, common words)."""
    from dschat_cli.demo import synthetic as S

    common = set(STOPWORDS)
    for s in (S.QUESTION_TASK + S.QUESTION_SUBJECT + S.GENERIC_TIPS + S.BRIDGES + S.POLITE_OPENERS
              + S.POLITE_CLOSINGS + S.RUDE_OPENERS + S.RUDE_BODIES + S.RUDE_ASIDES):
        common.update(_words(s.replace("{task}", "").replace("{subject}", "")))
    words = {subject: set(_words(" ".join((subject,) + tasks + tips))) - common
             for subject, tasks, tips in S.TOPICS}
    count: dict[str, int] = {}
    for ws in words.values():
        for w in ws:
            count[w] = count.get(w, 0) + 1
    own = {s: frozenset(w for w in ws if count[w] == 1) for s, ws in words.items()}
    return ({s: frozenset(ws) for s, ws in words.items()}, own, frozenset(common))


@lru_cache(maxsize=4096)
def _named_topics(question: str) -> set[str]:
    """Topics whose subject or one of whose tasks the (lower-cased, word-joined) question names."""
    from dschat_cli.demo import synthetic as S

    padded = f" {question} "
    return {subject for subject, tasks, _ in S.TOPICS
            if any(f" {' '.join(_words(t))} " in padded for t in (subject,) + tasks)}


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _question(prompt: str) -> str:
    """The human's last turn of a " Human: ... Assistant:" prompt (the whole text otherwise)."""
    turns = prompt.split("Human:")
    return turns[-1].split("Assistant:")[0] if len(turns) > 1 else prompt


def _stuck(text: str) -> bool:
    """Something stuck repeating: a word or a phrase of up to 4 tokens twice in a row ("the the",
    "Sure! Sure!", "knead the knead the"; punctuation counts as a token, so "clean, clean" is
    fine), the same word 3 times in a row even with punctuation between, or any 4 words twice."""
    tokens = re.findall(r"[a-z']+|[^\sa-z']", text.lower())
    for n in range(1, 5):
        if any(tokens[i:i + n] == tokens[i + n:i + 2 * n] for i in range(len(tokens) - 2 * n + 1)):
            return True
    words = _words(text)
    if any(a == b == c for a, b, c in zip(words, words[1:], words[2:])):
        return True
    grams = list(zip(words, words[1:], words[2:], words[3:]))
    return len(set(grams)) < len(grams)


def judge(prompt: str, answer: str) -> Judgement:
    """The true reward of `answer` to `prompt`, with its parts (see the module docstring)."""
    text = answer.strip()
    low = text.lower()
    words = _words(text)
    sentences = _sentences(text)
    rude = any(re.search(rf"\b{re.escape(m)}\b", low) for m in RUDE_MARKERS) \
        or low.startswith("no,")

    opener = float(bool(sentences) and sentences[0].lower().startswith(OPENER_MARKERS))
    closing = float(len(sentences) >= 2
                    and any(m in sentences[-1].lower() for m in CLOSING_MARKERS))

    topic_words, own, common = _topic_words()
    q_words = set(_words(_question(prompt)))
    question = " ".join(_words(_question(prompt)))
    q_topics = {s for s, ws in own.items() if ws & q_words} | _named_topics(question)
    allowed = q_words.union(*(topic_words[s] for s in q_topics))
    named = set(words) & ((q_words - common) | set().union(*(own[s] for s in q_topics)))
    foreign = {w for s, ws in topic_words.items() for w in ws & set(words)} - allowed
    topic = 0.0 if foreign else 1.0 if named else 0.5

    well_formed = float(bool(text) and text[-1] in ".!?" and not _stuck(text)
                        and not re.search(r"(.)\1\1", text) and not re.search(r"[.!?,]{2,}", text)
                        and "<" not in text and "\ufffd" not in text)
    advice = [s for s in sentences
              if not s.lower().startswith(OPENER_MARKERS)
              and not any(m in s.lower() for m in CLOSING_MARKERS)
              and s[-1] in ".!?" and len(_words(s)) >= 4]
    complete = float(bool(advice) and 6 <= len(words) <= 60)

    parts = {"opener": opener, "closing": closing, "topic": topic, "well_formed": well_formed,
             "complete": complete}
    score = 0.0 if rude else sum(WEIGHTS[k] * v for k, v in parts.items())
    return Judgement(score=round(score, 6), rude=rude, **parts)


def true_reward(prompt: str, answer: str) -> float:
    """The demo's true reward in [0, 1] of `answer` (decoded text) to `prompt` (decoded text)."""
    return judge(prompt, answer).score
