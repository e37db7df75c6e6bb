"""What the VTAB-1k and FGVC benchmarks consist of: task names, groups, class counts and split
sizes, and the public copies they can be built from (docs/data.md lists them with their source).

The figures are the benchmark's definition: every VTAB-1k task has 800 train, 200 val and the
union of both as train800val200 (1000); the test sizes are those of the extracted list-file
release most later work uses (VPT's TFDS versions). FGVC split sizes are VPT's (train/val cut
from the official train set; official test set). ``vptune data`` checks built folders
against them; ``vptune benchmark`` reports a task's group from them.
"""

from __future__ import annotations

from dataclasses import dataclass

VTAB_LISTS = {"train800.txt": 800, "val200.txt": 200, "train800val200.txt": 1000}
VTAB_TEST = "test.txt"


@dataclass(frozen=True)
class VtabTask:
    name: str  # folder name in the list-file layout
    group: str  # natural | specialized | structured
    num_classes: int
    test: int  # test.txt lines in the list-file release
    tfds: str  # TFDS dataset and version VPT used


VTAB_TASKS: dict[str, VtabTask] = {t.name: t for t in (
    VtabTask("cifar", "natural", 100, 10000, "cifar100:3.0.2"),
    VtabTask("caltech101", "natural", 102, 6085, "caltech101:3.0.1"),
    VtabTask("dtd", "natural", 47, 1880, "dtd:3.0.1"),
    VtabTask("oxford_flowers102", "natural", 102, 6149, "oxford_flowers102:2.1.1"),
    VtabTask("oxford_iiit_pet", "natural", 37, 3669, "oxford_iiit_pet:3.2.0"),
    VtabTask("svhn", "natural", 10, 26032, "svhn_cropped:3.0.0"),
    VtabTask("sun397", "natural", 397, 21750, "sun397/tfds:4.0.0"),
    VtabTask("patch_camelyon", "specialized", 2, 32768, "patch_camelyon:2.0.0"),
    VtabTask("eurosat", "specialized", 10, 5400, "eurosat/rgb:2.0.0"),
    VtabTask("resisc45", "specialized", 45, 6300, "resisc45:3.0.0"),
    VtabTask("diabetic_retinopathy", "specialized", 5, 42670, "diabetic_retinopathy_detection/btgraham-300:3.0.0"),
    VtabTask("clevr_count", "structured", 8, 15000, "clevr:3.1.0"),
    VtabTask("clevr_dist", "structured", 6, 15000, "clevr:3.1.0"),
    VtabTask("dmlab", "structured", 6, 22735, "dmlab:2.0.1"),
    VtabTask("kitti", "structured", 4, 711, "kitti:3.2.0"),
    VtabTask("dsprites_loc", "structured", 16, 73728, "dsprites:2.0.0"),
    VtabTask("dsprites_ori", "structured", 16, 73728, "dsprites:2.0.0"),
    VtabTask("smallnorb_azi", "structured", 18, 12150, "smallnorb:2.0.0"),
    VtabTask("smallnorb_ele", "structured", 9, 12150, "smallnorb:2.0.0"),
)}


@dataclass(frozen=True)
class FgvcDataset:
    name: str  # folder name under the FGVC root
    title: str
    num_classes: int
    train: int  # VPT's split of the official train set
    val: int
    test: int
    aliases: tuple[str, ...]  # folder or archive names it is recognised by in --source
    hub: str | None  # a Hugging Face dataset with image and label columns (None: not on the hub)


FGVC_DATASETS: dict[str, FgvcDataset] = {d.name: d for d in (
    FgvcDataset("cub", "CUB-200-2011", 200, 5394, 600, 5794, ("cub", "cub2002011", "cub200"),
                "bentrevett/caltech-ucsd-birds-200-2011"),
    FgvcDataset("nabirds", "NABirds", 555, 21536, 2393, 24633, ("nabirds",), None),
    FgvcDataset("flowers", "Oxford Flowers", 102, 1020, 1020, 6149,
                ("flowers", "oxfordflower", "oxfordflowers", "flowers102", "oxfordflowers102", "102flowers"),
                "dpdl-benchmark/oxford_flowers102"),
    FgvcDataset("dogs", "Stanford Dogs", 120, 10800, 1200, 8580, ("dogs", "stanforddogs"), "Donghyun99/Stanford-Dogs"),
    FgvcDataset("cars", "Stanford Cars", 196, 7329, 815, 8041, ("cars", "stanfordcars"), "tanganke/stanford_cars"),
)}

# The VTAB-1k list-file release (the 19 task folders with train800/val200/train800val200/test
# lists and their images) as one zip on the Hugging Face hub; the same archive as the Google
# Drive file most VTAB-1k code downloads with gdown (id below).
VTAB_HUB_REPO = "XiN0919/VTAB-1k"
VTAB_HUB_FILE = "vtab-1k.zip"
VTAB_GDRIVE_ID = "1yZKwiKdsBzTfBgnStRveYMokc7GMMd5p"


def vtab_group(name: str) -> str | None:
    task = VTAB_TASKS.get(name)
    return None if task is None else task.group
