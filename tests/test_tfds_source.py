"""vptune data vtab1k --source tfds:DATA_DIR: VTAB-1k tasks built from TensorFlow Datasets that real
``tensorflow_datasets`` builders prepare on the spot in a temporary data_dir (array_record format,
read without TensorFlow; no network). The oracle for each slice is TFDS's own split API given the
official code's slice strings; labels are checked against the rows the builders were given.

The tfrecord path (TFDS's ``as_dataset``) needs TensorFlow, which `make setup` does not install:
here only its error is tested; the one test that reads a tfrecord dataset runs where TensorFlow is
importable (docs/benchmarks.md says what was verified with it)."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from vptune.cli import app
from vptune.data import DataError, sources
from vptune.data.prepare import MANIFEST, build_vtab1k
from vptune.data.tfds_source import VTAB_TFDS, _clevr_distance, _kitti_closest_vehicle, _smallnorb

TRAIN = 2000  # the official 90% cut needs 200 examples after it: 1800 + 200


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def prepare(tfds, data_dir: Path, dataset: str, version: str, features: dict, splits: dict, file_format="array_record"):
    """A real TFDS dataset ``dataset:version`` prepared under ``data_dir`` from in-memory rows."""
    with tfds.core.registered.skip_registration():
        class Prepared(tfds.core.GeneratorBasedBuilder):
            name = dataset
            VERSION = tfds.core.Version(version)

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(rows) for split, rows in splits.items()}

            def _generate_examples(self, rows):
                for key, row in enumerate(rows):
                    yield key, row

    builder = Prepared(data_dir=str(data_dir), file_format=file_format)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return Path(builder.data_dir)


def cifar_rows(rng, count: int) -> list[dict]:
    return [{"image": png(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)), "label": int(rng.integers(0, 100))}
            for _ in range(count)]


def clevr_rows(rng, count: int) -> list[dict]:
    rows = []
    for _ in range(count):
        n = int(rng.integers(3, 11))  # 3..10 objects: count labels 0..7
        depth = rng.uniform(7.0, 12.0, n).astype(np.float32)
        rows.append({"image": png(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)),
                     "objects": {"size": rng.integers(0, 2, n),
                                 "pixel_coords": np.stack([rng.uniform(0, 300, n), rng.uniform(0, 200, n), depth], 1).astype(np.float32)}})
    return rows


def dsprites_rows(rng, count: int) -> list[dict]:
    # dSprites stores 0/1 grey pixels; encoded here with PIL (TFDS encodes arrays only through TensorFlow)
    return [{"image": png(rng.integers(0, 2, (6, 6), dtype=np.uint8)), "label_x_position": int(rng.integers(0, 32)),
             "label_orientation": int(rng.integers(0, 40))} for _ in range(count)]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")
    tfds.disable_progress_bar()
    root = tmp_path_factory.mktemp("tfds")
    rng = np.random.default_rng(0)
    rows = {
        "cifar100": {"train": cifar_rows(rng, TRAIN), "test": cifar_rows(rng, 12)},
        "clevr": {"train": clevr_rows(rng, TRAIN), "validation": clevr_rows(rng, 9), "test": clevr_rows(rng, 4)},
        "dsprites": {"train": dsprites_rows(rng, TRAIN)},
    }
    image = tfds.features.Image(shape=(None, None, 3))
    prepare(tfds, root, "cifar100", "3.0.2", {"image": image, "label": tfds.features.ClassLabel(num_classes=100)},
            rows["cifar100"])
    prepare(tfds, root, "cifar100", "2.0.0", {"image": image, "label": tfds.features.ClassLabel(num_classes=100)},
            {"train": rows["cifar100"]["train"][:900], "test": rows["cifar100"]["test"]})  # older: must not be read
    prepare(tfds, root, "clevr", "3.1.0", {
        "image": image,
        "objects": tfds.features.Sequence({"size": tfds.features.ClassLabel(num_classes=2),
                                           "pixel_coords": tfds.features.Tensor(shape=(3,), dtype=np.float32)}),
    }, rows["clevr"])
    prepare(tfds, root, "dsprites", "2.0.0", {
        "image": tfds.features.Image(shape=(6, 6, 1)), "label_x_position": tfds.features.ClassLabel(num_classes=32),
        "label_orientation": tfds.features.ClassLabel(num_classes=40),
    }, rows["dsprites"])
    return root, rows, tfds


@pytest.fixture(scope="module")
def built(tfds_dir, tmp_path_factory):
    root, _, _ = tfds_dir
    out = tmp_path_factory.mktemp("vtab")
    report = build_vtab1k(out, f"tfds:{root}", tasks=["cifar", "clevr_count", "clevr_dist", "dsprites_loc", "dtd"])
    return out, report


def lines(path: Path) -> list[tuple[str, int]]:
    return [(rel, int(label)) for rel, label in (line.rsplit(maxsplit=1) for line in path.read_text().splitlines())]


def official(tfds, root: Path, dataset: str, split: str) -> list[dict]:
    """What TFDS's split API gives for one of the official code's slice strings, images as stored."""
    return list(tfds.data_source(dataset, data_dir=str(root), split=split,
                                 decoders={"image": tfds.decode.SkipDecoding()}))


def test_cifar_is_the_official_slices_with_the_stored_image_bytes(tfds_dir, built):
    root, rows, tfds = tfds_dir
    out, report = built
    assert report.ok, report.problems
    assert report.status == {"cifar": "built", "clevr_count": "built", "clevr_dist": "built", "dsprites_loc": "built",
                             "dtd": "missing"}
    assert report.counts["cifar"] == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 12}
    assert any(n.startswith(f"not in {root}: dtd") for n in report.notes)
    label_of = {row["image"]: row["label"] for split in rows["cifar100"].values() for row in split}
    # The official CIFAR-100 class: train800 = "train[:800]", val200 = "train[{90% of train}:+200]", test = "test".
    for list_name, split in (("train800", "train[:800]"), ("val200", "train[1800:2000]"), ("test", "test")):
        written = lines(out / "cifar" / f"{list_name}.txt")
        expected = official(tfds, root, "cifar100:3.0.2", split)
        assert [(out / "cifar" / rel).read_bytes() for rel, _ in written] == [e["image"] for e in expected]
        assert [label for _, label in written] == [int(e["label"]) for e in expected]
        assert all(label_of[(out / "cifar" / rel).read_bytes()] == label for rel, label in written)
    assert lines(out / "cifar" / "train800val200.txt") == lines(out / "cifar" / "train800.txt") + lines(out / "cifar" / "val200.txt")
    entry = json.loads((out / MANIFEST).read_text())["tasks"]["cifar"]
    assert entry["tfds"] == {"dataset": "cifar100", "version": "3.0.2",
                             "slices": {"train800": "train[0:800]", "val200": "train[1800:2000]", "test": "test[0:12]"}}
    source = sources.vtab1k(out / "cifar")  # the reader training uses
    assert (len(source.train), len(source.val), len(source.trainval), len(source.test)) == (800, 200, 1000, 12)


def test_clevr_labels_are_the_official_count_and_distance_bins(tfds_dir, built):
    root, rows, tfds = tfds_dir
    out, _ = built
    by_image = {row["image"]: row for split in rows["clevr"].values() for row in split}
    thresholds = [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0]
    for task in ("clevr_count", "clevr_dist"):
        assert len(lines(out / task / "test.txt")) == 9  # CLEVR's test is TFDS's validation split
        for list_name in ("train800", "val200", "test"):
            for rel, label in lines(out / task / f"{list_name}.txt"):
                row = by_image[(out / task / rel).read_bytes()]
                if task == "clevr_count":
                    assert label == len(row["objects"]["size"]) - 3
                else:
                    nearest = float(row["objects"]["pixel_coords"][:, 2].min())
                    assert label == sum(t < nearest for t in thresholds) - 1
    assert lines(out / "clevr_count" / "val200.txt")[0][0] == "train/001800.png"


def test_dsprites_images_become_rgb_0_255_and_labels_are_binned(tfds_dir, built):
    root, rows, tfds = tfds_dir
    out, _ = built
    # Official dSprites: train800 = train[:800]; val200 = train[80%:+200]; test = train[90%:].
    counts = {k: len(lines(out / "dsprites_loc" / f"{k}.txt")) for k in ("train800", "val200", "test")}
    assert counts == {"train800": 800, "val200": 200, "test": 200}
    written = lines(out / "dsprites_loc" / "val200.txt")
    expected = list(tfds.data_source("dsprites:2.0.0", data_dir=str(root), split="train[1600:1800]"))
    for (rel, label), example in zip(written, expected):
        pixels = np.asarray(Image.open(out / "dsprites_loc" / rel))
        assert pixels.shape == (6, 6, 3) and set(np.unique(pixels)) <= {0, 255}
        assert np.array_equal(pixels, np.repeat(example["image"], 3, axis=2) * 255)
        assert label == int(example["label_x_position"]) // 2  # 32 positions in 16 bins


def test_a_rerun_verifies_and_a_removed_image_is_named(tfds_dir, built, tmp_path):
    root, _, _ = tfds_dir
    out, _ = built
    again = build_vtab1k(out, f"tfds:{root}", tasks=["cifar"])
    assert again.status == {"cifar": "verified"}
    copy = tmp_path / "copy"
    build_vtab1k(copy, f"tfds:{root}", tasks=["cifar"])
    (copy / "cifar" / "train" / "000003.png").unlink()
    broken = build_vtab1k(copy, f"tfds:{root}", tasks=["cifar"])
    assert broken.status == {"cifar": "failed"} and "listed image(s) missing" in broken.problems["cifar"][0]


def test_the_cli_builds_from_tfds(tfds_dir, tmp_path):
    root, _, _ = tfds_dir
    result = CliRunner().invoke(app, ["data", "vtab1k", "--out", str(tmp_path / "v"), "--source", f"tfds:{root}",
                                      "--tasks", "dsprites_ori"])
    assert result.exit_code == 0, result.output
    assert "built" in result.output
    labels = {label for _, label in lines(tmp_path / "v" / "dsprites_ori" / "train800.txt")}
    assert labels <= set(range(16)) and len(labels) > 8  # 40 orientations in 16 bins


def test_only_the_versions_the_official_code_reads_are_used(tfds_dir, tmp_path):
    root, rows, tfds = tfds_dir
    old = tmp_path / "old"
    prepare(tfds, old, "dsprites", "1.0.0", {"image": tfds.features.Image(shape=(6, 6, 1)),
                                             "label_x_position": tfds.features.ClassLabel(num_classes=32),
                                             "label_orientation": tfds.features.ClassLabel(num_classes=40)},
            {"train": rows["dsprites"]["train"][:1000]})
    report = build_vtab1k(tmp_path / "out", f"tfds:{old}", tasks=["dsprites_loc"])
    assert report.status == {"dsprites_loc": "failed"}
    assert "reads dsprites:2.*.*; it has 1.0.0" in report.problems["dsprites_loc"][0]


def test_too_small_a_split_and_a_tfrecord_dataset_without_tensorflow_are_named(tfds_dir, tmp_path):
    root, rows, tfds = tfds_dir
    small = tmp_path / "small"
    prepare(tfds, small, "cifar100", "3.0.2", {"image": tfds.features.Image(shape=(None, None, 3)),
                                               "label": tfds.features.ClassLabel(num_classes=100)},
            {"train": rows["cifar100"]["train"][:1500], "test": rows["cifar100"]["test"]})
    report = build_vtab1k(tmp_path / "a", f"tfds:{small}", tasks=["cifar"])
    assert "val200 is train[1350:1550], but train has 1500 examples" in report.problems["cifar"][0]
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        copy = tmp_path / "tfrecord" / "cifar100" / "3.0.2"
        shutil.copytree(root / "cifar100" / "3.0.2", copy)
        meta = json.loads((copy / "dataset_info.json").read_text())
        meta["fileFormat"] = "tfrecord"  # as the official VTAB code prepared its datasets
        (copy / "dataset_info.json").write_text(json.dumps(meta))
        report = build_vtab1k(tmp_path / "b", f"tfds:{copy.parent.parent}", tasks=["cifar"])
        assert "was prepared in the tfrecord format, which TFDS reads only through TensorFlow: pip install " \
               "tensorflow" in report.problems["cifar"][0]


def test_without_tensorflow_datasets_the_error_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "tfds" / "cifar100" / "3.0.2").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if not installed
    report = build_vtab1k(tmp_path / "out", f"tfds:{tmp_path / 'tfds'}", tasks=["cifar"])
    assert report.status == {"cifar": "failed"}
    assert 'needs tensorflow_datasets, which is not installed here: pip install "vptune[tfds]"' in report.problems["cifar"][0]
    with pytest.raises(DataError, match="no such folder; expected the data_dir"):
        build_vtab1k(tmp_path / "out", f"tfds:{tmp_path / 'nowhere'}", tasks=["cifar"])


def test_the_official_label_and_slice_rules_on_their_edge_values():
    assert _clevr_distance({"objects": {"pixel_coords": np.array([[0, 0, 8.0], [0, 0, 12.0]])}}, None) == 0  # 8.0 is not > 8.0
    assert _clevr_distance({"objects": {"pixel_coords": np.array([[0, 0, 8.01]])}}, None) == 1
    assert _clevr_distance({"objects": {"pixel_coords": np.array([[0, 0, 10.5]])}}, None) == 5
    kitti = {"objects": {"type": np.array([0, 4, 2]), "location": np.array([[0, 0, 30.0], [0, 0, 3.0], [0, 0, 15.0]])}}
    assert _kitti_closest_vehicle(kitti, None) == 1  # the pedestrian (type 4) at 3 m does not count; the van at 15 m
    assert _kitti_closest_vehicle({"objects": {"type": np.array([5]), "location": np.array([[0, 0, 4.0]])}}, None) == 3
    assert _smallnorb({"train": 24300, "test": 24300})["test"] == [("test", 12150, 24300)]
    assert set(VTAB_TFDS) == set(__import__("vptune.data.suites", fromlist=["VTAB_TASKS"]).VTAB_TASKS)


def test_a_tfrecord_dataset_is_read_through_tensorflow(tfds_dir, tmp_path):
    pytest.importorskip("tensorflow")
    root, rows, tfds = tfds_dir
    data = tmp_path / "tfrecord"
    prepare(tfds, data, "cifar100", "3.0.2", {"image": tfds.features.Image(shape=(None, None, 3)),
                                              "label": tfds.features.ClassLabel(num_classes=100)},
            rows["cifar100"], file_format="tfrecord")
    report = build_vtab1k(tmp_path / "out", f"tfds:{data}", tasks=["cifar"])
    assert report.status == {"cifar": "built"}, report.problems
    label_of = {row["image"]: row["label"] for split in rows["cifar100"].values() for row in split}
    for rel, label in lines(tmp_path / "out" / "cifar" / "train800val200.txt"):
        assert label_of[(tmp_path / "out" / "cifar" / rel).read_bytes()] == label
