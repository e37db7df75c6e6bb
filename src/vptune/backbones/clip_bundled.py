"""The bundled CLIP, ``vptune_clip_fmnist``: an open_clip ``CLIP`` small enough for a CPU, with
the word tokenizer of the captioned canvases (``vptune.data.tokenizer``), shipped so that text
heads, zero-shot classification and CoOp run with no download (``weights/CLIP_MODEL_CARD.md``).

Its image tower has the bundled ViT's shape (32 px, patch 4, d=192, 6 blocks, 3 heads) and is
initialised from the bundled ViT's weights (``init_from_vit``: an exact re-layout, the patch
bias folded into the position embedding of the patch tokens); the text tower is new. Both are
trained contrastively by ``vptune pretrain --arch clip`` (``pretrain_clip.py``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn

from .bundled import MEAN, STD

BUNDLED_CLIP = "vptune_clip_fmnist"
EMBED_DIM = 128
CONTEXT_LENGTH = 48  # the word tokenizer's max_length: the longest caption is 47 tokens


def clip_config(vocab_size: int, eos_id: int, pad_id: int) -> dict:
    """open_clip's model config of the bundled CLIP (``open_clip.CLIP(**clip_config(...))``)."""
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 192, "layers": 6, "head_width": 64,
                       "mlp_ratio": 4.0, "no_ln_pre": True, "norm_kwargs": {"eps": 1e-6}},
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": vocab_size, "width": 128, "heads": 4,
                     "layers": 3, "pool_type": "eos", "eos_id": eos_id, "pad_id": pad_id},
    }


class CLIPWordTokenizer:
    """The canvases' word tokenizer with open_clip's calling convention: texts -> ids (B, 48)."""

    def __init__(self, context_length: int = CONTEXT_LENGTH) -> None:
        from ..data.tokenizer import WordTokenizer

        self.words = WordTokenizer.from_file()
        self.context_length = context_length

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.words(texts, max_length=context_length or self.context_length, truncation=True,
                          return_tensors="pt")["input_ids"]


def bundled_clip_weights_path() -> Path:
    return Path(str(resources.files("vptune") / "weights" / f"{BUNDLED_CLIP}.safetensors"))


def build_bundled_clip() -> nn.Module:
    """The bundled CLIP with random weights, its tokenizer and data config attached."""
    import open_clip

    from .openclip import describe_model

    tokenizer = CLIPWordTokenizer()
    words = tokenizer.words
    model = open_clip.CLIP(**clip_config(len(words), words.sep_token_id, words.pad_token_id))
    model.tokenizer = tokenizer
    model.zero_shot_templates = ("{}",)  # class texts are written in the captions' own words
    describe_model(model, BUNDLED_CLIP)
    model.pretrained_cfg.update(mean=MEAN, std=STD)
    return model


def load_bundled_clip(weights: str | Path | None = None) -> nn.Module:
    """The bundled CLIP with its shipped weights (or ``weights``)."""
    from .openclip import load_open_clip_weights

    model = build_bundled_clip()
    path = Path(weights) if weights is not None else bundled_clip_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled CLIP's weights are missing ({path}). Create them with `vptune pretrain --arch clip`, "
            "or pass another backbone"
        )
    load_open_clip_weights(model, path)
    return model.eval()


@torch.no_grad()
def init_from_vit(clip: nn.Module, vit: nn.Module) -> None:
    """Copy a timm ViT of the same shape (the bundled one) into ``clip.visual``: the same function,
    re-laid out (open_clip's ``conv1`` has no bias, so the patch bias joins the position embedding
    of the patch tokens, which is exact)."""
    visual = clip.visual
    visual.conv1.weight.copy_(vit.patch_embed.proj.weight)
    visual.class_embedding.copy_(vit.cls_token.reshape(-1))
    position = vit.pos_embed[0].clone()
    position[1:] += vit.patch_embed.proj.bias
    visual.positional_embedding.copy_(position)
    for ours, theirs in zip(visual.transformer.resblocks, vit.blocks):
        ours.ln_1.load_state_dict(theirs.norm1.state_dict())
        ours.attn.in_proj_weight.copy_(theirs.attn.qkv.weight)
        ours.attn.in_proj_bias.copy_(theirs.attn.qkv.bias)
        ours.attn.out_proj.load_state_dict(theirs.attn.proj.state_dict())
        ours.ln_2.load_state_dict(theirs.norm2.state_dict())
        ours.mlp.c_fc.load_state_dict(theirs.mlp.fc1.state_dict())
        ours.mlp.c_proj.load_state_dict(theirs.mlp.fc2.state_dict())
    visual.ln_post.load_state_dict(vit.norm.state_dict())
