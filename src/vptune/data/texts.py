"""Template text about scenes (``scenes.py``): captions, VQA questions and NLVR statements.

Every sentence is made from a scene's description only, with a fixed small vocabulary
(``tokenizer.py`` ships it), so what a text says is decided by the picture. ``caption`` without
a random generator is the canonical caption (every item with its size, kind, place and,
when not upright, rotation: unique enough to retrieve a canvas by); with one it is a
paraphrase that may reorder items, leave attributes out or call an item just "item", which is
what pretraining and zero-shot prompts (``class_texts``) need.
"""

from __future__ import annotations

import re

import numpy as np

from .scenes import PLACES, SIZES, Item, Scene

KINDS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
KIND_PLURALS = ("t-shirts", "trousers", "pullovers", "dresses", "coats", "sandals", "shirts", "sneakers", "bags", "ankle boots")
ROTATION_PHRASES = {0: "upright", 90: "turned left", 180: "upside down", 270: "turned right"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

# The VQA question templates, by question type. Slots: {kind}, {a_kind} (with its article), {kinds}
# (plural), {place}, {size}.
QUESTIONS = {
    "what": ("what is at the {place}?", "what is the item at the {place}?", "which item is at the {place}?"),
    "where": ("where is the {kind}?", "where is the {kind} placed?"),
    "count": ("how many items are there?", "how many {kinds} are there?", "how many {kinds} are in the picture?"),
    "exists": ("is there {a_kind}?", "is there {a_kind} at the {place}?", "is there a {size} {kind}?"),
}
# Their answers: each type's answers are drawn uniformly, whatever the question's words.
ANSWERS = {
    "what": KINDS,
    "where": PLACES,
    "count": ("1", "2", "3", "4"),
    "exists": ("no", "yes"),
}

# The NLVR statement templates. Slots: {a_kind}, {place}, {n}; {side} is "left" or "right".
STATEMENTS = (
    "the {side} image contains {a_kind}.",
    "both images contain {a_kind}.",
    "exactly one image contains {a_kind}.",
    "the left image has more items than the right image.",
    "the left image has fewer items than the right image.",
    "both images have the same number of items.",
    "there are {n} items in total.",
    "the {side} image has {a_kind} at the {place}.",
    "the {side} image has an item that is upside down.",
)

_PREFIXES = ("", "a picture of ", "a photo of ", "a canvas with ", "an image of ")


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def join(phrases: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def item_phrase(item: Item, *, size: bool = True, place: bool = True, rotation: bool = True,
                generic: bool = False, upright: bool = False) -> str:
    """'a small bag at the top-left turned left'; parts can be left out, the kind can be 'item',
    and an upright item can say so."""
    words = ([item.size] if size else []) + ["item" if generic else KINDS[item.kind]]
    phrase = article(" ".join(words))
    if place:
        phrase += f" at the {item.place}"
    if rotation and (item.rotation or upright):
        phrase += " " + ROTATION_PHRASES[item.rotation]
    return phrase


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """The canonical caption of ``scene`` (no ``rng``), or a random truthful paraphrase."""
    n = len(scene.items)
    if rng is None:
        phrases = [item_phrase(item) for item in scene.items]
        return join(phrases) if n == 1 else f"{n} items: {join(phrases)}"
    items = list(scene.items)
    if rng.random() < 0.5:
        items = [items[i] for i in rng.permutation(n)]
    phrases = [item_phrase(item, size=rng.random() > 0.2, place=rng.random() > 0.2, rotation=rng.random() > 0.2,
                           generic=rng.random() < 0.15, upright=rng.random() < 0.3) for item in items]
    count = int(rng.integers(3))  # 0: "3 items:", 1: "three items:", 2: no count
    head = "" if count == 2 else f"{n if count == 0 else NUMBER_WORDS[n]} item{'s' if n > 1 else ''}: "
    return _PREFIXES[int(rng.integers(len(_PREFIXES)))] + head + join(phrases)


def question(kind_of: str, template: int, *, kind: int = 0, place: str = "center", size: str = "small") -> str:
    """A VQA question of type ``kind_of`` from template number ``template``."""
    return QUESTIONS[kind_of][template].format(kind=KINDS[kind], a_kind=article(KINDS[kind]), kinds=KIND_PLURALS[kind],
                                              place=place, size=size)


def statement(template: int, *, side: str = "left", kind: int = 0, place: str = "center", n: int = 2) -> str:
    """An NLVR statement from template number ``template``."""
    return STATEMENTS[template].format(side=side, a_kind=article(KINDS[kind]), place=place, n=n)


def statement_truth(template: int, left: Scene, right: Scene, *, side: str = "left", kind: int = 0,
                    place: str = "center", n: int = 2) -> bool:
    """Whether ``statement(template, ...)`` holds of the pair (left, right)."""
    this = left if side == "left" else right
    has = [scene.count(kind) > 0 for scene in (left, right)]
    if template == 0:
        return this.count(kind) > 0
    if template == 1:
        return all(has)
    if template == 2:
        return sum(has) == 1
    if template == 3:
        return left.count() > right.count()
    if template == 4:
        return left.count() < right.count()
    if template == 5:
        return left.count() == right.count()
    if template == 6:
        return left.count() + right.count() == n
    if template == 7:
        item = this.at(place)
        return item is not None and item.kind == kind
    if template == 8:
        return any(item.rotation == 180 for item in this.items)
    raise ValueError(f"no statement template {template}")


def class_texts(task: str) -> list[str]:
    """Texts in the captions' own words for each class of a mini-benchmark task (or of
    Fashion-MNIST itself, task ``fashion-mnist``): the prompts of a zero-shot classifier."""
    if task == "fashion-mnist":
        return [article(kind) for kind in KINDS]
    if task == "location":
        return [f"an item at the {place}" for place in PLACES]
    if task == "orientation":
        return [f"an item {ROTATION_PHRASES[rotation]}" for rotation in (0, 90, 180, 270)]
    if task == "count":
        return ["1 item"] + [f"{n} items" for n in (2, 3, 4)]
    if task == "scale":
        return [article(f"{size} item") for size in SIZES]
    raise ValueError(f"mini task {task!r} has no canvas texts; these tasks do: "
                     "fashion-mnist, location, orientation, count, scale")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, as the tokenizer splits them ("t-shirt" is one word)."""
    return re.findall(r"[\w\-]+|[^\w\-\s]", text.lower())


def vocabulary_words() -> list[str]:
    """Every word the templates above can write, in first-seen order: the tokenizer's
    vocabulary (``tokenizer.py``) must hold them all."""
    slot_values = [*KINDS, *KIND_PLURALS, *PLACES, *SIZES, *ROTATION_PHRASES.values(), *NUMBER_WORDS,
                   *(str(n) for n in range(10)), "left right item items"]
    templates = [*_PREFIXES, *(t for ts in QUESTIONS.values() for t in ts), *STATEMENTS,
                 *(a for answers in ANSWERS.values() for a in answers), "a an at the and : ,", *slot_values]
    found: dict[str, None] = {}
    for text in templates:
        found.update(dict.fromkeys(words(re.sub(r"\{\w+\}", " ", text))))
    return list(found)
