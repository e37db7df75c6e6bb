"""The captioned canvases (scenes.py), their template text (texts.py), the word tokenizer and the
vision-language mini benchmark (minivl.py): pictures match descriptions, every question's
answer is true of its picture (checked by an independent reading of the text), answers are
balanced so the text alone tells nothing, pools are disjoint, tokenizer round trips."""

import re
import warnings

import numpy as np
import pytest
import torch

from vptune.data import minivl, scenes, texts
from vptune.data.fashion_mnist import load_fashion_mnist
from vptune.data.scenes import PLACES, Item, Scene
from vptune.data.tokenizer import SPECIAL_TOKENS, WordTokenizer, mask_tokens

SMALL = {"train": 240, "val": 60, "test": 120}


@pytest.fixture(scope="module")
def tokenizer():
    return WordTokenizer.from_file()


@pytest.fixture(scope="module")
def generated():
    return {task: minivl.generate(task, SMALL) for task in minivl.TASKS}


# ---- scenes ----------------------------------------------------------------------------------

def test_pools_are_disjoint_and_the_test_pool_is_the_mini_benchmarks_test_half():
    seen = {}
    for pool in scenes.POOLS:
        split, indices = scenes.pool_indices(pool)
        for other, (other_split, other_indices) in seen.items():
            assert split != other_split or not set(indices) & set(other_indices), (pool, other)
        seen[pool] = (split, indices)
    assert {scenes.pool_indices(p)[0] for p in scenes.PRETRAIN_POOLS} == {"train"}
    assert {scenes.pool_indices(p)[0] for p in scenes.BENCHMARK_POOLS} == {"test"}
    assert scenes.pool_indices("test")[1].tolist() == list(range(5000, 10000))
    with pytest.raises(ValueError, match="unknown canvas pool 'nope'"):
        scenes.pool_indices("nope")


def test_scenes_round_trip_through_arrays_and_render_the_described_kinds():
    rng = np.random.default_rng(3)
    described = [scenes.sample_scene(rng) for _ in range(300)]
    assert scenes.scenes_from_arrays(scenes.scenes_to_arrays(described)) == described
    assert {len(s.items) for s in described} == {1, 2, 3, 4}
    assert {s.layout for s in described} == set(scenes.LAYOUTS)
    images, sources = scenes.render(described, "val", np.random.default_rng(0))
    assert images.shape == (300, 32, 32) and images.dtype == np.uint8
    labels = load_fashion_mnist("test")[1]
    for scene, source in zip(described, sources):
        assert source[len(scene.items):].tolist() == [-1] * (4 - len(scene.items))
        assert [labels[i] for i in source[:len(scene.items)]] == [item.kind for item in scene.items]
        assert all(4000 <= i < 5000 for i in source[:len(scene.items)])
    again, _ = scenes.render(described, "val", np.random.default_rng(0))
    assert np.array_equal(images, again)
    assert scenes.render(described[:3], "val", np.random.default_rng(0), size=64)[0].shape == (3, 64, 64)


def test_fixed_sources_draw_one_item_instance_in_several_canvases():
    labels = load_fashion_mnist("test")[1]
    bag = int(np.flatnonzero(labels[5000:] == 8)[0]) + 5000  # a bag of the test pool
    subject = [Scene("single", (Item(8, place, size, 0),)) for place, size in (("left", "medium"), ("center", "large"))]
    sources = np.array([[bag, -1, -1, -1]] * 2)
    images, used = scenes.render(subject, "test", np.random.default_rng(0), sources=sources)
    assert np.array_equal(used, sources) and images[0].any() and images[1].any()
    with pytest.raises(ValueError, match=f"image {bag} is a 8, not a 3"):
        scenes.render([Scene("single", (Item(3, "left", "small", 0),))], "test", np.random.default_rng(0), sources=sources[:1])
    with pytest.raises(ValueError, match=f"image {bag} is not in pool 'train'"):
        scenes.render(subject[:1], "train", np.random.default_rng(0), sources=sources[:1])


def bright_box(canvas):
    rows, cols = np.nonzero(canvas > 20)
    return rows.min(), rows.max(), cols.min(), cols.max()


@pytest.mark.parametrize("place", PLACES)
def test_an_item_is_drawn_at_its_place(place):
    scene = Scene("single", (Item(8, place, "tiny", 0),))
    canvas = scenes.render([scene], "train", np.random.default_rng(1))[0][0]
    top, bottom, left, right = bright_box(canvas)
    row, col = divmod(PLACES.index(place), 3)
    assert int((top + bottom) / 2 // (32 / 3)) == row and int((left + right) / 2 // (32 / 3)) == col


def test_sizes_and_rotations_are_drawn_as_described():
    sides = {}
    for size in scenes.SIZES:
        canvas = scenes.render([Scene("single", (Item(3, "center", size, 0),))], "train", np.random.default_rng(2))[0][0]
        top, bottom, left, right = bright_box(canvas)
        sides[size] = max(bottom - top, right - left) + 1
        assert scenes.SCALES[size][0] - 1 <= sides[size] <= scenes.SCALES[size][1], size
    assert sides["tiny"] < sides["small"] < sides["medium"] < sides["large"]
    boxes = {}
    for rotation in (0, 90):  # same draws: a quarter turn swaps the item's height and width
        canvas = scenes.render([Scene("single", (Item(1, "center", "medium", rotation),))], "train",
                               np.random.default_rng(5))[0][0]
        top, bottom, left, right = bright_box(canvas)
        boxes[rotation] = (bottom - top, right - left)
    assert boxes[0] == boxes[90][::-1] and boxes[0][0] != boxes[0][1]


# ---- text ------------------------------------------------------------------------------------

def test_canonical_captions_literally():
    pair = Scene("pair", (Item(8, "left", "small", 180), Item(9, "right", "tiny", 0)))
    assert texts.caption(pair) == "2 items: a small bag at the left upside down and a tiny ankle boot at the right"
    assert texts.caption(Scene("single", (Item(4, "center", "large", 90),))) == "a large coat at the center turned left"
    three = Scene("grid2", (Item(0, "top-left", "tiny", 270), Item(0, "top-right", "small", 0),
                            Item(2, "bottom-right", "small", 0)))
    assert texts.caption(three) == ("3 items: a tiny t-shirt at the top-left turned right, a small t-shirt at the "
                                    "top-right and a small pullover at the bottom-right")


def kinds_named(text):
    return {k for k, name in enumerate(texts.KINDS) if re.search(rf"(?<![\w-]){name}(?![\w-])", text)}


def test_paraphrases_only_name_kinds_that_are_there():
    rng = np.random.default_rng(0)
    generic = 0
    for _ in range(300):
        scene = scenes.sample_scene(rng)
        present = {item.kind for item in scene.items}
        paraphrase = texts.caption(scene, rng)
        assert kinds_named(paraphrase) <= present, (paraphrase, scene)
        assert kinds_named(texts.caption(scene)) == present
        generic += " item " in f" {paraphrase} ".replace(",", " ")
    assert generic > 20  # some items are called just "item", as zero-shot prompts do


def test_statement_truth_on_literal_pairs():
    left = Scene("pair", (Item(8, "left", "small", 180), Item(9, "right", "tiny", 0)))
    right = Scene("single", (Item(8, "center", "large", 0),))
    truth = lambda template, **slots: texts.statement_truth(template, left, right, **slots)  # noqa: E731
    assert truth(0, side="right", kind=8) and not truth(0, side="right", kind=9)
    assert truth(1, kind=8) and not truth(1, kind=9)
    assert truth(2, kind=9) and not truth(2, kind=8)
    assert truth(3) and not truth(4) and not truth(5)
    assert truth(6, n=3) and not truth(6, n=2)
    assert truth(7, side="left", kind=9, place="right") and not truth(7, side="left", kind=8, place="right")
    assert truth(8, side="left") and not truth(8, side="right")


def test_class_texts_cover_the_structured_mini_tasks(tokenizer):
    from vptune.data.mini import MINI_TASKS

    for name, task in MINI_TASKS.items():
        if task.group != "structured":
            with pytest.raises(ValueError, match="has no canvas texts"):
                texts.class_texts(name)
            continue
        prompts = texts.class_texts(name)
        assert len(prompts) == task.num_classes and len(set(prompts)) == len(prompts)
        assert all(tokenizer.unk_token_id not in tokenizer.encode(p) for p in prompts)
    assert texts.class_texts("count") == ["1 item", "2 items", "3 items", "4 items"]
    assert texts.class_texts("fashion-mnist")[9] == "an ankle boot"


# ---- tokenizer -------------------------------------------------------------------------------

def test_every_template_text_is_in_the_shipped_vocabulary_and_fits(tokenizer, generated):
    assert set(texts.vocabulary_words()) <= set(tokenizer.vocab)
    assert tokenizer.tokens[:5] == list(SPECIAL_TOKENS) and "sks" in tokenizer.vocab
    rng = np.random.default_rng(1)
    described = [scenes.sample_scene(rng, n) for n in (1, 2, 3, 4) for _ in range(100)]
    all_texts = [texts.caption(s) for s in described] + [texts.caption(s, rng) for s in described * 3]
    all_texts += [t for data in generated.values() for part in data.values() for t in part.texts.tolist()]
    # the longest caption: four rotated ankle boots (the two-word kind), paraphrased with a prefix
    worst = Scene("grid3", tuple(Item(9, p, "small", 90) for p in ("top-left", "top-right", "bottom-left", "bottom-right")))
    assert len(tokenizer.encode(texts.caption(worst))) == 44
    all_texts += [texts.caption(worst, rng) for _ in range(2000)]
    longest = max(len(tokenizer.encode(t)) for t in all_texts)
    assert longest <= tokenizer.model_max_length == 48
    assert not any(tokenizer.unk_token_id in tokenizer.encode(t) for t in all_texts)


def test_tokenizer_call_shape_padding_truncation(tokenizer):
    v = tokenizer.vocab
    out = tokenizer(["A bag?", "is there an ankle-boot"], max_length=6, return_tensors="pt", truncation=True)
    assert out["input_ids"].tolist() == [
        [v["[CLS]"], v["a"], v["bag"], v["?"], v["[SEP]"], v["[PAD]"]],
        [v["[CLS]"], v["is"], v["there"], v["an"], v["[UNK]"], v["[SEP]"]]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]
    single = tokenizer("t-shirt/top", padding=False)
    assert single["input_ids"] == [v["[CLS]"], v["t-shirt"], v["[UNK]"], v["top"], v["[SEP]"]]
    assert tokenizer.decode(single["input_ids"]) == "t-shirt top"  # [UNK] is special, as in transformers
    assert tokenizer.decode(single["input_ids"], skip_special_tokens=False) == "[CLS] t-shirt [UNK] top [SEP]"
    assert tokenizer(["a", "a bag bag"], padding="longest")["input_ids"][0] == [v["[CLS]"], v["a"], v["[SEP]"], 0, 0]
    long = "a bag " * 30
    with pytest.warns(UserWarning, match="1 text\\(s\\) longer than 48 tokens were truncated"):
        ids = tokenizer(long)["input_ids"]
    assert len(ids) == 48 and ids[-1] == v["[SEP]"]
    with pytest.raises(ValueError, match="longer than 48 tokens"):
        tokenizer(long, truncation=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(tokenizer(long, truncation=True)["input_ids"]) == 48


def test_transformers_tokenizer_gives_the_same_ids(tokenizer):
    pytest.importorskip("transformers")
    fast = tokenizer.to_transformers()
    sample = ["2 items: a small bag at the left upside down and a tiny ankle boot at the right",
              "Is there a T-shirt/top?", "the left image has sks , more items!", "unknown words here."]
    ours = tokenizer(sample, max_length=24, return_tensors="pt")
    theirs = fast(sample, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert fast.mask_token_id == tokenizer.mask_token_id and len(fast) == len(tokenizer)


def test_mask_tokens_never_masks_special_tokens(tokenizer):
    ids = tokenizer(["4 items: a small bag at the left and a tiny coat at the right"] * 64, return_tensors="pt")["input_ids"]
    masked, labels = mask_tokens(ids, tokenizer, probability=1.0, generator=torch.Generator().manual_seed(0))
    special = torch.isin(ids, torch.tensor(sorted(tokenizer.special_ids)))
    assert torch.equal(labels[special], torch.full_like(labels[special], -100))
    assert torch.equal(labels[~special], ids[~special])
    share = (masked[~special] == tokenizer.mask_token_id).float().mean().item()
    assert 0.75 < share < 0.85 and torch.equal(masked[special], ids[special])
    kept = (masked[~special] == ids[~special]).float().mean().item()
    assert 0.07 < kept < 0.16  # the 10% left as they are, plus random words that drew themselves
    masked, labels = mask_tokens(ids, tokenizer, probability=0.0)
    assert torch.equal(masked, ids) and (labels == -100).all()


# ---- the benchmark ---------------------------------------------------------------------------

def vqa_oracle(question, scene):
    """The answer read off the description, parsing the question independently of texts.py."""
    kind = lambda name: texts.KINDS.index(name)  # noqa: E731
    plural = lambda name: texts.KIND_PLURALS.index(name)  # noqa: E731
    if m := re.fullmatch(r"(?:what is|what is the item|which item is) at the ([\w-]+)\?", question):
        return texts.KINDS[scene.at(m[1]).kind]
    if m := re.fullmatch(r"where is the ([\w -]+?)(?: placed)?\?", question):
        (item,) = [i for i in scene.items if i.kind == kind(m[1])]
        return item.place
    if question == "how many items are there?":
        return str(len(scene.items))
    if m := re.fullmatch(r"how many ([\w -]+?) are (?:there|in the picture)\?", question):
        return str(scene.count(plural(m[1])))
    if m := re.fullmatch(r"is there an? ([\w -]+?) at the ([\w-]+)\?", question):
        item = scene.at(m[2])
        return "yes" if item is not None and item.kind == kind(m[1]) else "no"
    if m := re.fullmatch(r"is there a (tiny|small|medium|large) ([\w -]+)\?", question):
        return "yes" if any(i.size == m[1] and i.kind == kind(m[2]) for i in scene.items) else "no"
    if m := re.fullmatch(r"is there an? ([\w -]+)\?", question):
        return "yes" if scene.count(kind(m[1])) else "no"
    raise AssertionError(f"unparsed question {question!r}")


def test_vqa_answers_are_true_of_the_pictures_and_balanced(generated):
    for split, part in generated["vqa"].items():
        for question, label, scene in zip(part.texts, part.labels, minivl.scenes(part)):
            assert vqa_oracle(str(question), scene) == minivl.ANSWER_LIST[label], question
        assert np.bincount(part.groups).tolist() == [SMALL[split] // 4] * 4
        for g, qtype in enumerate(minivl.QUESTION_TYPES):
            counts = np.bincount(part.labels[part.groups == g], minlength=len(minivl.ANSWER_LIST))
            counts = counts[[minivl.ANSWER_LIST.index(a) for a in texts.ANSWERS[qtype]]]
            assert counts.max() - counts.min() <= len(texts.QUESTIONS[qtype]), (split, qtype, counts)


def nlvr_oracle(statement, left, right):
    kind = lambda name: texts.KINDS.index(name)  # noqa: E731
    has = lambda scene, k: any(i.kind == k for i in scene.items)  # noqa: E731
    side = lambda name: left if name == "left" else right  # noqa: E731
    n = lambda scene: len(scene.items)  # noqa: E731
    if m := re.fullmatch(r"the (left|right) image contains an? ([\w -]+)\.", statement):
        return has(side(m[1]), kind(m[2]))
    if m := re.fullmatch(r"both images contain an? ([\w -]+)\.", statement):
        return has(left, kind(m[1])) and has(right, kind(m[1]))
    if m := re.fullmatch(r"exactly one image contains an? ([\w -]+)\.", statement):
        return has(left, kind(m[1])) != has(right, kind(m[1]))
    if statement == "the left image has more items than the right image.":
        return n(left) > n(right)
    if statement == "the left image has fewer items than the right image.":
        return n(left) < n(right)
    if statement == "both images have the same number of items.":
        return n(left) == n(right)
    if m := re.fullmatch(r"there are (\d) items in total\.", statement):
        return n(left) + n(right) == int(m[1])
    if m := re.fullmatch(r"the (left|right) image has an? ([\w -]+?) at the ([\w-]+)\.", statement):
        return any(i.kind == kind(m[2]) and i.place == m[3] for i in side(m[1]).items)
    if m := re.fullmatch(r"the (left|right) image has an item that is upside down\.", statement):
        return any(i.rotation == 180 for i in side(m[1]).items)
    raise AssertionError(f"unparsed statement {statement!r}")


def test_nlvr_labels_are_true_and_half_true_per_template(generated):
    for part in generated["nlvr"].values():
        assert part.images.shape[1:] == (2, 32, 32)
        for statement, label, left, right in zip(part.texts, part.labels, minivl.scenes(part, "left"),
                                                 minivl.scenes(part, "right")):
            assert nlvr_oracle(str(statement), left, right) == bool(label), statement
        for g in range(len(texts.STATEMENTS)):
            labels = part.labels[part.groups == g]
            assert abs(2 * labels.sum() - len(labels)) <= 1


def test_retrieval_captions_are_unique_and_canonical(generated):
    for part in generated["retrieval"].values():
        assert len(set(part.texts.tolist())) == len(part.texts)
        assert part.texts.tolist() == [texts.caption(s) for s in minivl.scenes(part)]
        assert part.labels.tolist() == list(range(len(part.labels)))


def test_splits_draw_from_their_own_pools(generated):
    for task, data in generated.items():
        for split, part in data.items():
            used = np.concatenate([v[v >= 0] for k, v in part.scenes.items() if k.endswith("source")])
            assert set(used.tolist()) <= set(scenes.pool_indices(split)[1].tolist()), (task, split)


def test_text_alone_does_no_better_than_the_answer_prior():
    data = minivl.generate("vqa", {"train": 1200, "val": 4, "test": 600})
    results = minivl.text_only_baselines("vqa", data)
    for name, row in results.items():
        assert row["prior"] < row["uniform"] + 6, name  # answers balanced on the test split too
        assert row["type_majority"] <= row["prior"] + 1e-9 and row["bag_of_words"] < row["prior"] + 6, (name, row)
    assert results["all"]["bag_of_words"] < results["all"]["prior"] + 3
    nlvr = minivl.text_only_baselines("nlvr", minivl.generate("nlvr", {"train": 600, "val": 2, "test": 400}))["all"]
    assert nlvr["bag_of_words"] < 57 and abs(nlvr["prior"] - 50) < 1


def test_cache_round_trip_and_corrupt_cache_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("VPTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(minivl, "SPLITS", {"train": 8, "val": 4, "test": 4})
    first = minivl.load("nlvr")
    path = minivl.cache_path("nlvr")
    assert path.is_file() and path.stat().st_size < 100_000
    second = minivl.load("nlvr")
    for split in first:
        assert np.array_equal(first[split].images, second[split].images)
        assert first[split].texts.tolist() == second[split].texts.tolist()
        assert minivl.scenes(first[split], "left") == minivl.scenes(second[split], "left")
    path.write_bytes(b"garbage")
    assert np.array_equal(minivl.load("nlvr")["test"].images, first["test"].images)
    with pytest.raises(ValueError, match="unknown minivl task 'caption'"):
        minivl.generate("caption")


def test_pretraining_corpus_refuses_benchmark_pools(tmp_path, monkeypatch):
    monkeypatch.setenv("VPTUNE_CACHE", str(tmp_path))
    corpus = minivl.pretraining_corpus(20, seed=1)
    assert corpus.images.shape == (20, 32, 32) and len(set(corpus.captions.tolist())) > 15
    assert np.array_equal(minivl.pretraining_corpus(20, seed=1).images, corpus.images)  # from the cache
    used = corpus.scenes["source"][corpus.scenes["source"] >= 0]
    assert used.max() < 55000 and scenes.pool_indices("pretrain")[0] == "train"
    for pool in scenes.BENCHMARK_POOLS:
        with pytest.raises(ValueError, match="held out for the benchmarks"):
            minivl.pretraining_corpus(4, pool=pool)
