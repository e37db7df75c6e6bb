"""vptune.data.vl: minivl, VQAv2, NLVR2 and Flickr30K specs on tiny trees made here; the VQA
answer normalisation and soft scores; each bad input's error names the file and line/entry."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vptune.data import DataError, WordTokenizer, build_data, build_vl_data, minivl
from vptune.data.vl import normalize_answer, vqa_soft_score, vqav2
from vptune.tasks import NLVRTask, RetrievalTask, VQATask

CONFIG = dict(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=1.0)


@pytest.fixture(scope="module")
def tokenizer():
    return WordTokenizer.from_file()


def image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), value, dtype=np.uint8)).save(path)
    return path


def pixel(tensor):
    """The grey value (0..255) of a normalised image tensor of one colour."""
    return round(((tensor.mean() * 0.5 + 0.5) * 255).item())


# ---- minivl ----------------------------------------------------------------------------------

@pytest.fixture
def small_minivl(tmp_path, monkeypatch):
    monkeypatch.setenv("VPTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(minivl, "SPLITS", {"train": 8, "val": 4, "test": 4})


def test_minivl_specs_give_the_task_fields(small_minivl, tokenizer):
    vqa = build_vl_data("minivl:vqa", CONFIG)
    sample = vqa.train[0]
    assert sample["image"].shape == (3, 16, 16) and sample["input_ids"].shape == (48,)
    assert sample["vqa_targets"].shape == (25,) and sample["vqa_targets"].sum() == 1.0
    assert tokenizer.decode(sample["input_ids"]) == " ".join(tokenizer.tokenize(minivl.load("vqa")["train"].texts[0]))
    assert isinstance(vqa.make_task(), VQATask) and vqa.make_task().answers == list(minivl.ANSWER_LIST)
    assert (len(vqa.train), len(vqa.val), len(vqa.test)) == (8, 4, 4)
    assert len(build_vl_data("minivl:vqa", CONFIG, final=True).train) == 12
    nlvr = build_vl_data("minivl:nlvr", CONFIG, max_length=20)
    pair = nlvr.test[1]
    part = minivl.load("nlvr")["test"]
    assert pair["input_ids"].shape == (20,) and pair["label"] == part.labels[1]
    assert pixel(pair["image1"]) == pytest.approx(part.images[1, 1].mean(), abs=1.5)
    assert isinstance(nlvr.make_task(), NLVRTask)
    retrieval = build_vl_data("minivl:retrieval", CONFIG, negatives=3)
    first = retrieval.train[2]
    assert first["image"].shape == (4, 3, 16, 16)
    images = retrieval.train.images_dataset()
    assert torch.equal(first["image"][0], images[2]["image"])  # the caption's own image comes first
    assert not any(torch.equal(first["image"][j], images[2]["image"]) for j in (1, 2, 3))
    assert retrieval.test.text_image.tolist() == [0, 1, 2, 3] and isinstance(retrieval.make_task(), RetrievalTask)


def test_spec_errors():
    with pytest.raises(DataError, match="expected minivl:vqa"):
        build_vl_data("coco:/x", CONFIG)
    with pytest.raises(DataError, match="unknown minivl task 'caption'"):
        build_vl_data("minivl:caption", CONFIG)
    with pytest.raises(DataError, match="build_vl_data"):
        build_data("minivl:vqa", CONFIG)


# ---- VQAv2 -----------------------------------------------------------------------------------

def test_normalize_answer_as_the_vqa_evaluation():
    cases = {"Two": "2", "the dog": "dog", "a Red car": "red car", "dont": "don't", "1,000": "1000", "yes.": "yes",
             "t-shirt": "t shirt", "3.5": "3.5", " none \n": "0", "left - right": "left right", "hello!": "hello"}
    for answer, expected in cases.items():
        assert normalize_answer(answer) == expected, answer


def test_vqa_soft_score_is_the_leave_one_out_average():
    assert [vqa_soft_score(n) for n in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
    for n in range(11):  # against the literal average over the ten subsets of nine annotators
        subsets = [min((n - (i < n)) / 3, 1) for i in range(10)]
        assert vqa_soft_score(n) == pytest.approx(sum(subsets) / 10)


def make_vqa(root, questions=None, extra_answer=None):
    """train: 3 questions on 2 images; val: 1 question."""
    rows = questions or {
        "train": [(1, 10, "What color is the car?", ["red"] * 4 + ["Red."] * 2 + ["blue"] * 2 + ["dont"] * 2, "red"),
                  (2, 10, "How many dogs?", ["two"] * 3 + ["2"] * 5 + ["3"] * 2, "2"),
                  (3, 11, "Is it sunny?", ["yes"] * 9 + ["no"], "yes")],
        "val": [(4, 20, "How many cats?", ["2"] + ["3"] * 9, "3")],
    }
    for split, entries in rows.items():
        name = f"{split}2014"
        qs = [{"question_id": q, "image_id": i, "question": text} for q, i, text, _, _ in entries]
        anns = [{"question_id": q, "image_id": i, "multiple_choice_answer": mc,
                 "answers": [{"answer": a, "answer_id": k + 1, "answer_confidence": "yes"} for k, a in enumerate(answers)]}
                for q, i, _, answers, mc in entries]
        (root / f"v2_OpenEnded_mscoco_{name}_questions.json").write_text(json.dumps({"questions": qs}))
        (root / f"v2_mscoco_{name}_annotations.json").write_text(json.dumps({"annotations": anns}))
        for q, i, *_ in entries:
            image(root / name / f"COCO_{name}_{i:012d}.jpg", value=i)
    return root


def test_vqav2_reads_questions_answers_and_images(tmp_path, tokenizer):
    from vptune.data.transforms import resize_transform

    make_vqa(tmp_path)
    with pytest.raises(DataError, match="no answer is given 9 times or more"):
        build_vl_data(f"vqav2:{tmp_path}", CONFIG)
    data = vqav2(tmp_path, tokenizer, resize_transform(CONFIG), 12, min_answer_count=1)
    assert data.answers == ["2", "3", "red", "yes"] and data.test is None
    sample = data.train[0]
    assert sample["question_id"] == 1 and pixel(sample["image"]) == 10
    assert sample["vqa_targets"].tolist() == pytest.approx([0, 0, 1.0, 0])  # 6 of 10 said red (after "Red.")
    assert data.train[1]["vqa_targets"][data.answers.index("2")] == pytest.approx(1.0)  # "two" is "2"
    assert data.train[2]["vqa_targets"][data.answers.index("yes")] == pytest.approx(1.0)
    assert data.val[0]["vqa_targets"].tolist() == pytest.approx([0.3, 1.0, 0, 0])
    assert tokenizer.decode(data.train[0]["input_ids"], skip_special_tokens=False).split()[:7] == \
        ["[CLS]", "what", "[UNK]", "is", "the", "[UNK]", "?"]
    assert len(vqav2(tmp_path, tokenizer, resize_transform(CONFIG), 12, final=True,
                                  min_answer_count=1).train) == 4


def test_vqav2_with_a_given_vocabulary_refuses_an_unknown_training_answer(tmp_path):
    make_vqa(tmp_path)
    (tmp_path / "answers.json").write_text(json.dumps(["2", "yes", "3"]))
    with pytest.raises(DataError, match=r"v2_mscoco_train2014_annotations.json: annotations\[0\] \(question 1\): "
                                        r"answer 'red' is not in the answer vocabulary"):
        build_vl_data(f"vqav2:{tmp_path}", CONFIG)
    (tmp_path / "answers.json").write_text(json.dumps(["2", "yes", "3", "red"]))
    with pytest.warns(UserWarning, match="val2014 is the scored split"):
        data = build_vl_data(f"vqav2:{tmp_path}", CONFIG)
    assert data.answers == ["2", "yes", "3", "red"] and data.train[0]["vqa_targets"][3] == 1.0


def test_vqav2_bad_inputs_name_the_file_and_entry(tmp_path, tokenizer):
    from vptune.data.transforms import resize_transform

    transform = resize_transform(CONFIG)
    make_vqa(tmp_path)
    (tmp_path / "train2014" / "COCO_train2014_000000000011.jpg").unlink()
    with pytest.raises(DataError, match=r"questions.json: questions\[2\]: image .*COCO_train2014_000000000011.jpg "
                                        r"does not exist"):
        vqav2(tmp_path, tokenizer, transform, 12, min_answer_count=1)
    make_vqa(tmp_path)
    path = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    path.write_text('{"questions": [\n{"question_id": 4,\n "image_id": 20 "question": "x"}]}')
    with pytest.raises(DataError, match=r"val2014_questions.json line 3: not valid JSON"):
        vqav2(tmp_path, tokenizer, transform, 12, min_answer_count=1)
    path.write_text(json.dumps({"questions": [{"question_id": 4, "question": "x"}]}))
    with pytest.raises(DataError, match=r"questions\[0\]: missing field 'image_id'"):
        vqav2(tmp_path, tokenizer, transform, 12, min_answer_count=1)


def test_long_questions_are_truncated_with_a_warning_naming_the_entry(tmp_path, tokenizer):
    from vptune.data.transforms import resize_transform

    long = "is the bag " + "at the top " * 10 + "?"
    make_vqa(tmp_path, {"train": [(1, 10, long, ["yes"] * 10, "yes"), (2, 10, "is it?", ["no"] * 10, "no")],
                        "val": [(3, 11, "is it?", ["no"] * 10, "no")]})
    with pytest.warns(UserWarning, match=r"1 of 2 texts are longer than 12 tokens and were truncated; the first: "
                                         r".*train2014_questions.json: questions\[0\] \(36 tokens"):
        data = vqav2(tmp_path, tokenizer, resize_transform(CONFIG), 12, min_answer_count=1)
    ids = data.train[0]["input_ids"]
    assert ids.shape == (12,) and ids[-1] == tokenizer.sep_token_id and data.train[0]["attention_mask"].all()


# ---- NLVR2 -----------------------------------------------------------------------------------

def make_nlvr(root):
    lines = {"train": [dict(identifier="train-10-0-0", sentence="both images contain a bag.", label="True", directory=1),
                       dict(identifier="train-11-1-2", sentence="the left image contains a coat.", label="False",
                            directory=2)],
             "dev": [dict(identifier="dev-5-0-1", sentence="there are 3 items in total.", label="True")],
             "test1": [dict(identifier="test1-7-2-0", sentence="both images contain a coat.", label="False")]}
    (root / "data").mkdir(parents=True)
    for split, rows in lines.items():
        (root / "data" / f"{split}.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        for n, row in enumerate(rows):
            stem = row["identifier"].rsplit("-", 1)[0]
            folder = root / "images" / split / (str(row["directory"]) if "directory" in row else "")
            image(folder / f"{stem}-img0.png", 40 + 20 * n)
            image(folder / f"{stem}-img1.png", 140 + 20 * n)
    return root


def test_nlvr2_pairs_statements_and_labels(tmp_path, tokenizer):
    make_nlvr(tmp_path)
    data = build_vl_data(f"nlvr2:{tmp_path}", CONFIG)
    assert (len(data.train), len(data.val), len(data.test)) == (2, 1, 1) and data.task == "nlvr"
    second = data.train[1]
    assert (pixel(second["image0"]), pixel(second["image1"]), second["label"]) == (60, 160, 0)
    assert tokenizer.decode(second["input_ids"]) == "the left image contains a coat ."
    assert data.train[0]["label"] == 1 and second["input_ids"].shape == (48,)  # the tokenizer's own length
    assert len(build_vl_data(f"nlvr2:{tmp_path}", CONFIG, final=True).train) == 3
    pytest.importorskip("transformers")
    fast = tokenizer.to_transformers()
    fast.model_max_length = int(1e30)  # what transformers reports for a checkpoint that sets no length
    through_transformers = build_vl_data(f"nlvr2:{tmp_path}", CONFIG, fast).train[1]["input_ids"]
    assert through_transformers.shape == (40,) and torch.equal(through_transformers, second["input_ids"][:40])


def test_nlvr2_bad_inputs_name_the_file_and_line(tmp_path):
    make_nlvr(tmp_path)
    train = tmp_path / "data" / "train.json"
    good = train.read_text()
    train.write_text(good + '{"identifier": "train-12-0-0", "sentence": "x" "label": "True"}\n')
    with pytest.raises(DataError, match=r"train.json line 3: not valid JSON"):
        build_vl_data(f"nlvr2:{tmp_path}", CONFIG)
    train.write_text(good + json.dumps(dict(identifier="train-12-0-0", sentence="x", label="maybe", directory=1)))
    with pytest.raises(DataError, match=r"train.json line 3: label 'maybe' is not True or False"):
        build_vl_data(f"nlvr2:{tmp_path}", CONFIG)
    train.write_text(good + json.dumps(dict(identifier="train-12-0-0", sentence="x", label="True", directory=1)))
    with pytest.raises(DataError, match=r"train.json line 3: image .*train-12-0-img0.png does not exist"):
        build_vl_data(f"nlvr2:{tmp_path}", CONFIG)
    train.write_text(good + json.dumps(dict(identifier="train-12-0-0", label="True", directory=1)))
    with pytest.raises(DataError, match=r"train.json line 3: missing field 'sentence'"):
        build_vl_data(f"nlvr2:{tmp_path}", CONFIG)


# ---- Flickr30K -------------------------------------------------------------------------------

def make_f30k(root):
    entries = [("1.jpg", "train", ["a dog runs .", "a brown dog ."]), ("2.jpg", "restval", ["two men talk ."]),
               ("3.jpg", "val", ["a cat ."]), ("4.jpg", "test", ["a red bag .", "a bag at the left ."]),
               ("5.jpg", "test", ["a coat ."])]
    images = []
    for n, (name, split, sentences) in enumerate(entries):
        image(root / "flickr30k-images" / name, 30 * n)
        images.append({"filename": name, "split": split, "imgid": n,
                       "sentences": [{"raw": s, "tokens": s.split()} for s in sentences]})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


def test_f30k_karpathy_split(tmp_path, tokenizer):
    make_f30k(tmp_path)
    data = build_vl_data(f"f30k:{tmp_path}", CONFIG, negatives=1)
    assert data.task == "retrieval" and (len(data.train), len(data.val), len(data.test)) == (3, 1, 3)
    assert data.train.text_image.tolist() == [0, 0, 1] and data.test.text_image.tolist() == [0, 0, 1]
    sample = data.train[2]
    assert sample["image"].shape == (2, 3, 16, 16) and [pixel(x) for x in sample["image"]] == [30, 0]
    assert [pixel(data.test.images_dataset()[i]["image"]) for i in range(2)] == [90, 120]
    assert tokenizer.decode(data.test.input_ids[1]) == "a bag at the left ."


def test_f30k_missing_image_and_bad_split(tmp_path):
    make_f30k(tmp_path)
    (tmp_path / "flickr30k-images" / "4.jpg").unlink()
    with pytest.raises(DataError, match=r"dataset_flickr30k.json: images\[3\]: image .*4.jpg does not exist"):
        build_vl_data(f"f30k:{tmp_path}", CONFIG)
    data = json.loads((tmp_path / "dataset_flickr30k.json").read_text())
    data["images"][1]["split"] = "holdout"
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[1\]: split 'holdout' is not train, restval, val or test"):
        build_vl_data(f"f30k:{tmp_path}", CONFIG)
    with pytest.raises(DataError, match="no such folder"):
        build_vl_data(f"f30k:{tmp_path / 'nope'}", CONFIG)
