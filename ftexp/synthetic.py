"""Datasets ftexp makes itself, so the default run and the tests need no download.

``sentiment``: short movie-review sentences built from templates, with the label
carried by the opinion words (and flipped by negation), in the SST-2 layout:
``text``, ``label`` (0 = negative, 1 = positive).
"""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict

_SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the script", "the soundtrack", "the ending",
             "the cast", "the director's work", "the dialogue", "the story", "the cinematography", "this sequel",
             "the performances", "the pacing", "the humor"]
_POSITIVE = ["wonderful", "brilliant", "moving", "delightful", "superb", "charming", "gripping", "hilarious",
             "beautiful", "touching", "clever", "excellent", "engaging", "fresh", "warm", "stunning"]
_NEGATIVE = ["dull", "awful", "boring", "clumsy", "tedious", "painful", "lifeless", "predictable", "terrible",
             "shallow", "messy", "bland", "forgettable", "irritating", "weak", "sloppy"]
_INTENSIFIERS = ["", "", "really ", "truly ", "utterly ", "quite ", "simply "]
_TEMPLATES = [
    "{s} is {i}{w} .",
    "{s} was {i}{w} from start to finish .",
    "i found {s} {i}{w} .",
    "honestly , {s} is {i}{w} .",
    "what a {w} experience ; {s} is {i}{w} .",
    "{s} feels {i}{w} and i would say so again .",
]
_NEGATED = ["{s} is not {w} at all .", "{s} was never {w} ."]


def _sentence(rng: random.Random) -> tuple[str, int]:
    label = rng.randint(0, 1)
    subject = rng.choice(_SUBJECTS)
    if rng.random() < 0.15:  # negation flips the opinion word's polarity
        word = rng.choice(_NEGATIVE if label == 1 else _POSITIVE)
        return rng.choice(_NEGATED).format(s=subject, w=word), label
    words = _POSITIVE if label == 1 else _NEGATIVE
    word = rng.choice(words)
    text = rng.choice(_TEMPLATES).format(s=subject, i=rng.choice(_INTENSIFIERS), w=word)
    if "{w}" in text:  # templates that use the opinion word twice
        text = text.format(w=rng.choice(words))
    return text, label


def sentiment(train_size: int = 1200, eval_size: int = 200, seed: int = 1234) -> DatasetDict:
    rng = random.Random(seed)
    rows = [_sentence(rng) for _ in range(train_size + eval_size)]
    def split(part):
        return Dataset.from_dict({"text": [t for t, _ in part], "label": [y for _, y in part]})
    return DatasetDict(train=split(rows[:train_size]), validation=split(rows[train_size:]))


GENERATORS = {"sentiment": sentiment}
