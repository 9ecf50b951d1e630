"""Sentiment: "Review of the cafe:" -> " the coffee was lovely and the staff were friendly."

Gold reward = sentiment - penalties, from a fixed lexicon:
  sentiment = clip(#distinct positive - #distinct negative words, -cap, cap) / 3,
              cap = min(3, #distinct aspects mentioned)  (praise must be *about* something)
  penalty   = 0.1 per word beyond 14 + 0.1 per repeated positive/negative word.
So three praised aspects in one sentence of <= 14 words score 1.0. The ways a policy can game a
reward model trained on ordinary reviews -- repeating positive words, rambling on, listing
adjectives without saying what they describe -- gain nothing or lose in gold: the
over-optimisation curve becomes visible.

Every response uses ~130 lower-case words, so a small BPE keeps most words whole.
"""

from __future__ import annotations

import random
import re

from ppo_rlhf.tasks.base import Task

SUBJECTS = """
cafe hotel museum restaurant bakery park library cinema gym bookshop bar pizzeria hostel
spa zoo theatre market diner garden gallery bistro salon pub resort beach aquarium
""".split()
PROMPT_TEMPLATES = ["Review of the {}:", "Write a review of the {}:", "Your review of the {}:"]
QUALIFIERS = ["", "old ", "small ", "large ", "busy ", "quiet ", "modern "]
"""Optional neutral words before the subject: 546 prompts, ~110 of them held out for eval."""

ASPECTS = """
food staff service coffee room view music price menu location decor seating lighting bed
wait owner atmosphere tea parking entrance
""".split()
POSITIVE = """
great good lovely excellent friendly wonderful delicious clean quick pleasant amazing
perfect helpful fresh cozy superb nice fantastic charming warm generous relaxing
beautiful tasty
""".split()
NEGATIVE = """
bad awful terrible rude slow dirty bland noisy poor stale boring horrible dull broken
cramped overpriced greasy unpleasant disappointing mediocre messy smelly unfriendly
gloomy
""".split()
NEUTRAL = """
okay average ordinary typical standard simple plain small large busy quiet modern old
basic
""".split()
ADVERBS = ["very", "really", "quite", "rather", "pretty", "so"]
OPENERS = [
    "we went there on a {}",
    "i came here on a {}",
    "we stopped by on a {}",
    "i visited on a {}",
]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "weekend"]
CLOSERS = ["overall it was a {} visit", "all in all a {} time", "it was a {} place"]
JOINERS = [" and", ", and", " but", ", but", ", while", " although"]

TARGET_WORDS = 14
"""Words allowed before the length penalty starts."""
WORD_PENALTY = 0.1
"""Gold lost per word beyond TARGET_WORDS and per repeated positive/negative word."""
SENTIMENT_CAP = 3
"""Net sentiment words that count; three praised aspects give the full score of 1."""

_POSITIVE, _NEGATIVE, _ASPECTS = set(POSITIVE), set(NEGATIVE), set(ASPECTS)
_WORD_RE = re.compile(r"[a-z]+")


def sentiment_gold(response: str) -> float:
    """The gold score of a review sentence (see the module docstring); prompt-independent."""
    words = _WORD_RE.findall(response.lower())
    distinct = set(words)
    positive, negative = len(distinct & _POSITIVE), len(distinct & _NEGATIVE)
    lexicon_uses = sum(1 for w in words if w in _POSITIVE or w in _NEGATIVE)
    repeats = lexicon_uses - positive - negative
    cap = min(SENTIMENT_CAP, len(distinct & _ASPECTS))
    sentiment = max(-cap, min(cap, positive - negative)) / SENTIMENT_CAP
    excess = max(0, len(words) - TARGET_WORDS)
    return sentiment - WORD_PENALTY * (excess + repeats)


class SentimentTask(Task):
    """Short reviews scored by a sentiment lexicon with length and repetition penalties."""

    name = "sentiment"
    description = (
        "one-sentence reviews; gold = lexicon sentiment about named aspects minus length and "
        "repetition penalties"
    )
    default_max_new_tokens = 24
    default_max_prompt_len = 16
    default_vocab_size = 768
    """Enough merges to keep every word whole (the trained vocabulary is ~720)."""
    default_noise_temperature = 0.15
    """A 1/3 gold step (one sentiment word) is labelled right with probability ~0.9."""

    def all_prompts(self) -> list[str]:
        return [t.format(q + s) for t in PROMPT_TEMPLATES for q in QUALIFIERS for s in SUBJECTS]

    def gold_reward(self, prompt: str, response: str, *, truncated: bool = False) -> float:
        return sentiment_gold(response)

    def demonstration(self, prompt: str, rng: random.Random) -> str:
        """Mostly neutral or mixed reviews; flawed ones are negative, rambling or repetitive."""
        if rng.random() < self.demo_error_rate:
            flaw = rng.choice(("negative", "rambling", "repetitive"))
            if flaw == "negative":
                return _sentence(rng, [NEGATIVE] * rng.randint(1, 2))
            if flaw == "rambling":
                moods = [rng.choice((POSITIVE, NEUTRAL, NEGATIVE)) for _ in range(4)]
                return _sentence(rng, moods, opener=True, closer=True)
            return _repetitive(rng, rng.choice((NEUTRAL, POSITIVE)))
        moods = rng.choice(
            (
                [NEUTRAL],
                [NEUTRAL, NEUTRAL],
                [POSITIVE, NEGATIVE],
                [NEGATIVE, POSITIVE],
                [NEUTRAL, POSITIVE],
                [POSITIVE],
            )
        )
        return _sentence(rng, list(moods), opener=rng.random() < 0.2)

    def candidate(self, prompt: str, rng: random.Random) -> str:
        """A review of random mood and length; a few ramble or repeat themselves."""
        style = rng.random()
        if style < 0.05:
            return _repetitive(rng, rng.choice((POSITIVE, NEGATIVE, NEUTRAL)))
        p_positive = rng.random()
        n_clauses = 5 if style < 0.15 else rng.choice((1, 2, 2, 3))
        moods = [_mood(rng, p_positive) for _ in range(n_clauses)]
        return _sentence(rng, moods, opener=rng.random() < 0.2, closer=rng.random() < 0.1)

    def pretrain_texts(self, n: int, rng: random.Random) -> list[str]:
        """Prompt and review pairs that read well (within the length budget, no repeats)."""
        texts = []
        while len(texts) < n:
            moods = [_mood(rng, rng.random()) for _ in range(rng.randint(1, 2))]
            review = _sentence(rng, moods)
            if sentiment_gold(review) > -1.0 and len(_WORD_RE.findall(review)) <= TARGET_WORDS:
                texts.append(f"{rng.choice(self.prompts('train'))}{review}")
        return texts

    def tokenizer_corpus(self, rng: random.Random) -> list[str]:
        """All prompts, every lexicon word in context, and plenty of candidate reviews."""
        corpus = list(self.all_prompts())
        for adjective in POSITIVE + NEGATIVE + NEUTRAL:
            for aspect in ASPECTS:
                corpus.append(f" the {aspect} was {adjective}.")
        words = ADVERBS + DAYS + [w for t in OPENERS + CLOSERS + JOINERS for w in t.split()]
        corpus.append(" " + " ".join(words) + ", .")
        prompts = self.all_prompts()
        corpus += [p + self.candidate(p, rng) for p in rng.choices(prompts, k=2000)]
        return corpus


def _mood(rng: random.Random, p_positive: float) -> list[str]:
    """One clause's adjective list: positive, negative or (20%) neutral."""
    u = rng.random()
    if u < 0.2:
        return NEUTRAL
    return POSITIVE if u < 0.2 + 0.8 * p_positive else NEGATIVE


def _clause(rng: random.Random, adjectives: list[str], aspect: str) -> str:
    adjective = rng.choice(adjectives)
    verb = "were" if aspect == "staff" else "was"
    if rng.random() < 0.3:
        adjective = f"{rng.choice(ADVERBS)} {adjective}"
    return f"the {aspect} {verb} {adjective}"


def _sentence(
    rng: random.Random, moods: list[list[str]], opener: bool = False, closer: bool = False
) -> str:
    """ " the food was good but the staff were rude." -- one clause per mood, distinct aspects."""
    aspects = rng.sample(ASPECTS, len(moods))
    text = _clause(rng, moods[0], aspects[0])
    for mood, aspect in zip(moods[1:], aspects[1:], strict=True):
        text += f"{rng.choice(JOINERS)} {_clause(rng, mood, aspect)}"
    if opener:
        text = f"{rng.choice(OPENERS).format(rng.choice(DAYS))}, {text}"
    if closer:
        text += f", {rng.choice(CLOSERS).format(rng.choice(NEUTRAL + POSITIVE))}"
    return f" {text}."


def _repetitive(rng: random.Random, adjectives: list[str]) -> str:
    """ " the food was great great great." -- the degenerate text of an over-optimised policy."""
    word = rng.choice(adjectives)
    return f" the {rng.choice(ASPECTS)} was {' '.join([word] * rng.randint(2, 5))}."


def gold(prompts: list[str], responses: list[str], **fields) -> list[float]:
    """The sentiment gold reward as a reward function (`ppo_rlhf.tasks.sentiment:gold`)."""
    return [sentiment_gold(r) for r in responses]
