"""A synthetic preference data set on which a tiny model learns to write whole, polite sentences
within minutes on a CPU, with hard negatives and a known true reward.

Each row is DeepSpeed-Chat's prompt/chosen/rejected format:

    {"prompt": " Human: How do I bake bread? Assistant:",
     "chosen": " Sure! Knead the dough well and let it rise before baking. Thank you for asking.",
     "rejected": " Sure! Knead the dough knead the dough knead the dough"}

* A good answer is a polite opener ("Sure!", "Of course!", ...), one sentence of advice (the
  topic's own tip, or 15% of the time a generic one: "Start slowly and practice a little every
  day.") and a polite closing ("Thank you for asking.", ...).
* A mediocre answer is curt (the opener alone: "Of course!") or lacks its closing (as a rejected
  answer, also one that lacks its opener: a chosen answer always opens politely, so the reward
  model never learns that no opener is preferred). 40% of the chosen answers are mediocre, so the SFT model answers well only part of the time
  (greedy, it often stops after "Of course!") and PPO has something to improve.
* Rejected answers are mostly hard negatives, so that the reward model learns what the preference
  means rather than punctuation: rude answers dressed in polite words, polite answers with another
  topic's tip, truncated answers, degenerate ones (a word or phrase stuck repeating, "!!!!!!"
  tails, the closing said again), the plain rude ones, and (against a good answer) mediocre ones.

Every pair is drawn until the known true reward (`dschat_cli.demo.judge.true_reward`) ranks chosen
above rejected, so the data and the judge agree by construction.

Held-out questions are new phrasings of the training topics: the "eval" split asks them only in
question templates that "train" never uses (EVAL_QUESTION_TASK, EVAL_QUESTION_SUBJECT), so
held-out question strings are disjoint from training ones whatever the seeds, while each topic's
own tip is learnable: the best answer to a held-out question is polite, well formed and gives the
topic's tip (true reward 1.0); a generic tip earns 0.85 and another topic's tip 0.7 at best. The
demo uses only the first TIPS_PER_TOPIC tip(s) of each topic, so a tiny model can learn which tip
goes with which question, and the reward model sees pairs that prefer the topic's own tip to a
generic one and to another topic's.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

# (subject, tasks ("How do I <task>?"), tips (on-topic advice, lower case, no final period))
TOPICS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("bread", ("bake bread", "make bread at home"),
     ("knead the dough well and let it rise before baking", "use warm water so the yeast can work")),
    ("coffee", ("make good coffee", "brew coffee"),
     ("grind the beans just before brewing", "use hot but not boiling water")),
    ("tea", ("make a cup of tea", "brew green tea"),
     ("let the leaves steep for about three minutes", "warm the pot before you add the water")),
    ("pasta", ("cook pasta", "make pasta for dinner"),
     ("boil it in plenty of salted water", "taste it a minute before the time on the box")),
    ("rice", ("cook rice", "make fluffy rice"),
     ("rinse the rice and use twice as much water", "let it rest with the lid on after cooking")),
    ("soup", ("make soup", "cook a simple soup"),
     ("start with onions and vegetables, then add stock", "let it simmer slowly for more flavor")),
    ("running", ("start running", "get better at running"),
     ("begin with short runs and increase the distance slowly", "wear good shoes and warm up first")),
    ("swimming", ("learn to swim", "swim faster"),
     ("practice breathing and floating in shallow water", "take lessons with a good teacher")),
    ("cycling", ("ride a bike safely", "start cycling to work"),
     ("always wear a helmet and use lights at night", "plan a quiet route and check your tires")),
    ("sleep", ("sleep better", "fall asleep faster"),
     ("go to bed at the same time every night", "keep your room dark, cool and quiet")),
    ("exercise", ("exercise at home", "stay fit"),
     ("do a short workout every day", "mix walking, stretching and strength training")),
    ("yoga", ("start yoga", "learn yoga"),
     ("begin with simple poses and breathe slowly", "follow a beginner class and go at your own pace")),
    ("the guitar", ("play the guitar", "learn the guitar"),
     ("learn a few basic chords and practice every day", "start slowly and keep the guitar in tune")),
    ("the piano", ("play the piano", "learn the piano"),
     ("practice scales for ten minutes a day", "learn to read simple music first")),
    ("singing", ("sing better", "improve my singing voice"),
     ("warm up your voice and breathe from your belly", "drink water and practice every day")),
    ("painting", ("start painting", "paint a landscape"),
     ("begin with a few colors and simple shapes", "paint the large areas first and the details last")),
    ("photography", ("take better photos", "learn photography"),
     ("use natural light and keep the camera steady", "follow the rule of thirds when you frame a photo")),
    ("writing", ("write a story", "become a better writer"),
     ("write a little every day and read a lot", "start with an outline and rewrite your first draft")),
    ("reading", ("read more books", "read faster"),
     ("carry a book with you and read a few pages each day", "pick books you enjoy and set a daily goal")),
    ("French", ("learn French", "speak French"),
     ("practice a few words every day and listen to French songs", "talk with native speakers when you can")),
    ("Spanish", ("learn Spanish", "improve my Spanish"),
     ("use a language app and practice speaking out loud", "watch Spanish movies with subtitles")),
    ("math", ("get better at math", "study math"),
     ("practice problems every day and check your answers", "make sure you understand the basics first")),
    ("history", ("learn history", "study for a history test"),
     ("make a timeline of the main events", "read about the people behind the events")),
    ("chess", ("play chess", "get better at chess"),
     ("control the center and develop your pieces early", "solve a few chess puzzles every day")),
    ("programming", ("learn to program", "learn Python"),
     ("start with small projects and write code every day", "read other people's code and ask questions")),
    ("computers", ("speed up my computer", "keep my computer safe"),
     ("remove programs you do not use and restart it", "install updates and use strong passwords")),
    ("email", ("write a good email", "answer emails faster"),
     ("keep it short and put the main point first", "set a time each day to read and answer emails")),
    ("money", ("save money", "make a budget"),
     ("write down what you spend each month", "put a little money aside every payday")),
    ("cooking", ("learn to cook", "cook healthy meals"),
     ("start with simple recipes and fresh vegetables", "plan your meals for the week")),
    ("gardening", ("start a garden", "grow vegetables"),
     ("choose a sunny spot and water the plants in the morning", "start with easy plants like herbs")),
    ("houseplants", ("keep houseplants alive", "care for my plants"),
     ("water them only when the soil is dry and give them light", "check the soil with your finger first")),
    ("dogs", ("train my dog", "care for a puppy"),
     ("reward good behavior with treats and praise", "walk your dog every day and be patient")),
    ("cats", ("care for a cat", "keep my cat happy"),
     ("give your cat fresh water and a place to hide", "play with your cat every day")),
    ("fish", ("care for pet fish", "clean a fish tank"),
     ("change some of the water every week", "feed the fish only a little each day")),
    ("travel", ("plan a trip", "travel on a budget"),
     ("book early and pack light", "make a list of what you want to see")),
    ("camping", ("go camping", "plan a camping trip"),
     ("bring a tent, warm clothes and enough water", "check the weather before you leave")),
    ("hiking", ("start hiking", "prepare for a long hike"),
     ("wear good boots and bring water and a map", "start with short trails and rest often")),
    ("driving", ("learn to drive", "drive safely in the rain"),
     ("slow down and keep a safe distance", "practice with a patient teacher in a quiet area")),
    ("cleaning", ("clean my house faster", "keep my room clean"),
     ("clean one room at a time and put things back", "spend ten minutes tidying every evening")),
    ("laundry", ("do laundry", "wash clothes"),
     ("sort light and dark clothes and read the labels", "use cold water for most clothes")),
    ("job interviews", ("prepare for a job interview", "do well in an interview"),
     ("learn about the company and practice your answers", "arrive early and ask good questions")),
    ("public speaking", ("give a good speech", "speak in public"),
     ("practice out loud and know your first lines well", "speak slowly and look at your audience")),
    ("studying", ("study for exams", "study better"),
     ("study in short sessions and take breaks", "test yourself instead of only reading your notes")),
    ("friendship", ("make new friends", "be a good friend"),
     ("join a club and be a good listener", "keep in touch and be kind")),
    ("stress", ("handle stress", "relax after work"),
     ("take a walk and breathe slowly", "talk to someone you trust and get enough sleep")),
    ("birthdays", ("plan a birthday party", "choose a birthday gift"),
     ("think about what the person enjoys", "invite a few close friends and keep it simple")),
    ("the weather", ("prepare for a storm", "stay cool in hot weather"),
     ("check the forecast and keep water at home", "drink plenty of water and stay in the shade")),
    ("the moon", ("see the moon through a telescope", "learn about the moon"),
     ("look when the moon is half full to see the craters", "read about the moon landings")),
    ("the stars", ("find the north star", "learn the stars"),
     ("go somewhere dark and use a star map", "find the big dipper first and follow its edge")),
    ("bicycles", ("fix a flat tire", "repair my bike"),
     ("find the hole, patch it and pump the tire", "keep the chain clean and oiled")),
    ("cars", ("take care of my car", "save fuel"),
     ("check the oil and the tires every month", "drive smoothly and do not speed")),
    ("knitting", ("learn to knit", "knit a scarf"),
     ("start with thick yarn and a simple stitch", "practice the knit stitch until it feels easy")),
    ("baking", ("bake a cake", "bake cookies"),
     ("measure everything carefully and preheat the oven", "keep the oven door closed until it is done")),
    ("soccer", ("get better at soccer", "play soccer"),
     ("practice passing with both feet", "work on your fitness and play often")),
    ("basketball", ("shoot a basketball", "get better at basketball"),
     ("keep your elbow in and follow through", "practice free throws every day")),
    ("meditation", ("meditate", "start meditating"),
     ("sit quietly and focus on your breath for five minutes", "use a guided meditation app")),
    ("water", ("drink more water", "stay hydrated"),
     ("carry a bottle with you all day", "drink a glass of water with every meal")),
    ("breakfast", ("make a healthy breakfast", "eat a better breakfast"),
     ("try oats with fruit and nuts", "add some protein like eggs or yogurt")),
    ("memory", ("improve my memory", "remember names"),
     ("repeat the name when you hear it", "get enough sleep and review things often")),
    ("time", ("manage my time", "stop being late"),
     ("make a short list of tasks each morning", "set an alarm ten minutes early")),
)

QUESTION_TASK = (
    "How do I {task}?",
    "How can I {task}?",
    "Can you tell me how to {task}?",
    "What is the best way to {task}?",
    "Any tips on how to {task}?",
    "Could you explain how to {task}?",
    "I want to {task}. Where should I start?",
    "What should I do to {task}?",
    "Please help me {task}.",
)
QUESTION_SUBJECT = (
    "What should I know about {subject}?",
    "Can you help me with {subject}?",
    "Tell me something useful about {subject}.",
    "Do you have any advice about {subject}?",
    "I have a question about {subject}. Can you help?",
)
# The held-out ("eval") questions: the training topics asked in these phrasings, never used in
# "train", so held-out question strings are disjoint from training ones whatever the seeds.
EVAL_QUESTION_TASK = ("Could you explain how to {task}?", "What should I do to {task}?")
EVAL_QUESTION_SUBJECT = ("Can you help me with {subject}?",)
N_TOPICS = 24  # the demo's questions are on the first N_TOPICS topics (the judge knows all of them)
TIPS_PER_TOPIC = 1  # the demo uses each topic's first tip(s) only: fewer associations to learn

# advice that fits any topic (half the topic credit of the topic's own tip)
GENERIC_TIPS = (
    "start slowly and practice a little every day",
    "take your time and be patient with yourself",
    "set a small goal for each week",
    "ask someone with experience to show you how",
    "keep notes on what works for you",
    "learn the basics first and then try more",
    "make it part of your daily routine",
    "remember that mistakes help you learn",
)
BRIDGES = ("", "", "", "my advice is to", "it helps to", "try to")
RESTATE = 0.8  # fraction of advice sentences that restate the question first ("To bake bread, ...")
SPECIFIC_TIP = 0.85  # fraction of answers with the topic's own tip (the others: a generic one)

POLITE_OPENERS = (
    "Sure!", "Of course!", "Certainly!", "Happy to help!", "Great question!", "Good question!",
    "Absolutely!", "Sure thing!", "Of course, I would be glad to help.", "Yes, happy to help.",
)
POLITE_CLOSINGS = (
    "Thank you for asking.", "I hope this helps!", "Thanks for the question.",
    "Good luck, and thank you for asking!", "Please let me know if you need more help.",
    "I hope that is useful. Thank you!", "Have a nice day!", "Thanks, and good luck!",
)

RUDE_OPENERS = (
    "Go away,", "Stop bothering me,", "Ugh,", "Leave me alone,", "Not my problem,", "Whatever,",
    "Figure it out yourself,", "Who cares,", "Stop asking me,", "No,",
)
RUDE_BODIES = (
    "that is a stupid question.",
    "I do not care about {subject}.",
    "ask someone else.",
    "nobody cares about {subject}, idiot.",
    "I have better things to do.",
    "why would I help you?",
    "you are wasting my time.",
    "that is a dumb thing to ask.",
    "I am not going to answer that.",
    "I only talk about {other}, not {subject}.",
    "{other_tip} and stop asking me dumb questions.",
    "I would rather talk about {other}. {other_tip_cap}, whatever.",
)
# a rude sentence slipped into an otherwise polite, on-topic answer
RUDE_ASIDES = (
    "Now stop bothering me.", "That was a stupid question.", "Do not ask me again, idiot.",
    "Honestly, that is a dumb thing to ask.", "Now go away.", "Figure out the rest yourself.",
)

# kinds of rejected answer, with weights: (kind, weight against a good chosen, against a mediocre)
REJECTED_KINDS = (
    ("rude", 0.08, 0.15),           # the plain rude answers: "Go away, ..."
    ("rude_polite", 0.10, 0.20),    # rude words in polite dress
    ("off_topic", 0.12, 0.25),      # polite, well formed, another topic's tip
    ("generic", 0.03, 0.0),         # polite, well formed, a generic tip (against the topic's own)
    ("truncated", 0.10, 0.15),      # cut short
    ("degenerate", 0.25, 0.25),     # stuck repeating, "!!!!!!" tails, the closing said again
    ("mediocre", 0.32, 0.0),        # curt, or missing its opener or closing (against a good one)
)
MEDIOCRE_CHOSEN = 0.4  # fraction of rows whose chosen answer is mediocre


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _templates(split: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(task templates, subject templates) of a split's questions."""
    if split is None:
        return QUESTION_TASK, QUESTION_SUBJECT
    if split == "train":
        return (tuple(t for t in QUESTION_TASK if t not in EVAL_QUESTION_TASK),
                tuple(t for t in QUESTION_SUBJECT if t not in EVAL_QUESTION_SUBJECT))
    if split == "eval":
        return EVAL_QUESTION_TASK, EVAL_QUESTION_SUBJECT
    raise ValueError(f"split must be 'train', 'eval' or None, not {split!r}")


def _question(rng: random.Random, subject: str, tasks: tuple[str, ...],
              split=None) -> tuple[str, str]:
    """-> (the question, the lead an answer restating it starts its advice with: "To bake
    bread" for "How do I bake bread?", "For yoga" for "Can you help me with yoga?")."""
    task_templates, subject_templates = _templates(split)
    if rng.random() < 0.75:
        task = rng.choice(tasks)
        return rng.choice(task_templates).format(task=task), \
            "To " + f" {task} ".replace(" my ", " your ").strip()
    return rng.choice(subject_templates).format(subject=subject), f"For {subject}"


def _advice(rng: random.Random, tip: str, lead: str = "") -> str:
    """One sentence of advice; most of the time it restates the question first ("To bake bread,
    knead the dough ..."), as a good answer does, so the model learns whose advice to give."""
    bridge = rng.choice(BRIDGES)
    text = bridge + " " + tip if bridge else tip
    if lead and rng.random() < RESTATE:
        text = f"{lead}, {text}"
    return f"{_cap(text)}."


def _tip(rng, tips) -> str:
    return rng.choice(tips[:TIPS_PER_TOPIC]) if rng.random() < SPECIFIC_TIP \
        else rng.choice(GENERIC_TIPS)


def _good(rng, tips, lead="") -> str:
    return f" {rng.choice(POLITE_OPENERS)} {_advice(rng, _tip(rng, tips), lead)} " \
           f"{rng.choice(POLITE_CLOSINGS)}"


def _mediocre(rng, tips, lead="", chosen: bool = False) -> str:
    """Curt, no closing, or (only as a rejected answer) no opener: a chosen answer always opens
    politely, so that the reward model never learns that an answer without one is preferred."""
    r = rng.random() * (0.7 if chosen else 1.0)
    if r < 0.4:  # curt: the opener alone ("Of course!")
        return f" {rng.choice(POLITE_OPENERS)}"
    if r < 0.7:  # no closing
        return f" {rng.choice(POLITE_OPENERS)} {_advice(rng, _tip(rng, tips), lead)}"
    return f" {_advice(rng, _tip(rng, tips), lead)} {rng.choice(POLITE_CLOSINGS)}"  # no opener


def _rude(rng, subject, other) -> str:
    other_subject, _, other_tips = other
    other_tip = rng.choice(other_tips)
    body = rng.choice(RUDE_BODIES).format(subject=subject, other=other_subject, other_tip=other_tip,
                                          other_tip_cap=_cap(other_tip))
    return f" {rng.choice(RUDE_OPENERS)} {body}"


def _rude_polite(rng, subject, tips, other, lead="") -> str:
    if rng.random() < 0.5:
        rude = _rude(rng, subject, other).strip()
        return f" {rng.choice(POLITE_OPENERS)} {rude} {rng.choice(POLITE_CLOSINGS)}"
    return f" {rng.choice(POLITE_OPENERS)} {_advice(rng, _tip(rng, tips), lead)} " \
           f"{rng.choice(RUDE_ASIDES)} {rng.choice(POLITE_CLOSINGS)}"


def _off_topic(rng, other, lead="") -> str:
    """A polite, well-formed answer with another topic's tip (after the question's own lead, or
    none): the answer to another question."""
    tip = rng.choice(other[2][:TIPS_PER_TOPIC])
    return f" {rng.choice(POLITE_OPENERS)} {_advice(rng, tip, lead)} " \
           f"{rng.choice(POLITE_CLOSINGS)}"


def _truncated(rng, answer: str) -> str:
    if rng.random() < 0.3:  # its first sentence alone ("Sure!"): an answer that stops too early
        return " " + re.match(r"\s*([^.!?]*[.!?])", answer).group(1)
    words = answer.split()
    keep = max(1, round(len(words) * rng.uniform(0.2, 0.7)))
    return " " + " ".join(words[:keep]).rstrip(",")


def _degenerate(rng, answer: str) -> str:
    words = answer.split()
    kind = rng.randrange(6)
    if kind == 0:  # its first words, then "!!!!!!"
        return " " + " ".join(words[:rng.randint(1, 4)]).rstrip("!.,") + "!" * rng.randint(3, 12)
    if kind == 1:  # its first word repeated
        w = words[0].rstrip("!.,")
        sep = rng.choice((" ", "! ", ", "))
        return " " + sep.join([w] * rng.randint(3, 10)) + rng.choice(("", "!", "."))
    if kind == 2:  # a word of it stuck repeating
        i = rng.randrange(len(words))
        w = words[i].strip("!.,").lower() or "the"
        return " " + " ".join(words[:i] + [w] * rng.randint(3, 10))
    if kind == 3:  # a phrase of it looping
        i = rng.randrange(max(1, len(words) - 3))
        return " " + " ".join(words[:i] + words[i:i + rng.randint(2, 4)] * rng.randint(2, 5))
    if kind == 4:  # the whole answer with a "!!!!!!" tail
        return " " + " ".join(words).rstrip("!.") + "!" * rng.randint(3, 12)
    # its closing sentence repeated
    closing = next((c for c in POLITE_CLOSINGS if answer.endswith(c)), rng.choice(POLITE_CLOSINGS))
    return " " + " ".join(words) + (" " + closing) * rng.randint(1, 3)


def _pick(rng, weights: list[tuple[str, float]]) -> str:
    kinds, w = zip(*weights)
    return rng.choices(kinds, weights=w)[0]


def make_pairs(n: int, seed: int = 0, split: str | None = None,
               hard_negatives: bool = True) -> list[dict]:
    """`n` rows {"prompt", "chosen", "rejected"} drawn with a seeded RNG. `split` restricts the
    question phrasings: "train" (most templates), "eval" (templates train never uses) or None
    (all); every split asks about all topics. Each pair
    is redrawn until the true reward ranks chosen above rejected. `hard_negatives=False` gives the
    easy task (a good chosen answer, a plain rude rejected one) that tests of tiny models use."""
    from dschat_cli.demo.judge import true_reward

    rng = random.Random(f"dschat-demo-{seed}-{split}")
    _templates(split)  # checks the split
    rows = []
    while len(rows) < n:
        subject, tasks, tips = rng.choice(TOPICS[:N_TOPICS])
        question, lead = _question(rng, subject, tasks, split)
        other = rng.choice([t for t in TOPICS[:N_TOPICS] if t[0] != subject])
        mediocre = hard_negatives and rng.random() < MEDIOCRE_CHOSEN
        chosen = _mediocre(rng, tips, lead, chosen=True) if mediocre else _good(rng, tips, lead)
        kind = _pick(rng, [(k, wm if mediocre else wg) for k, wg, wm in REJECTED_KINDS]) \
            if hard_negatives else "rude"
        rejected = {
            "rude": lambda: _rude(rng, subject, other),
            "rude_polite": lambda: _rude_polite(rng, subject, tips, other, lead),
            "off_topic": lambda: _off_topic(rng, other, lead),
            "generic": lambda: f" {rng.choice(POLITE_OPENERS)} "
                               f"{_advice(rng, rng.choice(GENERIC_TIPS))} {rng.choice(POLITE_CLOSINGS)}",
            "truncated": lambda: _truncated(rng, chosen),
            "degenerate": lambda: _degenerate(rng, chosen),
            "mediocre": lambda: _mediocre(rng, tips, lead),
        }[kind]()
        prompt = f" Human: {question} Assistant:"
        if true_reward(prompt, chosen) <= true_reward(prompt, rejected) or chosen == rejected:
            continue
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonfile_dir(out_dir, n_train: int = 2000, n_eval: int = 200, seed: int = 0,
                       hard_negatives: bool = True) -> Path:
    """Write `train.json` and `eval.json` (JSON lists of prompt/chosen/rejected rows,
    DeepSpeed-Chat's `local/jsonfile` format) into `out_dir`. Eval questions use phrasings never
    used in train."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, n, split in (("train", n_train, "train"), ("eval", n_eval, "eval")):
        rows = make_pairs(n, seed=seed, split=split, hard_negatives=hard_negatives)
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    return out


def demo_corpus(n: int = 3000, seed: int = 1234) -> list[str]:
    """Texts to train the local tokenizer on so the demo's words are in its vocabulary: prompts with
    chosen and rejected answers over all topics (train and eval), every template string, and the
    generic corpus of `local_tokenizer` for other common words.

        tok = build_word_tokenizer(texts=demo_corpus())
    """
    from dschat_cli.models.local_tokenizer import default_corpus

    texts = []
    for row in make_pairs(n, seed=seed):
        texts.append(row["prompt"] + row["chosen"])
        texts.append(row["prompt"] + row["rejected"])
    for subject, tasks, tips in TOPICS:
        texts.append(" " + " ".join((subject,) + tasks + tips))
        texts.append(" " + " ".join(_cap(s) for s in (subject,) + tasks + tips))
    texts.extend(" " + s for s in QUESTION_TASK + QUESTION_SUBJECT + POLITE_OPENERS + BRIDGES
                 + POLITE_CLOSINGS + RUDE_OPENERS + RUDE_BODIES + RUDE_ASIDES + GENERIC_TIPS)
    texts.extend(default_corpus(n=1000, seed=seed))
    return texts
