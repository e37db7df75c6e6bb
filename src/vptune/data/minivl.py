"""The vision-language mini benchmark (``minivl:vqa``, ``minivl:nlvr``, ``minivl:retrieval``) and
the pretraining corpus of the bundled vision-language models, from the captioned canvases of
``scenes.py`` with the template text of ``texts.py``.

- ``vqa``: one question per canvas, of four types in equal numbers (what is at a place, where
  a kind is, how many items or items of a kind, is there an item); within a type every
  (template, answer) pair is equally frequent and the scene is built to make the answer true, so the question's words say nothing
  about the answer beyond its type: a text-only model cannot beat the per-type answer prior
  (``text_only_baselines`` checks this).
- ``nlvr``: two canvases and a statement about them (nine templates), true for exactly half of
  each template's examples.
- ``retrieval``: canvases and their canonical captions, unique within each split.

Each task has 2000 train, 500 val and 1000 test examples, drawn from the ``train``, ``val`` and
``test`` pools (disjoint Fashion-MNIST images, none of them in any pretraining pool).
Canvases are 32x32 grey, stored as uint8 and given to models as RGB. Generated arrays are
cached as npz under ``$VPTUNE_CACHE/minivl`` like the mini benchmark's.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import cache_root, save_npz_atomic
from .images import DataError
from .scenes import NUM_KINDS, PLACES, PRETRAIN_POOLS, SIZE, SIZES, Scene, render, sample_scene, scenes_from_arrays, scenes_to_arrays
from .texts import ANSWERS, QUESTIONS, STATEMENTS, caption, question, statement, statement_truth

VERSION = 1  # bump when generation changes, so stale caches are not reused
SEED = 20261
TASKS = ("vqa", "nlvr", "retrieval")
SPLITS = {"train": 2000, "val": 500, "test": 1000}
QUESTION_TYPES = tuple(QUESTIONS)  # what, where, count, exists
ANSWER_LIST = tuple(a for answers in ANSWERS.values() for a in answers)  # the 25 answers, VQA's classes
_MAX_TRIES = 10_000


@dataclass
class MiniVLSplit:
    """One split of a task. ``images``: (N, S, S) uint8 (nlvr: (N, 2, S, S), left then right);
    ``texts``: (N,) the question, statement or caption; ``labels``: the answer's index in
    ANSWER_LIST (vqa), 1 for a true statement (nlvr), the image's index (retrieval: text i
    describes image i); ``groups``: the question type's index in QUESTION_TYPES (vqa) or the
    statement template's (nlvr), 0 for retrieval; ``scenes``: the description(s) of each canvas
    (``scenes_to_arrays``, with ``source``: which Fashion-MNIST image each item is; nlvr: keys
    prefixed ``left_`` and ``right_``)."""

    images: np.ndarray
    texts: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    scenes: dict[str, np.ndarray]


def _other_kind(rng: np.random.Generator, kind: int) -> int:
    return (kind + int(rng.integers(1, NUM_KINDS))) % NUM_KINDS


def _with_place(rng: np.random.Generator, place: str) -> tuple[Scene, int]:
    """A random scene with an item at ``place``, and that item's index."""
    for _ in range(_MAX_TRIES):
        scene = sample_scene(rng)
        for index, item in enumerate(scene.items):
            if item.place == place:
                return scene, index
    raise RuntimeError(f"no scene with an item at {place} in {_MAX_TRIES} tries")


def _set_kinds(rng: np.random.Generator, scene: Scene, kind: int, chosen: set[int]) -> Scene:
    """Items in ``chosen`` become ``kind``; every other item any kind but ``kind``."""
    for index, item in enumerate(scene.items):
        new = kind if index in chosen else (_other_kind(rng, kind) if item.kind == kind else item.kind)
        scene = scene.replace_item(index, kind=new)
    return scene


def _vqa_example(rng: np.random.Generator, qtype: str, template: int, answer: int) -> tuple[Scene, str, str]:
    """(scene, question, answer): the question's slots are drawn independently of the answer,
    then the scene is built to make the answer true."""
    kind, place = int(rng.integers(NUM_KINDS)), PLACES[int(rng.integers(len(PLACES)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    if qtype == "what":
        scene, index = _with_place(rng, place)
        scene = scene.replace_item(index, kind=answer)
    elif qtype == "where":
        scene, index = _with_place(rng, PLACES[answer])
        scene = _set_kinds(rng, scene, kind, {index})
    elif qtype == "count":
        count = answer + 1
        if template == 0:
            scene = sample_scene(rng, count)
        else:
            scene = sample_scene(rng, int(rng.integers(count, 5)))
            scene = _set_kinds(rng, scene, kind, set(rng.choice(len(scene.items), count, replace=False).tolist()))
    else:  # exists: answer 1 is "yes"
        scene = _exists_scene(rng, template, bool(answer), kind, place, size)
    return scene, question(qtype, template, kind=kind, place=place, size=size), ANSWERS[qtype][answer]


def _exists_scene(rng: np.random.Generator, template: int, yes: bool, kind: int, place: str, size: str) -> Scene:
    if template == 0:  # is there a {kind}?
        scene = sample_scene(rng)
        return _set_kinds(rng, scene, kind, {int(rng.integers(len(scene.items)))} if yes else set())
    for _ in range(_MAX_TRIES):
        scene = sample_scene(rng)
        # the slot's item: at the place (template 1) or of the size (template 2)
        slots = [i for i, item in enumerate(scene.items) if (item.place == place if template == 1 else item.size == size)]
        if yes and slots:
            return scene.replace_item(slots[int(rng.integers(len(slots)))], kind=kind)
        if not yes:
            others = [i for i in range(len(scene.items)) if i not in slots]
            decoy = {others[int(rng.integers(len(others)))]} if others and rng.random() < 0.5 else set()
            return _set_kinds(rng, scene, kind, decoy)  # the kind elsewhere (a harder "no"), never in a slot
    raise RuntimeError(f"no scene for an exists question in {_MAX_TRIES} tries")


def _nlvr_example(rng: np.random.Generator, template: int, label: bool) -> tuple[Scene, Scene, str]:
    slots = dict(side=("left", "right")[int(rng.integers(2))], kind=int(rng.integers(NUM_KINDS)),
                 place=PLACES[int(rng.integers(len(PLACES)))], n=int(rng.integers(2, 9)))
    for _ in range(_MAX_TRIES):
        pair = []
        for _side in range(2):
            scene = sample_scene(rng)
            if rng.random() < 0.5:  # plant the statement's kind, at its place when the scene has it
                at = [i for i, item in enumerate(scene.items) if item.place == slots["place"]]
                index = at[0] if at and template == 7 else int(rng.integers(len(scene.items)))
                scene = scene.replace_item(index, kind=slots["kind"])
            pair.append(scene)
        if statement_truth(template, *pair, **slots) == label:
            return pair[0], pair[1], statement(template, **slots)
    raise RuntimeError(f"no scene pair for statement {template} = {label} in {_MAX_TRIES} tries")


def make_split(task: str, pool: str, n: int, rng: np.random.Generator, size: int = SIZE) -> MiniVLSplit:
    """``n`` examples of ``task`` from ``pool``'s images."""
    if task == "vqa":
        groups = rng.permutation(np.arange(n) % len(QUESTION_TYPES))
        examples: list = [None] * n
        for g, qtype in enumerate(QUESTION_TYPES):  # (template, answer) pairs balanced within each type
            where = np.flatnonzero(groups == g)
            order = rng.permutation(len(where))
            templates, answers = order % len(QUESTIONS[qtype]), (order // len(QUESTIONS[qtype])) % len(ANSWERS[qtype])
            for i, t, a in zip(where, templates, answers):
                examples[i] = _vqa_example(rng, qtype, int(t), int(a))
        scenes = [scene for scene, _, _ in examples]
        texts = [q for _, q, _ in examples]
        labels = [ANSWER_LIST.index(a) for _, _, a in examples]
        images, sources = render(scenes, pool, rng, size)
        return MiniVLSplit(images, np.array(texts), np.array(labels, dtype=np.int64), groups.astype(np.int64),
                           scenes_to_arrays(scenes) | {"source": sources})
    if task == "nlvr":
        order = rng.permutation(n)
        groups, labels = order % len(STATEMENTS), (order // len(STATEMENTS)) % 2  # balanced within each template
        examples = [_nlvr_example(rng, int(g), bool(y)) for g, y in zip(groups, labels)]
        left, right = [e[0] for e in examples], [e[1] for e in examples]
        drawn = {"left": render(left, pool, rng, size), "right": render(right, pool, rng, size)}
        images = np.stack([drawn["left"][0], drawn["right"][0]], axis=1)
        scenes = {f"{side}_{key}": value for side, half in (("left", left), ("right", right))
                  for key, value in (scenes_to_arrays(half) | {"source": drawn[side][1]}).items()}
        return MiniVLSplit(images, np.array([e[2] for e in examples]), labels.astype(np.int64),
                           groups.astype(np.int64), scenes)
    if task == "retrieval":
        scenes, seen = [], set()
        while len(scenes) < n:  # unique canonical captions: resample a scene whose caption is taken
            scene = sample_scene(rng)
            if caption(scene) not in seen:
                seen.add(caption(scene))
                scenes.append(scene)
        images, sources = render(scenes, pool, rng, size)
        return MiniVLSplit(images, np.array([caption(s) for s in scenes]), np.arange(n, dtype=np.int64),
                           np.zeros(n, dtype=np.int64), scenes_to_arrays(scenes) | {"source": sources})
    raise DataError(f"unknown minivl task {task!r}; the vision-language mini benchmark has: {', '.join(TASKS)}")


def generate(task: str, splits: dict[str, int] | None = None) -> dict[str, MiniVLSplit]:
    """Every split of ``task`` from scratch (deterministic: the same arrays every time)."""
    if task not in TASKS:
        raise DataError(f"unknown minivl task {task!r}; the vision-language mini benchmark has: {', '.join(TASKS)}")
    splits = SPLITS if splits is None else splits
    return {split: make_split(task, split, n, np.random.default_rng([SEED, TASKS.index(task), i]))
            for i, (split, n) in enumerate(splits.items())}


def cache_path(task: str) -> Path:
    return cache_root() / "minivl" / f"{task}-v{VERSION}.npz"


def _flatten(data: dict[str, MiniVLSplit]) -> dict[str, np.ndarray]:
    arrays = {}
    for split, part in data.items():
        for key in ("images", "texts", "labels", "groups"):
            arrays[f"{split}.{key}"] = getattr(part, key)
        arrays.update({f"{split}.scene.{key}": value for key, value in part.scenes.items()})
    return arrays


def _unflatten(stored) -> dict[str, MiniVLSplit]:
    data = {}
    for split in SPLITS:
        scenes = {key.split(".", 2)[2]: stored[key] for key in stored.files if key.startswith(f"{split}.scene.")}
        data[split] = MiniVLSplit(*(stored[f"{split}.{key}"] for key in ("images", "texts", "labels", "groups")), scenes)
    return data


def load(task: str) -> dict[str, MiniVLSplit]:
    """A task's splits from the cache, generated (and cached) when missing or unreadable."""
    path = cache_path(task)
    if path.is_file():
        try:
            with np.load(path) as stored:
                data = _unflatten(stored)
            _validate(task, data)
            return data
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            pass  # unreadable or stale: regenerate below
    data = generate(task)
    _validate(task, data)
    save_npz_atomic(path, **_flatten(data))
    return data


def _validate(task: str, data: dict[str, MiniVLSplit]) -> None:
    for split, n in SPLITS.items():
        part = data[split]
        shape = (n, 2, SIZE, SIZE) if task == "nlvr" else (n, SIZE, SIZE)
        if part.images.shape != shape or part.images.dtype != np.uint8 or len(part.texts) != n or len(part.labels) != n:
            raise ValueError(f"minivl {task} {split}: images {part.images.shape}, {len(part.texts)} texts")


def scenes(part: MiniVLSplit, side: str | None = None) -> list[Scene]:
    """The scene descriptions of a split's canvases (nlvr: ``side`` "left" or "right")."""
    prefix = f"{side}_" if side else ""
    return scenes_from_arrays({key[len(prefix):]: value for key, value in part.scenes.items() if key.startswith(prefix)})


# ---- pretraining corpus -------------------------------------------------------------------

@dataclass
class Corpus:
    """Canvases for pretraining: ``images`` (N, S, S) uint8, a paraphrased caption each
    (``captions``), the canonical caption (``canonical``) and the descriptions (``scenes``)."""

    images: np.ndarray
    captions: np.ndarray
    canonical: np.ndarray
    scenes: dict[str, np.ndarray]


def pretraining_corpus(n: int, pool: str = "pretrain", seed: int = 0, size: int = SIZE) -> Corpus:
    """``n`` captioned canvases from a pretraining pool (cached): the data of the bundled ViLT,
    METER, CLIP and text-to-image models, disjoint from every benchmark pool."""
    if pool not in PRETRAIN_POOLS:
        raise ValueError(f"pool {pool!r} is held out for the benchmarks; pretraining draws from {', '.join(PRETRAIN_POOLS)}")
    path = cache_root() / "minivl" / f"corpus-{pool}-{n}-{seed}-{size}-v{VERSION}.npz"
    if path.is_file():
        try:
            with np.load(path) as stored:
                corpus = Corpus(stored["images"], stored["captions"], stored["canonical"],
                                {k[6:]: stored[k] for k in stored.files if k.startswith("scene.")})
            if corpus.images.shape == (n, size, size):
                return corpus
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            pass
    rng = np.random.default_rng([SEED, 99, PRETRAIN_POOLS.index(pool), seed])
    described = [sample_scene(rng) for _ in range(n)]
    images, sources = render(described, pool, rng, size)
    corpus = Corpus(images, np.array([caption(s, rng) for s in described]), np.array([caption(s) for s in described]),
                    scenes_to_arrays(described) | {"source": sources})
    save_npz_atomic(path, images=corpus.images, captions=corpus.captions, canonical=corpus.canonical,
                    **{f"scene.{k}": v for k, v in corpus.scenes.items()})
    return corpus


# ---- how much the text alone tells ---------------------------------------------------------

def text_only_baselines(task: str, data: dict[str, MiniVLSplit] | None = None) -> dict[str, dict[str, float]]:
    """Test accuracy (%) per question type (vqa) or overall (nlvr, key "all") of: ``uniform``,
    one over the number of answers (the prior the generator draws answers from); ``prior``, the
    most frequent test answer of the type (what answering from the type alone can reach at
    best); ``type_majority``, the training set's most frequent answer of the type; and
    ``bag_of_words``, a logistic regression on the question's words and word pairs trained on
    the train split. Balanced answers make the last two no better than the first."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    if task not in ("vqa", "nlvr"):
        raise ValueError(f"text-only baselines are for vqa and nlvr, not {task!r}")
    data = load(task) if data is None else data
    train, test = data["train"], data["test"]
    vectorizer = CountVectorizer(ngram_range=(1, 2), token_pattern=r"[\w\-]+")
    model = LogisticRegression(max_iter=2000).fit(vectorizer.fit_transform(train.texts), train.labels)
    predicted = model.predict(vectorizer.transform(test.texts))
    names = QUESTION_TYPES if task == "vqa" else ("all",)
    results = {}
    for g, name in enumerate(names):
        in_train = train.groups == g if task == "vqa" else np.ones(len(train.labels), bool)
        in_test = test.groups == g if task == "vqa" else np.ones(len(test.labels), bool)
        answers = test.labels[in_test]
        majority = np.bincount(train.labels[in_train]).argmax()
        results[name] = {
            "count": int(in_test.sum()),
            "uniform": 100.0 / (len(ANSWERS[name]) if task == "vqa" else 2),
            "prior": 100.0 * np.bincount(answers).max() / len(answers),
            "type_majority": 100.0 * np.mean(answers == majority),
            "bag_of_words": 100.0 * np.mean(predicted[in_test] == answers),
        }
    if task == "vqa":
        total = len(test.labels)
        results["all"] = {key: sum(r[key] * r["count"] for r in results.values()) / total
                          for key in ("uniform", "prior", "type_majority", "bag_of_words")} | {"count": total}
    return results


def main() -> None:
    """Generate (or load) every task, print its sizes and the text-only baselines."""
    for task in TASKS:
        data = load(task)
        sizes = ", ".join(f"{split} {len(part.labels)}" for split, part in data.items())
        unique = len(set(data["test"].texts.tolist()))
        print(f"minivl:{task}: {sizes}; {unique} distinct test texts; cache {cache_path(task)} "
              f"({cache_path(task).stat().st_size / 1e6:.2f} MB)")
        if task in ("vqa", "nlvr"):
            print(f"  {'group':<8} {'test n':>6} {'uniform':>7} {'prior':>6} {'type->majority':>14} {'bag-of-words LR':>15}")
            for name, row in text_only_baselines(task, data).items():
                print(f"  {name:<8} {row['count']:>6} {row['uniform']:>7.1f} {row['prior']:>6.1f} {row['type_majority']:>14.1f} "
                      f"{row['bag_of_words']:>15.1f}")


if __name__ == "__main__":
    main()
