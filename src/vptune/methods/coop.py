"""CoOp (Zhou et al., 2022, "Learning to Prompt for Vision-Language Models"; docs/methods.md, "CoOp"):
the image side stays frozen and the prompt of the text side is learned. The method
itself adds nothing to the image walk; it asks for a CoOp head (``vptune.heads.CoOpHead``),
whose context vectors are its only tuned tensors. Any image-side method gets the same head with
``--text-prompts coop`` (prompts on both towers)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import Method, MethodConfig, register


@register("coop")
@dataclasses.dataclass
class CoOpConfig(MethodConfig):
    n_ctx: int = 16
    class_specific: bool = False
    ctx_init: str | None = None  # words whose embeddings start the context ("a photo of a"); None: N(0, 0.02)

    def __post_init__(self) -> None:
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {self.n_ctx}")

    def method_name(self) -> str:
        return "coop"

    def build(self, family) -> Method:
        if not hasattr(family, "encode_embedded"):
            raise ValueError("coop learns the prompt of a text tower: it needs a CLIP backbone "
                             "(open_clip:NAME/TAG or vptune_clip_fmnist)")
        return Method()

    def text_prompts(self) -> dict[str, Any]:
        """The head this method trains (``HeadConfig`` fields)."""
        return {"kind": "coop", "n_ctx": self.n_ctx, "class_specific": self.class_specific, "ctx_init": self.ctx_init}
