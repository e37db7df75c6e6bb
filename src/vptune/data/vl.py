"""Vision-language datasets: ``minivl:TASK`` (the generated mini benchmark) and the real
VQAv2 (``vqav2:ROOT``), NLVR2 (``nlvr2:ROOT``) and Flickr30K (``f30k:ROOT``) layouts, with text
tokenised by a given tokenizer (a transformers tokenizer or ``WordTokenizer``).

Samples are dicts, the batch fields the tasks read (``vptune.tasks``):
- VQA: ``image``, ``input_ids``, ``attention_mask``, ``vqa_targets`` (soft scores over the
  answer vocabulary), ``question_id``;
- NLVR: ``image0``, ``image1``, ``input_ids``, ``attention_mask``, ``label`` (1: true);
- retrieval: for training, ``image`` (1 + K, C, H, W): the caption's image then K others, for
  ViLT's ranking loss; for evaluation ``RetrievalData`` gives the images and the texts apart.

Text longer than the maximum length is truncated with a warning that names the file and
line (or entry) of the first such text. Missing images, malformed JSON, missing fields and
answers outside a given answer vocabulary raise a DataError naming the file and line/entry.
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import DataError, open_image

VL_SPEC_FORMS = "minivl:vqa, minivl:nlvr, minivl:retrieval (with ?test=N, ...: a subset), vqav2:ROOT, nlvr2:ROOT or f30k:ROOT"
DEFAULT_MAX_LENGTH = 40  # ViLT's text length


# ---- images --------------------------------------------------------------------------------

class ImageTable:
    """Images by index, from uint8 arrays (N, H, W) or (N, H, W, 3), or from files."""

    def __init__(self, arrays: np.ndarray | None = None, paths: list[Path] | None = None) -> None:
        self.arrays, self.paths = arrays, paths

    def __len__(self) -> int:
        return len(self.arrays) if self.arrays is not None else len(self.paths)

    def get(self, index: int) -> Image.Image:
        if self.arrays is not None:
            return Image.fromarray(self.arrays[index]).convert("RGB")
        path = self.paths[index]
        try:
            with open_image(path) as image:  # refused above the pixel limit, before decoding
                return image.convert("RGB")
        except (OSError, ValueError) as error:
            raise DataError(f"cannot read image {path}: {error}") from error


def _image_files(paths: list[Path], origins: list[str]) -> ImageTable:
    """An ImageTable over files, each checked to exist (the error names where it was listed)."""
    checked: set[Path] = set()
    for path, origin in zip(paths, origins):
        if path in checked:
            continue
        checked.add(path)
        if not path.is_file():
            raise DataError(f"{origin}: image {path} does not exist; add it or remove the entry")
    return ImageTable(paths=paths)


# ---- text ----------------------------------------------------------------------------------

def encode_texts(tokenizer: Any, texts: list[str], max_length: int, origins: list[str] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) (N, max_length); a text longer than ``max_length`` tokens
    is truncated, and one warning says how many were and where the first one is."""
    if not texts:
        return torch.zeros(0, max_length, dtype=torch.long), torch.zeros(0, max_length, dtype=torch.long)
    # the full lengths (a limit no text reaches: the word tokenizer refuses a longer text when not truncating)
    lengths = [len(ids) for ids in tokenizer(texts, padding=False, truncation=False, max_length=10**9)["input_ids"]]
    long = [i for i, n in enumerate(lengths) if n > max_length]
    if long:
        where = origins[long[0]] if origins else f"text {long[0]}"
        warnings.warn(f"{len(long)} of {len(texts)} texts are longer than {max_length} tokens and were truncated; "
                      f"the first: {where} ({lengths[long[0]]} tokens: {texts[long[0]]!r})", stacklevel=2)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return encoded["input_ids"].long(), encoded["attention_mask"].long()


# ---- datasets ------------------------------------------------------------------------------

class VQADataset(Dataset):
    """One question each: its image, its tokens and the soft scores of the answers."""

    yields_dicts = True  # samples are batch dicts (vptune.train reads them through the task)

    def __init__(self, images: ImageTable, image_index: np.ndarray, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, targets: list[dict[int, float]], num_answers: int,
                 question_ids: list[int], transform: Callable) -> None:
        self.images, self.image_index, self.transform = images, image_index, transform
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.targets, self.num_answers, self.question_ids = targets, num_answers, question_ids

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        scores = torch.zeros(self.num_answers)
        for answer, score in self.targets[i].items():
            scores[answer] = score
        return {"image": self.transform(self.images.get(int(self.image_index[i]))), "input_ids": self.input_ids[i],
                "attention_mask": self.attention_mask[i], "vqa_targets": scores, "question_id": self.question_ids[i]}


class NLVRDataset(Dataset):
    """Two images, one statement, a label (1: true)."""

    yields_dicts = True  # samples are batch dicts (vptune.train reads them through the task)

    def __init__(self, images: ImageTable, pairs: np.ndarray, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 labels: np.ndarray, transform: Callable) -> None:
        self.images, self.pairs, self.labels, self.transform = images, pairs, labels, transform
        self.input_ids, self.attention_mask = input_ids, attention_mask

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        left, right = self.pairs[i]
        return {"image0": self.transform(self.images.get(int(left))), "image1": self.transform(self.images.get(int(right))),
                "input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "label": int(self.labels[i])}


class RetrievalData(Dataset):
    """Captions and their images. As a dataset (training), item i is caption i with its image
    first and ``negatives`` other images drawn at random after it (ViLT's ranking loss);
    ``images_dataset()``, ``input_ids``, ``attention_mask`` and ``text_image`` (which image
    each caption describes) are what an evaluation scoring every (caption, image) pair needs."""

    yields_dicts = True  # samples are batch dicts (vptune.train reads them through the task)

    def __init__(self, images: ImageTable, text_image: np.ndarray, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, transform: Callable, negatives: int = 15) -> None:
        self.images, self.transform, self.negatives = images, transform, negatives
        self.text_image = torch.as_tensor(text_image, dtype=torch.long)
        self.input_ids, self.attention_mask = input_ids, attention_mask

    def __len__(self) -> int:
        return len(self.text_image)

    def __getitem__(self, i: int) -> dict[str, Any]:
        positive = int(self.text_image[i])
        if self.negatives and len(self.images) < 2:
            raise DataError("retrieval training needs at least two images to draw negatives from")
        # other images: uniform over all but the positive
        others = torch.randint(len(self.images) - 1, (self.negatives,)).tolist()
        chosen = [positive] + [o + (o >= positive) for o in others]
        return {"image": torch.stack([self.transform(self.images.get(j)) for j in chosen]),
                "input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}

    def images_dataset(self) -> Dataset:
        return _Images(self.images, self.transform)


class _Images(Dataset):
    def __init__(self, images: ImageTable, transform: Callable) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.transform(self.images.get(i)), "image_index": i}


@dataclass
class VLDataBundle:
    """Train/val/test datasets of one vision-language task (val/test None when absent)."""

    task: str  # vqa | nlvr | retrieval
    train: Dataset
    val: Dataset | None
    test: Dataset | None
    answers: list[str] = field(default_factory=list)  # VQA's answer vocabulary, in class order
    spec: str = ""
    notes: list[str] = field(default_factory=list)

    def make_task(self):
        """The task (head, loss, metrics) that this data is scored with."""
        from ..tasks import NLVRTask, RetrievalTask, VQATask

        if self.task == "vqa":
            return VQATask(self.answers)
        return NLVRTask() if self.task == "nlvr" else RetrievalTask()


def build_vl_data(spec: str, data_config: dict, tokenizer: Any = None, *, final: bool = False,
                  max_length: int | None = None, negatives: int = 15) -> VLDataBundle:
    """Datasets for a vision-language ``spec`` (``minivl:TASK``, ``vqav2:ROOT``, ``nlvr2:ROOT``,
    ``f30k:ROOT``), images sized from ``data_config``, text from ``tokenizer`` (default: the
    shipped ``WordTokenizer``) padded to ``max_length`` (default: the tokenizer's own
    ``model_max_length``, 48 for the shipped one, or 40, ViLT's, when it has none).
    ``final`` trains on train+val and keeps val for reporting."""
    from .transforms import resize_transform

    kind, _, argument = spec.partition(":")
    if not argument or kind not in ("minivl", "vqav2", "nlvr2", "f30k"):
        raise DataError(f"vision-language data spec {spec!r} is not understood; expected {VL_SPEC_FORMS}")
    if tokenizer is None:
        from .tokenizer import WordTokenizer

        tokenizer = WordTokenizer.from_file()
    transform = resize_transform(data_config)
    own = getattr(tokenizer, "model_max_length", None)  # transformers says 1e30 when a checkpoint sets none
    length = max_length or (own if own and own <= 512 else DEFAULT_MAX_LENGTH)
    if kind == "minivl":
        return _minivl(argument, spec, tokenizer, transform, final, length, negatives)
    root = Path(argument).expanduser()
    if not root.is_dir():
        raise DataError(f"{spec}: no such folder {root}")
    reader = {"vqav2": vqav2, "nlvr2": nlvr2, "f30k": f30k}[kind]
    bundle = reader(root, tokenizer, transform, length, final=final, negatives=negatives)
    bundle.spec = spec
    for note in bundle.notes:
        warnings.warn(note, stacklevel=2)
    return bundle


def minivl_options(argument: str, spec: str) -> tuple[str, dict[str, int]]:
    """``TASK`` and the options of a ``minivl:TASK?train=N&val=N&test=N&negatives=K`` spec: each
    split cut to its first N examples (a retrieval split: N captions and their N images, so
    its evaluation scores N x N pairs), and K other images per caption in retrieval training
    (default 15). The generated splits are in random order, so their first N are a random draw."""
    from . import minivl

    task, _, query = argument.partition("?")
    if task not in minivl.TASKS:
        raise DataError(f"unknown minivl task {task!r}; the vision-language mini benchmark has: {', '.join(minivl.TASKS)}")
    options: dict[str, int] = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        limit = minivl.SPLITS.get(key, 10**6 if key == "negatives" and task == "retrieval" else None)
        if limit is None:
            known = ", ".join([*minivl.SPLITS, *(["negatives"] if task == "retrieval" else [])])
            raise DataError(f"{spec}: unknown option {key!r}; minivl:{task} takes {known} (e.g. minivl:{task}?test=200)")
        if not value.isdigit() or not 1 <= int(value) <= limit:
            raise DataError(f"{spec}: {key}={value!r} must be a whole number from 1 to {limit}")
        options[key] = int(value)
    return task, options


def _minivl(argument: str, spec: str, tokenizer: Any, transform: Callable, final: bool, max_length: int,
            negatives: int) -> VLDataBundle:
    from . import minivl

    task, options = minivl_options(argument, spec)
    negatives = options.get("negatives", negatives)
    data = minivl.load(task)
    parts = {}
    for split, part in data.items():
        if split in options:  # the first N examples (nlvr: N pairs of canvases)
            part = minivl.MiniVLSplit(part.images[:options[split]], part.texts[:options[split]], part.labels[:options[split]],
                                      part.groups[:options[split]], {k: v[:options[split]] for k, v in part.scenes.items()})
        texts = part.texts.tolist()
        ids, mask = encode_texts(tokenizer, texts, max_length, [f"{spec} {split} {i}" for i in range(len(texts))])
        n = len(texts)
        if task == "vqa":
            parts[split] = VQADataset(ImageTable(part.images), np.arange(n), ids, mask,
                                      [{int(y): 1.0} for y in part.labels], len(minivl.ANSWER_LIST),
                                      list(range(n)), transform)
        elif task == "nlvr":
            images = ImageTable(part.images.reshape(2 * n, *part.images.shape[2:]))
            parts[split] = NLVRDataset(images, np.arange(2 * n).reshape(n, 2), ids, mask, part.labels, transform)
        else:
            parts[split] = RetrievalData(ImageTable(part.images), part.labels, ids, mask, transform, negatives)
    train = parts["train"]
    if final:
        train = torch.utils.data.ConcatDataset([parts["train"], parts["val"]])
    return VLDataBundle(task, train, parts["val"], parts["test"], list(minivl.ANSWER_LIST), spec)


# ---- reading JSON with errors that name the place ------------------------------------------

def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path} line {error.lineno}: not valid JSON ({error.msg})") from error
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from error


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number}: not valid JSON ({error.msg}); one JSON object per line expected") from error
        if not isinstance(row, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _field(row: dict, key: str, where: str) -> Any:
    if key not in row:
        raise DataError(f"{where}: missing field {key!r} (has {', '.join(sorted(row)) or 'nothing'})")
    return row[key]


def _find(root: Path, names: list[str], what: str) -> Path:
    for name in names:
        if (root / name).exists():
            return root / name
    raise DataError(f"{root}: no {what} (looked for {', '.join(names)})")


# ---- VQAv2 ---------------------------------------------------------------------------------

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "didnt": "didn't", "wasnt": "wasn't", "werent": "weren't", "im": "i'm",
                 "ive": "i've", "youre": "you're", "thats": "that's", "whats": "what's", "shouldnt": "shouldn't",
                 "couldnt": "couldn't", "wouldnt": "wouldn't", "hasnt": "hasn't", "havent": "haven't"}
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?<!\d)(\.)(?!\d)")


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation: punctuation dropped (or made a space), periods
    outside numbers removed, lower case, number words to digits, articles dropped, common
    contractions restored ("dont" -> "don't")."""
    source = answer.replace("\n", " ").replace("\t", " ").strip()
    drop, text = bool(_COMMA_IN_NUMBER.search(source)), source
    for mark in _PUNCTUATION:
        text = text.replace(mark, "" if drop or mark + " " in source or " " + mark in source else " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_soft_score(matches: int) -> float:
    """The VQA accuracy of an answer that ``matches`` of the ten annotators gave:
    min(#humans / 3, 1) averaged over the ten leave-one-out subsets of nine annotators, as the
    official evaluation does (0, 0.3, 0.6, 0.9, then 1 from four matches on; ViLT's targets)."""
    if matches <= 0:
        return 0.0
    return round((10 - matches) / 10 * min(matches / 3, 1) + matches / 10 * min((matches - 1) / 3, 1), 6)


_VQA_SPLITS = {"train": "train2014", "val": "val2014"}


def _vqa_split(root: Path, split: str) -> tuple[list[dict], Path, Path]:
    """Questions of a split merged with their annotations: dicts with question_id, image, question,
    answers (normalised, ten), consensus (normalised), origin."""
    name = _VQA_SPLITS[split]
    questions_file = _find(root, [f"v2_OpenEnded_mscoco_{name}_questions.json"], f"VQAv2 {split} questions file")
    annotations_file = _find(root, [f"v2_mscoco_{name}_annotations.json"], f"VQAv2 {split} annotations file")
    image_dir = _find(root, [name, f"images/{name}"], f"VQAv2 {split} images folder")
    questions = _field(read_json(questions_file), "questions", str(questions_file))
    annotations = _field(read_json(annotations_file), "annotations", str(annotations_file))
    by_id = {}
    for i, row in enumerate(annotations):
        where = f"{annotations_file}: annotations[{i}]"
        answers = _field(row, "answers", where)
        by_id[_field(row, "question_id", where)] = (
            [normalize_answer(str(_field(a, "answer", where))) for a in answers],
            normalize_answer(str(row.get("multiple_choice_answer", ""))), where)
    merged = []
    for i, row in enumerate(questions):
        where = f"{questions_file}: questions[{i}]"
        qid = _field(row, "question_id", where)
        if qid not in by_id:
            raise DataError(f"{where}: question {qid} has no annotation in {annotations_file}")
        answers, consensus, answer_where = by_id[qid]
        image_id = int(_field(row, "image_id", where))
        merged.append(dict(question_id=qid, question=str(_field(row, "question", where)), answers=answers,
                           consensus=consensus, origin=where, answer_origin=answer_where,
                           image=image_dir / f"COCO_{name}_{image_id:012d}.jpg"))
    return merged, questions_file, annotations_file


def vqav2(root: Path, tokenizer: Any, transform: Callable, max_length: int, *, final: bool = False,
          negatives: int = 15, min_answer_count: int = 9) -> VLDataBundle:
    """VQAv2 from ROOT: the official ``v2_OpenEnded_mscoco_{train,val}2014_questions.json`` and
    ``v2_mscoco_{train,val}2014_annotations.json`` with the images in ``train2014/`` and ``val2014/``
    (or under ``images/``). Train is train2014, val is val2014 (scored); the test-dev answers
    are private to the evaluation server, so there is no test split. The answer vocabulary is
    ViLT's rule: consensus answers given at least ``min_answer_count`` times over train and val
    (3,129 on the real data), unless ROOT has ``answers.json`` (a list): then that list, and
    every training consensus answer must be in it."""
    splits = {split: _vqa_split(root, split)[0] for split in _VQA_SPLITS}
    notes = ["VQAv2 has no public test answers: val2014 is the scored split (test is empty)"]
    answers_file = root / "answers.json"
    if answers_file.is_file():
        answers = read_json(answers_file)
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(f"{answers_file}: expected a JSON list of answer strings")
        vocabulary = set(answers)
        for row in splits["train"]:
            if row["consensus"] not in vocabulary:
                raise DataError(f"{row['answer_origin']} (question {row['question_id']}): answer {row['consensus']!r} is "
                                f"not in the answer vocabulary {answers_file}; add it there, or delete that file to "
                                f"build the vocabulary from the annotations")
    else:
        counts = Counter(row["consensus"] for rows in splits.values() for row in rows)
        answers = sorted(a for a, n in counts.items() if n >= min_answer_count)
        if not answers:
            raise DataError(f"{root}: no answer is given {min_answer_count} times or more; nothing to train on")
    index = {answer: i for i, answer in enumerate(answers)}
    parts = {}
    for split, rows in splits.items():
        targets = [{index[a]: vqa_soft_score(n) for a, n in Counter(row["answers"]).items() if a in index} for row in rows]
        if split == "train":
            kept = [i for i, t in enumerate(targets) if t]
            if len(kept) < len(rows):
                notes.append(f"{len(rows) - len(kept)} of {len(rows)} training questions have no answer in the "
                             f"vocabulary and are left out (as ViLT does)")
            rows, targets = [rows[i] for i in kept], [targets[i] for i in kept]
        ids, mask = encode_texts(tokenizer, [r["question"] for r in rows], max_length, [r["origin"] for r in rows])
        images = _image_files([r["image"] for r in rows], [r["origin"] for r in rows])
        parts[split] = VQADataset(images, np.arange(len(rows)), ids, mask, targets, len(answers),
                                  [r["question_id"] for r in rows], transform)
    train = torch.utils.data.ConcatDataset([parts["train"], parts["val"]]) if final else parts["train"]
    return VLDataBundle("vqa", train, parts["val"], None, answers, notes=notes)


# ---- NLVR2 ---------------------------------------------------------------------------------

_NLVR_SPLITS = {"train": "train", "val": "dev", "test": "test1"}


def _nlvr_split(root: Path, name: str, tokenizer: Any, transform: Callable, max_length: int) -> NLVRDataset | None:
    candidates = [f"{name}.json", f"data/{name}.json"] + (["test.json", "data/test.json"] if name == "test1" else [])
    if not any((root / c).is_file() for c in candidates):
        if name == "train":
            raise DataError(f"{root}: no NLVR2 training file (looked for {', '.join(candidates)})")
        return None
    path = _find(root, candidates, f"NLVR2 {name} file")
    image_root = _find(root, [f"images/{name}", name], f"NLVR2 {name} images folder")
    paths, origins, texts, labels = [], [], [], []
    for number, row in read_jsonl(path):
        where = f"{path} line {number}"
        identifier = str(_field(row, "identifier", where))
        label = _field(row, "label", where)
        if str(label).lower() not in ("true", "false"):
            raise DataError(f"{where}: label {label!r} is not True or False")
        folder = image_root / str(row["directory"]) if "directory" in row else image_root
        stem = "-".join(identifier.split("-")[:-1])
        paths += [folder / f"{stem}-img0.png", folder / f"{stem}-img1.png"]
        origins += [where, where]
        texts.append(str(_field(row, "sentence", where)))
        labels.append(int(str(label).lower() == "true"))
    images = _image_files(paths, origins)
    ids, mask = encode_texts(tokenizer, texts, max_length, origins[::2])
    return NLVRDataset(images, np.arange(len(paths)).reshape(-1, 2), ids, mask, np.array(labels), transform)


def nlvr2(root: Path, tokenizer: Any, transform: Callable, max_length: int, *, final: bool = False,
          negatives: int = 15) -> VLDataBundle:
    """NLVR2 from ROOT: the official ``train.json``, ``dev.json``, ``test1.json`` (JSON lines,
    in ROOT or ROOT/data) and the image pairs ``<identifier less its last part>-img0.png`` /
    ``-img1.png`` under ``images/train/<directory>/``, ``images/dev/``, ``images/test1/`` (or
    without ``images/``). Train, val = dev, test = test1."""
    parts = {split: _nlvr_split(root, name, tokenizer, transform, max_length) for split, name in _NLVR_SPLITS.items()}
    train = parts["train"]
    if final and parts["val"] is not None:
        train = torch.utils.data.ConcatDataset([train, parts["val"]])
    return VLDataBundle("nlvr", train, parts["val"], parts["test"])


# ---- Flickr30K -----------------------------------------------------------------------------

def f30k(root: Path, tokenizer: Any, transform: Callable, max_length: int, *, final: bool = False,
         negatives: int = 15) -> VLDataBundle:
    """Flickr30K from ROOT: Karpathy's ``dataset_flickr30k.json`` (in ROOT or ROOT/karpathy)
    with the images in ``flickr30k-images/`` (or ``images/``). Splits by the file's ``split``
    field (``restval`` counts as train); every caption is one text (five per image)."""
    path = _find(root, ["dataset_flickr30k.json", "karpathy/dataset_flickr30k.json"], "Karpathy split file")
    image_dir = _find(root, ["flickr30k-images", "images"], "Flickr30K images folder")
    entries = _field(read_json(path), "images", str(path))
    by_split: dict[str, dict[str, list]] = {s: {"paths": [], "origins": [], "texts": [], "text_image": [], "text_origins": []}
                                            for s in ("train", "val", "test")}
    for i, entry in enumerate(entries):
        where = f"{path}: images[{i}]"
        split = str(_field(entry, "split", where))
        split = "train" if split == "restval" else split
        if split not in by_split:
            raise DataError(f"{where}: split {split!r} is not train, restval, val or test")
        part = by_split[split]
        for j, sentence in enumerate(_field(entry, "sentences", where)):
            part["texts"].append(str(_field(sentence, "raw", f"{where}.sentences[{j}]")))
            part["text_image"].append(len(part["paths"]))
            part["text_origins"].append(f"{where}.sentences[{j}]")
        part["paths"].append(image_dir / str(_field(entry, "filename", where)))
        part["origins"].append(where)
    if not by_split["train"]["texts"]:
        raise DataError(f"{path}: no training captions")
    parts: dict[str, RetrievalData | None] = {}
    for split, part in by_split.items():
        if not part["texts"]:
            parts[split] = None
            continue
        ids, mask = encode_texts(tokenizer, part["texts"], max_length, part["text_origins"])
        parts[split] = RetrievalData(_image_files(part["paths"], part["origins"]), np.array(part["text_image"]),
                                     ids, mask, transform, negatives)
    train = parts["train"]
    if final and parts["val"] is not None:
        train = torch.utils.data.ConcatDataset([train, parts["val"]])
    return VLDataBundle("retrieval", train, parts["val"], parts["test"])
