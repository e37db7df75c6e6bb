"""The bundled ViLT, ``vptune_vilt_fmnist``: a transformers ``ViltModel`` small enough for a CPU,
reading the canvases' word tokenizer (``vptune.data.tokenizer``, 114 words, 48 tokens) and
32x32 canvases, shipped so that the vision-language tasks (``minivl:*``) run with no download
(``weights/VILT_MODEL_CARD.md``).

As ViLT starts from a ViT, its transformer starts from the bundled ViT's weights
(``init_from_vit``: the first ``num_hidden_layers`` blocks re-laid out exactly, patch size 4,
d=192, 3 heads); the text embeddings, token types and pooler are new. ViLT normalises pixels
with mean and std 0.5; the bundled ViT's own normalisation is folded into the patch
projection, so the copy computes the same patch features from ViLT's input. Pretrained by
``vptune pretrain --arch vilt`` (``pretrain_vilt.py``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .bundled import MEAN, STD

BUNDLED_VILT = "vptune_vilt_fmnist"
TEXT_LENGTH = 48  # the word tokenizer's max_length
LAYERS = 4  # of the bundled ViT's 6 blocks: a CPU budget


def vilt_config(vocab_size: int):
    """transformers' ``ViltConfig`` of the bundled ViLT."""
    from transformers import ViltConfig

    return ViltConfig(
        hidden_size=192, num_hidden_layers=LAYERS, num_attention_heads=3, intermediate_size=768, hidden_act="gelu",
        image_size=32, patch_size=4, num_channels=3, max_image_length=-1, vocab_size=vocab_size,
        max_position_embeddings=TEXT_LENGTH, modality_type_vocab_size=2, layer_norm_eps=1e-6, qkv_bias=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def bundled_vilt_weights_path() -> Path:
    return Path(str(resources.files("vptune") / "weights" / f"{BUNDLED_VILT}.safetensors"))


def build_bundled_vilt() -> nn.Module:
    """The bundled ViLT with random weights (no pretrained tensors), in eval mode."""
    from ..extras import require

    require("vl", "transformers", purpose=f"the bundled ViLT {BUNDLED_VILT}")
    from transformers import ViltModel

    from ..data.tokenizer import WordTokenizer

    return ViltModel(vilt_config(len(WordTokenizer.from_file()))).eval()


def load_bundled_vilt(weights: str | Path | None = None) -> nn.Module:
    """The bundled ViLT with its shipped weights (or ``weights``: a safetensors file of it)."""
    from .vilt import load_vilt_state

    model = build_bundled_vilt()
    path = Path(weights) if weights is not None else bundled_vilt_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"the bundled ViLT's weights are missing ({path}). Create them with "
                                "`vptune pretrain --arch vilt`, or pass another backbone")
    load_vilt_state(model, path)
    return model.eval()


@torch.no_grad()
def init_from_vit(vilt: nn.Module, vit: nn.Module) -> None:
    """Copy the first blocks of a timm ViT of the same width and patch (the bundled ViT) into
    ``vilt``: patch projection, class token, position embedding, blocks and final norm. The ViT
    reads ``(x - MEAN) / STD``, ViLT gives ``(x - 0.5) / 0.5``; since the patch projection is
    linear with no overlap, ``W ((x' 0.5 + 0.5 - m) / s) + b`` is folded into its weight and bias."""
    embeddings = vilt.embeddings
    proj, theirs = embeddings.patch_embeddings.projection, vit.patch_embed.proj
    scale = torch.tensor([0.5 / s for s in STD], dtype=theirs.weight.dtype)  # per input channel
    shift = torch.tensor([(0.5 - m) / s for m, s in zip(MEAN, STD)], dtype=theirs.weight.dtype)
    proj.weight.copy_(theirs.weight * scale[None, :, None, None])
    proj.bias.copy_(theirs.bias + (theirs.weight * shift[None, :, None, None]).sum(dim=(1, 2, 3)))
    embeddings.cls_token.copy_(vit.cls_token)
    embeddings.position_embeddings.copy_(vit.pos_embed)
    d = vit.embed_dim
    for ours, block in zip(vilt.encoder.layer, vit.blocks):
        attention = ours.attention.attention
        qkv_w, qkv_b = block.attn.qkv.weight, block.attn.qkv.bias
        for i, linear in enumerate((attention.query, attention.key, attention.value)):
            linear.weight.copy_(qkv_w[i * d:(i + 1) * d])
            linear.bias.copy_(qkv_b[i * d:(i + 1) * d])
        ours.attention.output.dense.load_state_dict(block.attn.proj.state_dict())
        ours.layernorm_before.load_state_dict(block.norm1.state_dict())
        ours.layernorm_after.load_state_dict(block.norm2.state_dict())
        ours.intermediate.dense.load_state_dict(block.mlp.fc1.state_dict())
        ours.output.dense.load_state_dict(block.mlp.fc2.state_dict())
    vilt.layernorm.load_state_dict(vit.norm.state_dict())
