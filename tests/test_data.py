"""vptune.data: every spec form on tiny generated trees, the preprocessing shapes, each bad-input
error, skipping bad images, and the mini-benchmark's determinism, sizes and cache."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vptune.data import MINI_TASKS, DataError, build_data
from vptune.data import mini

CONFIG = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=1.0)


def write_image(path, size=(40, 30), value=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    pixels[: size[1] // 2] = 255 - value  # not uniform, so flips and crops change it
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def corrupt(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image")
    return path


# ---- imagefolder -------------------------------------------------------------------------

def test_imagefolder_without_splits_is_all_train_and_says_so(tmp_path):
    for cls, n in (("cat", 3), ("dog", 2)):
        for i in range(n):
            write_image(tmp_path / cls / f"{i}.png", value=40 * i)
    (tmp_path / "dog" / "readme.txt").write_text("not an image, ignored")
    with pytest.warns(UserWarning, match="every image is used for training"):
        data = build_data(f"imagefolder:{tmp_path}", CONFIG)
    assert (len(data.train), data.val, data.test) == (5, None, None)
    assert data.num_classes == 2 and data.class_names == ["cat", "dog"]
    image, label = data.train[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    assert data.notes and data.skipped == []


def test_imagefolder_with_splits(tmp_path):
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                write_image(tmp_path / split / cls / f"{i}.jpg", fmt="JPEG")
    data = build_data(f"imagefolder:{tmp_path}", CONFIG)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 2, 4)
    final = build_data(f"imagefolder:{tmp_path}", CONFIG, final=True)
    assert len(final.train) == 6  # a folder has no train+val list: final trains on train


def test_imagefolder_unknown_class_in_val(tmp_path):
    write_image(tmp_path / "train" / "a" / "0.png")
    write_image(tmp_path / "val" / "zebra" / "0.png")
    with pytest.raises(DataError, match=r"zebra is not one of the classes"):
        build_data(f"imagefolder:{tmp_path}", CONFIG)


# ---- vtab1k ------------------------------------------------------------------------------

def make_vtab(root, task="task", n_classes=3):
    folder = root / task
    lines = {"train800.txt": [], "val200.txt": [], "test.txt": []}
    for split, n in (("train800.txt", 6), ("val200.txt", 3), ("test.txt", 3)):
        for i in range(n):
            name = f"images/{split[:3]}{i}.png"
            write_image(folder / name, size=(20 + i, 24), value=20 * i)
            lines[split].append(f"{name} {i % n_classes}")
    # one path given relative to the VTAB root instead of the task folder
    lines["test.txt"][0] = f"{task}/images/tes0.png 0"
    lines["train800val200.txt"] = lines["train800.txt"] + lines["val200.txt"]
    for name, content in lines.items():
        (folder / name).write_text("\n".join(content) + "\n")
    return folder


def test_vtab1k_splits_resize_without_augmentation(tmp_path):
    folder = make_vtab(tmp_path)
    data = build_data(f"vtab1k:{folder}", CONFIG)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 3)
    assert data.num_classes == 3 and data.class_names == ["0", "1", "2"]
    first, again = data.train[1][0], data.train[1][0]
    assert first.shape == (3, 32, 32) and torch.equal(first, again)
    assert len(build_data(f"vtab1k:{folder}", CONFIG, final=True).train) == 9


def test_vtab1k_size_follows_data_config(tmp_path):
    folder = make_vtab(tmp_path)
    config = dict(CONFIG, input_size=(3, 48, 40))
    assert build_data(f"vtab1k:{folder}", config).test[0][0].shape == (3, 48, 40)


@pytest.mark.parametrize("line, message", [
    ("images/tra0.png", r"train800.txt:2: expected 'relative/path label'"),
    ("images/tra0.png x", r"train800.txt:2: label 'x' is not an integer"),
    ("images/tra0.png -1", r"train800.txt:2: label -1 is negative"),
])
def test_vtab1k_malformed_line_names_file_and_line(tmp_path, line, message):
    folder = make_vtab(tmp_path)
    lines = (folder / "train800.txt").read_text().splitlines()
    lines[1] = line
    (folder / "train800.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match=message):
        build_data(f"vtab1k:{folder}", CONFIG)


def test_vtab1k_label_out_of_range(tmp_path):
    folder = make_vtab(tmp_path)
    (folder / "test.txt").write_text("images/tes1.png 1\nimages/tes2.png 7\n")
    with pytest.raises(DataError, match=r"test.txt:2: label 7 out of range: the training split has 3 classes"):
        build_data(f"vtab1k:{folder}", CONFIG)


def test_vtab1k_missing_split_file_names_it(tmp_path):
    folder = make_vtab(tmp_path)
    (folder / "val200.txt").unlink()
    with pytest.raises(DataError, match=r"missing split file\(s\) val200.txt; expected train800.txt"):
        build_data(f"vtab1k:{folder}", CONFIG)


def test_vtab1k_missing_image_names_file_and_line(tmp_path):
    folder = make_vtab(tmp_path)
    (folder / "images" / "val1.png").unlink()
    with pytest.raises(DataError, match=r"val1.png \(.*val200.txt:2\).*--skip-bad-images"):
        build_data(f"vtab1k:{folder}", CONFIG)


def test_corrupt_image_errors_or_is_skipped(tmp_path):
    folder = make_vtab(tmp_path)
    corrupt(folder / "images" / "tra2.png")
    with pytest.raises(DataError, match=r"cannot read image .*tra2.png .*--skip-bad-images"):
        build_data(f"vtab1k:{folder}", CONFIG)
    data = build_data(f"vtab1k:{folder}", CONFIG, skip_bad_images=True)
    assert len(data.train) == 5 and len(data.skipped) == 1 and "tra2.png" in data.skipped[0]
    final = build_data(f"vtab1k:{folder}", CONFIG, final=True, skip_bad_images=True)
    assert len(final.train) == 8 and len(final.skipped) == 1


def test_truncated_jpeg_is_reported_or_skipped(tmp_path):
    for i in range(3):
        write_image(tmp_path / "a" / f"{i}.jpg", size=(64, 64), fmt="JPEG")
    bad = tmp_path / "a" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.warns(UserWarning):
        data = build_data(f"imagefolder:{tmp_path}", CONFIG, skip_bad_images=True)
    assert len(data.train) == 2 and "1.jpg" in data.skipped[0]
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"1.jpg"):
        data = build_data(f"imagefolder:{tmp_path}", CONFIG)
        [data.train[i] for i in range(len(data.train))]  # header checks may pass; decoding must not


# ---- fgvc --------------------------------------------------------------------------------

def make_fgvc(root, under_images=True):
    folder = root / "birds"
    base = folder / "images" if under_images else folder
    splits = {}
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        mapping = {}
        for i in range(n):
            label = i % 2
            name = f"{label:03d}.species{label}/{split}{i}.jpg"
            write_image(base / name, size=(50, 30), value=30 * i, fmt="JPEG")
            mapping[name] = label
        splits[split] = mapping
        (folder / f"{split}.json").write_text(json.dumps(mapping, indent=1))
    return folder


@pytest.mark.parametrize("under_images", [True, False])
def test_fgvc_splits_and_preprocessing(tmp_path, under_images):
    folder = make_fgvc(tmp_path, under_images)
    config = dict(CONFIG, input_size=(3, 24, 24))
    data = build_data(f"fgvc:{folder}", config)
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 2)
    assert data.class_names == ["000.species0", "001.species1"]
    assert data.train[0][0].shape == data.test[0][0].shape == (3, 24, 24)
    assert torch.equal(data.test[0][0], data.test[0][0])  # eval: resize + centre crop, deterministic
    torch.manual_seed(0)
    crops = {data.train[0][0].sum().item() for _ in range(20)}
    assert len(crops) > 1  # train: random crop and flip
    assert len(build_data(f"fgvc:{folder}", config, final=True).train) == 6


def test_fgvc_invalid_json_names_line(tmp_path):
    folder = make_fgvc(tmp_path)
    (folder / "test.json").write_text('{\n "a.jpg": 0,\n "b.jpg" 1\n}')
    with pytest.raises(DataError, match=r"test.json:3: invalid JSON"):
        build_data(f"fgvc:{folder}", CONFIG)


def test_fgvc_bad_and_out_of_range_labels_name_line(tmp_path):
    folder = make_fgvc(tmp_path)
    (folder / "val.json").write_text('{\n "000.species0/val0.jpg": 0,\n "001.species1/val1.jpg": "one"\n}')
    with pytest.raises(DataError, match=r"val.json:3: label of '001.species1/val1.jpg' is 'one', expected an integer"):
        build_data(f"fgvc:{folder}", CONFIG)
    (folder / "val.json").write_text('{\n "000.species0/val0.jpg": 0,\n "001.species1/val1.jpg": 5\n}')
    with pytest.raises(DataError, match=r"val.json:3: label 5 out of range"):
        build_data(f"fgvc:{folder}", CONFIG)


def test_fgvc_missing_split_file(tmp_path):
    folder = make_fgvc(tmp_path)
    (folder / "train.json").unlink()
    with pytest.raises(DataError, match=r"missing split file\(s\) train.json"):
        build_data(f"fgvc:{folder}", CONFIG)


@pytest.mark.parametrize("spec, message", [
    ("cifar", r"not understood; expected imagefolder:PATH"),
    ("hub:cifar10", r"unknown data source 'hub'"),
    ("mini:nope", r"unknown mini task 'nope'; the mini-benchmark has: digits"),
    ("vtab1k:/no/such/folder", r"no such folder"),
])
def test_bad_specs(spec, message):
    with pytest.raises(DataError, match=message):
        build_data(spec, CONFIG)


# ---- the mini-benchmark ------------------------------------------------------------------

@pytest.fixture(scope="module")
def mini_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VPTUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield {name: mini.load(name) for name in MINI_TASKS}


def test_mini_tasks_cover_the_groups():
    groups = [task.group for task in MINI_TASKS.values()]
    assert len(MINI_TASKS) >= 6 and groups.count("structured") >= 3 and "natural" in groups
    assert all(task.description and task.num_classes >= 2 for task in MINI_TASKS.values())


def test_mini_sizes_and_labels(mini_cache):
    for name, arrays in mini_cache.items():
        n = MINI_TASKS[name].num_classes
        assert arrays.trainval_x.shape == (1000, 32, 32, 3) and arrays.trainval_x.dtype == np.uint8
        assert len(arrays.test_x) >= 500 and arrays.test_x.shape[1:] == (32, 32, 3)
        for labels in (arrays.trainval_y, arrays.test_y):
            assert labels.min() == 0 and labels.max() == n - 1
    assert len(mini_cache["digits"].test_x) == 797


@pytest.mark.parametrize("name", ["digits", "photo-zoom", "count", "orientation"])
def test_mini_generation_is_deterministic(mini_cache, name):
    again = mini.generate(name)
    for key, array in vars(mini_cache[name]).items():
        assert array.tobytes() == getattr(again, key).tobytes(), key


def test_mini_cache_is_reused_and_regenerated_when_corrupt(mini_cache, monkeypatch):
    monkeypatch.setenv("VPTUNE_CACHE", str(mini.cache_path("count").parents[1]))
    path = mini.cache_path("count")
    assert path.is_file()
    monkeypatch.setattr(mini, "generate", lambda name: pytest.fail("the cache should have been used"))
    assert np.array_equal(mini.load("count").test_x, mini_cache["count"].test_x)
    monkeypatch.undo()
    monkeypatch.setenv("VPTUNE_CACHE", str(path.parents[1]))
    path.write_bytes(b"truncated")
    assert np.array_equal(mini.load("count").test_x, mini_cache["count"].test_x)
    assert np.load(path)["test_x"].shape == mini_cache["count"].test_x.shape


def test_mini_build_data(mini_cache, monkeypatch):
    monkeypatch.setenv("VPTUNE_CACHE", str(mini.cache_path("scale").parents[1]))
    data = build_data("mini:scale", dict(CONFIG, input_size=(3, 40, 40)))
    assert (len(data.train), len(data.val), len(data.test)) == (800, 200, 1000)
    assert data.num_classes == 4 and data.class_names == list(MINI_TASKS["scale"].class_names)
    image, label = data.val[0]
    assert image.shape == (3, 40, 40) and isinstance(label, int)
    assert len(build_data("mini:scale", CONFIG, final=True).train) == 1000


def test_photo_zoom_splits_come_from_disjoint_tiles_covering_the_photo():
    photo = np.arange(427 * 640).reshape(427, 640, 1)  # every pixel its own id
    pixels = {split: [set(tile.ravel().tolist()) for tile in mini._tiles(photo, split)]
              for split in ("train", "val", "test")}
    assert [len(tiles) for tiles in pixels.values()] == [6, 2, 4]
    flat = {split: set().union(*tiles) for split, tiles in pixels.items()}
    assert not flat["train"] & flat["val"] and not flat["train"] & flat["test"] and not flat["val"] & flat["test"]
    assert all(tile.shape[0] >= max(mini._ZOOMS) and tile.shape[1] >= max(mini._ZOOMS)
               for split in pixels for tile in mini._tiles(photo, split))
    for split in ("train", "test"):  # both see every row and every column of the grid
        rows = {int(min(tile)) // 640 // 142 for tile in pixels[split]}
        cols = {int(min(tile)) % 640 // 160 for tile in pixels[split]}
        assert rows == {0, 1, 2} and cols == {0, 1, 2, 3}


# ---- risky defaults: symlinks, label typos, huge images -------------------------------------

def test_a_symlinked_folder_is_not_a_class_and_a_loop_does_not_repeat_images(tmp_path):
    """A link to the train folder itself used to become a class holding every image a second time."""
    for name in ("cat", "dog"):
        write_image(tmp_path / "train" / name / "0.png")
    (tmp_path / "train" / "loop").symlink_to(tmp_path / "train", target_is_directory=True)
    (tmp_path / "train" / "cat" / "again").symlink_to(tmp_path / "train", target_is_directory=True)
    with pytest.warns(UserWarning, match=r"skipped symlinked folder\(s\) loop: an image folder's links are not followed"):
        data = build_data(f"imagefolder:{tmp_path}", CONFIG)
    assert data.class_names == ["cat", "dog"] and len(data.train) == 2


def test_a_label_typo_that_would_build_a_huge_head_is_refused_naming_file_and_line(tmp_path):
    folder = make_vtab(tmp_path)
    lines = (folder / "train800.txt").read_text().splitlines()
    lines[4] = "images/tra4.png 99999"
    (folder / "train800.txt").write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"train800.txt:5: label 99999 makes 100,000 classes, but the training split "
                                        r"uses only 4 distinct labels: a typo\?.*--allow-sparse-labels"):
        build_data(f"vtab1k:{folder}", CONFIG)
    assert build_data(f"vtab1k:{folder}", CONFIG, allow_sparse_labels=True).num_classes == 100_000


def test_images_above_the_pixel_limit_are_refused_before_decoding_or_skipped(tmp_path):
    """A 100-megapixel PNG of a few KB used to be accepted for training with only Pillow's warning."""
    from conftest import huge_png

    for name in ("cat", "dog"):
        write_image(tmp_path / "train" / name / "0.png")
    huge = huge_png(tmp_path / "train" / "cat" / "huge.png", 10_000, 10_000)  # 100 megapixels in a few KB
    with pytest.raises(DataError, match=r"huge.png is 10000x10000 = 100 megapixels, above the limit of 16 megapixels"):
        build_data(f"imagefolder:{tmp_path}", CONFIG)
    huge.unlink()
    big = write_image(tmp_path / "train" / "dog" / "big.png", size=(200, 150))
    with pytest.raises(DataError, match=r"big.png is 200x150 = 0.03 megapixels, above the limit of 0.02 megapixels"):
        build_data(f"imagefolder:{tmp_path}", CONFIG, max_pixels=20_000)
    data = build_data(f"imagefolder:{tmp_path}", CONFIG, max_pixels=20_000, skip_bad_images=True)
    assert len(data.train) == 2 and str(big) in data.skipped[0]
    assert len(build_data(f"imagefolder:{tmp_path}", CONFIG).train) == 3
    with pytest.raises(ValueError, match="--max-image-pixels must be >= 1"):
        build_data(f"imagefolder:{tmp_path}", CONFIG, max_pixels=0)
