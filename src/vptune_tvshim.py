"""Let torchvision import under a CPU-only torch, whoever imports it first.

The only torchvision 0.28.0 wheel is a CUDA build; under the CPU build of torch 2.13 its
compiled operators cannot load and ``import torchvision`` (and so ``import timm``) fails with
"operator torchvision::nms does not exist". Declaring the two missing operator schemas
before torchvision is imported is enough for everything vptune uses (models, transforms);
only torchvision's compiled ops (nms, image decoding) stay unavailable, so images are
decoded with PIL. Where torchvision's ops load normally this does nothing.

``make setup`` drops a one-line ``.pth`` file into the environment that calls
``install()``, so the fix applies even to ``import timm`` before ``import vptune``; the hook
costs nothing until torchvision is first imported.
"""

import importlib.abc
import sys

_library = None  # must stay alive for the schemas to remain registered


def register_missing_ops() -> None:
    global _library
    import torch

    if _library is not None:
        return
    try:
        torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):
        _library = torch.library.Library("torchvision", "DEF")
        _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            register_missing_ops()
        return None  # the normal finders import it


def install() -> None:
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
