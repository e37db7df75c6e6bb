"""vptune data: VTAB-1k and FGVC folders built from small local sources in every supported layout
(folder, zip, tar.gz; CUB/NABirds lists, Flowers .mat, Stanford Dogs .mat, class folders, VPT
JSON), verified on rerun, resumed after a failure, and bad input named."""

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from datasets_fixtures import cub_source, dogs_source, flowers_source, image, imagefolder_source, vpt_json_source, vtab_source
from vptune.cli import app
from vptune.data import DataError, sources
from vptune.data import prepare
from vptune.data.prepare import MANIFEST, build_fgvc, build_vtab1k, sha256


@pytest.fixture(scope="module")
def vtab(tmp_path_factory) -> Path:
    return vtab_source(tmp_path_factory.mktemp("vtab-src"), tasks=("dtd", "eurosat"))


def zip_tree(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, Path(folder.name) / path.relative_to(folder))
    return archive


def test_vtab1k_from_a_folder_is_checked_recorded_and_read_back(vtab, tmp_path):
    report = build_vtab1k(tmp_path / "out", vtab, tasks=["dtd", "eurosat", "kitti"])
    assert report.ok and report.status == {"dtd": "built", "eurosat": "built", "kitti": "missing"}
    assert report.counts["dtd"] == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 30}
    assert any("dtd: test.txt lists 30 images; the VTAB-1k release has 1880" in n for n in report.notes)
    assert any(n.startswith("not in the source: kitti") for n in report.notes)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    for name in ("train800.txt", "val200.txt", "train800val200.txt", "test.txt"):
        assert manifest["tasks"]["dtd"]["sha256"][name] == sha256(tmp_path / "out" / "dtd" / name)
        assert (tmp_path / "out" / "dtd" / name).read_text() == (vtab / "dtd" / name).read_text()
    source = sources.vtab1k(tmp_path / "out" / "dtd")  # the reader the training uses
    assert (len(source.train), len(source.val), len(source.trainval), len(source.test)) == (800, 200, 1000, 30)
    assert source.train[5].path.read_bytes() == (vtab / "dtd" / "images/train800/000005.png").read_bytes()


def test_the_same_tree_as_a_zip_gives_the_same_lists_and_a_rerun_only_verifies(vtab, tmp_path):
    archive = zip_tree(vtab, tmp_path / "vtab-1k.zip")
    from_zip = build_vtab1k(tmp_path / "a", archive, tasks=["dtd"])
    from_dir = build_vtab1k(tmp_path / "b", vtab, tasks=["dtd"])
    assert from_zip.status == from_dir.status == {"dtd": "built"}
    digests = [json.loads((tmp_path / x / MANIFEST).read_text())["tasks"]["dtd"]["sha256"] for x in ("a", "b")]
    assert digests[0] == digests[1]

    image_file = tmp_path / "a" / "dtd" / "images" / "test" / "000003.png"
    stamp = image_file.stat().st_mtime_ns
    again = build_vtab1k(tmp_path / "a", archive, tasks=["dtd"])
    assert again.status == {"dtd": "verified"} and image_file.stat().st_mtime_ns == stamp


def test_a_built_task_that_changed_fails_verification_naming_the_file(vtab, tmp_path):
    out = tmp_path / "out"
    build_vtab1k(out, vtab, tasks=["dtd", "eurosat"])
    (out / "dtd" / "test.txt").write_text((out / "dtd" / "test.txt").read_text().replace(" 0\n", " 1\n", 1))
    image(out / "eurosat" / "images" / "stray.png", 0, 1)  # an extra image no list names
    report = build_vtab1k(out, vtab, tasks=["dtd", "eurosat"])
    assert not report.ok and report.status == {"dtd": "failed", "eurosat": "failed"}
    assert f"{out / 'dtd' / 'test.txt'} changed since it was built" in report.problems["dtd"][0]
    assert f"first {out / 'eurosat' / 'images' / 'stray.png'}" in report.problems["eurosat"][0]
    (out / "eurosat" / "images" / "stray.png").unlink()
    (out / "eurosat" / "images" / "val200" / "000007.png").unlink()
    report = build_vtab1k(out, vtab, tasks=["eurosat"])
    assert "1 listed image(s) missing, first" in report.problems["eurosat"][0]


def test_bad_sources_are_named_and_what_was_built_is_kept(vtab, tmp_path):
    broken = tmp_path / "src"
    shutil.copytree(vtab, broken)
    (broken / "eurosat" / "images" / "train800" / "000011.png").unlink()  # listed, not there
    out = tmp_path / "out"
    report = build_vtab1k(out, broken, tasks=["dtd", "eurosat"])
    assert report.status == {"dtd": "built", "eurosat": "failed"}
    assert report.problems["eurosat"] == [
        f"{broken / 'eurosat' / 'images/train800/000011.png'} is listed (train800.txt line 12) but not in the source"
    ]
    assert (out / "dtd" / "test.txt").is_file() and not (out / "eurosat" / "train800.txt").exists()
    shutil.copy(vtab / "eurosat" / "images" / "train800" / "000011.png", broken / "eurosat" / "images" / "train800")
    image(broken / "eurosat" / "images" / "test" / "unlisted.png", 1, 5)  # in the source, in no list: not copied
    report = build_vtab1k(out, broken, tasks=["dtd", "eurosat"])  # fixed: dtd is kept (verified), eurosat built
    assert report.status == {"dtd": "verified", "eurosat": "built"}
    assert f"eurosat: 1 image(s) in the source that no list names were not copied, first " \
           f"{broken / 'eurosat' / 'images/test/unlisted.png'}" in report.notes
    assert not (out / "eurosat" / "images" / "test" / "unlisted.png").exists()

    short = tmp_path / "short"
    shutil.copytree(vtab / "dtd", short / "dtd")
    lines = (short / "dtd" / "val200.txt").read_text().splitlines()
    (short / "dtd" / "val200.txt").write_text("\n".join(lines[:-1]) + "\n")
    report = build_vtab1k(tmp_path / "o2", short, tasks=["dtd"])
    assert report.problems["dtd"] == [f"{short / 'dtd' / 'val200.txt'} lists 199 images; VTAB-1k's val200.txt has 200"]
    (short / "dtd" / "val200.txt").write_text("\n".join(lines[:-1] + ["images/val200/000199.png 47"]) + "\n")
    report = build_vtab1k(tmp_path / "o2", short, tasks=["dtd"])
    assert report.problems["dtd"] == [f"{short / 'dtd' / 'val200.txt'}:200: label 47 is outside 0..46 (dtd has 47 classes)"]

    corrupt = tmp_path / "vtab-1k.zip"
    corrupt.write_bytes(zip_tree(vtab, tmp_path / "good.zip").read_bytes()[:5000])
    with pytest.raises(DataError, match=f"{corrupt}: not a readable zip or tar archive"):
        build_vtab1k(tmp_path / "o3", corrupt, tasks=["dtd"])


def test_a_killed_build_resumes_keeping_the_images_it_copied(vtab, tmp_path, monkeypatch):
    copy, copied = prepare.Tree.copy, []

    def dies_after_300(self, rel, dest):
        if len(copied) == 300:
            raise KeyboardInterrupt
        copy(self, rel, dest)
        copied.append(dest)

    monkeypatch.setattr(prepare.Tree, "copy", dies_after_300)
    with pytest.raises(KeyboardInterrupt):
        build_vtab1k(tmp_path / "out", vtab, tasks=["dtd"])
    assert not (tmp_path / "out" / "dtd" / "train800.txt").exists()  # lists are written last: no half task
    assert not list((tmp_path / "out" / "dtd").rglob("*.part"))
    stamps = {p: p.stat().st_mtime_ns for p in copied}
    monkeypatch.setattr(prepare.Tree, "copy", copy)
    assert build_vtab1k(tmp_path / "out", vtab, tasks=["dtd"]).status == {"dtd": "built"}
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())


def test_a_hub_copy_whose_layout_changed_is_refused(tmp_path, monkeypatch):
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("vtab/README.md", "moved to parquet")
    monkeypatch.setattr(prepare, "hub_download", lambda repo, filename: other)
    with pytest.raises(DataError, match="the hub copy XiN0919/VTAB-1k/vtab-1k.zip has no task folder with train800.txt"):
        build_vtab1k(tmp_path / "out", None, tasks=["dtd"])


@pytest.fixture(scope="module")
def fgvc_sources(tmp_path_factory) -> Path:
    """One folder with every FGVC layout: CUB's lists (folder), NABirds as VPT JSON (folder), Flowers' .mat
    files (folder), Stanford Dogs' .mat lists (tar.gz), Stanford Cars as class folders (zip)."""
    root = tmp_path_factory.mktemp("fgvc-src")
    cub_source(root / "CUB_200_2011")
    vpt_json_source(root / "nabirds")
    flowers_source(root / "oxford_flowers102")
    staging = tmp_path_factory.mktemp("staging")
    dogs_source(staging / "StanfordDogs")
    with tarfile.open(root / "stanford_dogs.tar.gz", "w:gz") as tar:
        tar.add(staging / "StanfordDogs", arcname="StanfordDogs")
    imagefolder_source(staging / "cars")
    zip_tree(staging / "cars", root / "stanford_cars.zip")
    return root


def test_fgvc_from_every_layout(fgvc_sources, tmp_path):
    out = tmp_path / "fgvc"
    report = build_fgvc(out, fgvc_sources)
    assert report.ok and set(report.status.values()) == {"built"}
    expected = {  # train, val, test; val cut from train where the layout has none
        "cub": (16, 4, 20), "nabirds": (9, 9, 9), "flowers": (6, 6, 6), "dogs": (3, 3, 6), "cars": (9, 3, 12),
    }
    for name, (train, val, test) in expected.items():
        source = sources.fgvc(out / name)  # the reader the training uses
        assert (len(source.train), len(source.val), len(source.test)) == (train, val, test), name
        assert {s.path for s in source.train}.isdisjoint({s.path for s in source.val}), name
        assert all(s.path.is_file() for s in source.train + source.val + source.test)
    cub = sources.fgvc(out / "cub")
    assert cub.num_classes == 4 and cub.class_names[0] == "001.Bird_1"
    # CUB: class ids 1-based in image_class_labels.txt -> labels 0..3, every other image a test image
    first_test = json.loads((out / "cub" / "test.json").read_text())
    assert first_test["002.Bird_2/Bird_2_0001.jpg"] == 1
    dogs = json.loads((out / "dogs" / "train.json").read_text()) | json.loads((out / "dogs" / "val.json").read_text())
    assert dogs == {"n00000-breed0/n00000_0.jpg": 0, "n00000-breed0/n00000_2.jpg": 0, "n00001-breed1/n00001_0.jpg": 1,
                    "n00001-breed1/n00001_2.jpg": 1, "n00002-breed2/n00002_0.jpg": 2, "n00002-breed2/n00002_2.jpg": 2}
    flowers = json.loads((out / "flowers" / "val.json").read_text())
    assert flowers == {"image_00003.jpg": 0, "image_00004.jpg": 0, "image_00009.jpg": 1, "image_00010.jpg": 1,
                       "image_00015.jpg": 2, "image_00016.jpg": 2}
    assert any(n.startswith("cub: the source has no val split") for n in report.notes)
    assert build_fgvc(out, fgvc_sources).status == {n: "verified" for n in expected}
    assert build_fgvc(tmp_path / "again", fgvc_sources, datasets=["cub"]).counts["cub"] == report.counts["cub"]


def test_fgvc_bad_input_is_named(fgvc_sources, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fgvc_sources / "CUB_200_2011", src / "CUB_200_2011")
    (src / "CUB_200_2011" / "images" / "003.Bird_3" / "Bird_3_0004.jpg").unlink()
    (src / "mystery").mkdir()
    report = build_fgvc(tmp_path / "out", sources={"cub": src / "CUB_200_2011", "cars": src / "mystery"})
    assert report.status == {"cub": "failed", "nabirds": "missing", "flowers": "missing", "dogs": "missing",
                             "cars": "failed"}
    assert report.problems["cub"] == [f"{src / 'CUB_200_2011' / 'images/003.Bird_3/Bird_3_0004.jpg'} is listed by the "
                                      "source's images.txt, train_test_split.txt, image_class_labels.txt but not there"]
    assert report.problems["cars"][0].startswith(f"{src / 'mystery'}: no FGVC layout recognised")
    with pytest.raises(DataError, match="unknown FGVC dataset.*aircraft"):
        build_fgvc(tmp_path / "out", datasets=["aircraft"])


def test_data_commands_print_the_report_and_fail_on_a_failed_task(vtab, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["data", "vtab1k", "--out", str(tmp_path / "v"), "--source", str(vtab), "--tasks", "dtd"])
    assert result.exit_code == 0, result.output
    assert "dtd" in result.output and "built" in result.output and "800" in result.output and "200" in result.output
    (tmp_path / "v" / "dtd" / "train800.txt").write_text("changed\n")
    result = runner.invoke(app, ["data", "vtab1k", "--out", str(tmp_path / "v"), "--source", str(vtab), "--tasks", "dtd"])
    assert result.exit_code == 1 and "changed since it was built" in result.output
