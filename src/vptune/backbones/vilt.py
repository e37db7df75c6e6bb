"""The transformers ``ViltModel`` family (ViLT: one transformer over text tokens and image
patches; docs/families.md, "ViLT").

The walk re-composes transformers' own submodules: ``ViltEmbeddings`` (BERT-style text
embeddings, ``visual_embed`` for the patches, the modality token types) and every
``ViltLayer`` (``layernorm_before`` -> self-attention (``query``/``key``/``value``, dropout)
-> ``output.dense`` -> dropout -> residual; ``layernorm_after`` -> ``intermediate`` ->
``output``), its self-attention through ``vptune.attention.attend`` by a small view that
gives it the names ``attend`` reads. The text padding mask becomes a key bias, zero for
prompt tokens and extra keys. Pooling is ViLT's: the final LayerNorm, then
``tanh(dense(x[:, 0]))`` on the text's [CLS] token.

Inputs are a batch dict: ``pixel_values`` (or ``image``) (B, 3, H, W), optional
``pixel_mask`` (B, H, W), ``input_ids``, ``attention_mask``, optional ``token_type_ids`` and
``image_token_type_idx`` (1; 2 for NLVR's second image, as ViLT does). The sequence is
``[text (T), image [CLS], patches]``. Patches are always the full grid in row-major order:
``visual_embed`` draws a random permutation (or a random subset when the model's
``max_image_length`` is below the number of patches, ViLT's pretraining trick); we ask it for
every patch, in a forked RNG, and put them back in grid order, so a forward is deterministic.

transformers is imported only when a ViLT model is built or loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import attend, prompt_keys_values
from .family import AttentionSite, SequenceFamily, register_family

MODULE = "transformers.models.vilt.modeling_vilt"
HF_PREFIX = "hf:"


class BertAttentionView:
    """A BERT-style attention of transformers (ViLT's ``ViltAttention``: ``self_attention`` =
    ``.attention``; BERT's ``BertAttention`` in METER: ``.self``) under the names
    ``vptune.attention.attend`` reads (``q_proj``, ``k_proj``, ``v_proj``, ``attn_drop``, ``proj``,
    ``num_heads``, ``head_dim``). Its ``proj_drop`` is the identity: the walk applies the sublayer's
    dropout itself, after the attention-output hook (APT sits between ``output.dense`` and that dropout)."""

    proj_drop = nn.Identity()

    def __init__(self, self_attention: nn.Module, output: nn.Module) -> None:
        self._inner = self_attention
        self.q_proj, self.k_proj, self.v_proj = self_attention.query, self_attention.key, self_attention.value
        self.attn_drop = self_attention.dropout
        self.proj = output.dense
        self.num_heads, self.head_dim = self_attention.num_attention_heads, self_attention.attention_head_size

    @property
    def training(self) -> bool:
        return self._inner.training


@register_family
class ViltFamily(SequenceFamily):
    name = "vilt"
    model_class = "transformers ViltModel"
    add_location = False  # the sequence length follows the text length
    # The official APT code trains these with every method on ViLT (docs/methods.md, "Vision-language models").
    also_tuned = ("pooler", "embeddings.token_type_embeddings")
    backbone_train_mode = True  # the official recipe fine-tunes with ViLT's own dropout active
    reads_text = True
    head_prefixes = ()
    final_prefixes = ("layernorm.", "pooler.")

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        module = sys.modules.get(MODULE)
        return module is not None and isinstance(model, module.ViltModel)

    def check(self) -> None:
        from transformers.models.vilt import modeling_vilt as hf

        if self.model.pooler is None:
            raise TypeError("this ViltModel has no pooler (add_pooling_layer=False): vptune pools with ViLT's own pooler")
        for i, layer in enumerate(self.blocks):
            parts = ((layer, hf.ViltLayer), (layer.attention, hf.ViltAttention), (layer.attention.attention, hf.ViltSelfAttention),
                     (layer.attention.output, hf.ViltSelfOutput))
            for module, kind in parts:
                if type(module).forward is not kind.forward:
                    raise TypeError(f"layer {i} of the ViltModel has a {type(module).__name__} whose forward is not "
                                    f"transformers' {kind.__name__}.forward: vptune re-composes only those")

    # --- description ----------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layer

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # the text's [CLS]: prompts go right after it (no position inside a block, so the place is immaterial)

    def block_prefixes(self) -> list[str]:
        return [f"encoder.layer.{i}." for i in range(len(self.blocks))]

    def lora_pattern(self, targets: tuple[str, ...]) -> str:
        names = {"qkv": r"attention\.(query|key|value)", "proj": r"output\.dense"}
        return rf"encoder\.layer\.\d+\.attention\.({'|'.join(names[t] for t in targets)})"

    @property
    def sites(self) -> list[AttentionSite]:
        return [AttentionSite(self.config.hidden_size, self.config.num_attention_heads,
                              self.config.hidden_size // self.config.num_attention_heads,
                              attention_dropout=self.config.attention_probs_dropout_prob) for _ in self.blocks]

    @property
    def num_features(self) -> int:
        return self.config.hidden_size

    @property
    def patch_projection(self) -> nn.Conv2d:
        return self.model.embeddings.patch_embeddings.projection

    @property
    def prompt_fan_in(self) -> int:
        proj = self.patch_projection
        return proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]

    def input_size(self) -> tuple[int, int, int]:
        return (self.config.num_channels, self.config.image_size, self.config.image_size)

    def text_length(self) -> int:
        return self.config.max_position_embeddings

    def example_inputs(self, device: torch.device | str = "cpu", batch: int = 1) -> dict[str, Tensor]:
        """A full-size image with a text of the model's full length (ViLT-B/32: 384x384, 40 tokens)."""
        ids = torch.ones(batch, self.text_length(), dtype=torch.long, device=device)
        return {"image": torch.zeros(batch, *self.input_size(), device=device), "input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def data_config(self) -> dict[str, Any]:
        """ViLT's preprocessing: mean and std 0.5, bicubic resize."""
        return {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic"}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "architecture": "vilt",  # not the checkpoint path: the same weights load from the hub or a folder
            "patch_size": self.config.patch_size,
            "vocab_size": self.config.vocab_size,
            "num_prefix_tokens": 1,
            "global_pool": "token",
        }

    def fingerprint(self) -> str:
        import hashlib

        weight = self.patch_projection.weight.detach().float().cpu().contiguous()
        return hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]

    # --- modules a run may hold its own copy of --------------------------------------------
    def module(self, path: str) -> nn.Module:
        """The backbone's submodule ``path``, or the run's own trained copy of it (``also_tuned``)."""
        own = self.overrides.get(path)
        return own if own is not None else self.model.get_submodule(path)

    def adapt_copies(self, copies: dict[str, nn.Module], task: Any) -> dict[str, nn.Module]:
        """For a task with two images (NLVR), a third token type for the second image, started
        from the image's (ViLT's NLVR2 recipe)."""
        types = copies.get("embeddings.token_type_embeddings")
        if types is not None and "image1" in getattr(task, "fields", ()) and types.num_embeddings < 3:
            grown = nn.Embedding(3, types.embedding_dim).to(types.weight)
            with torch.no_grad():
                grown.weight[: types.num_embeddings] = types.weight
                grown.weight[types.num_embeddings :] = types.weight[-1]
            copies["embeddings.token_type_embeddings"] = grown
        return copies

    # --- the walk ---------------------------------------------------------------------------
    def embed(self, inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Tokens ``[text, image CLS, patches]`` (B, N, d) and the key padding bias (B, N):
        0 for a token, -inf for text padding (and padded image area)."""
        if isinstance(inputs, Tensor):
            raise TypeError("a ViLT backbone needs text with the image: pass a dict with pixel_values (or image), "
                            "input_ids and attention_mask")
        pixels = inputs.get("pixel_values", inputs.get("image"))
        if pixels is None:
            raise ValueError("ViLT input has no image: pass pixel_values (or image), (B, 3, H, W)")
        if "input_ids" not in inputs:
            raise ValueError("ViLT input has no text: pass input_ids and attention_mask")
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        if ids.shape[1] > self.text_length():
            raise ValueError(f"text of {ids.shape[1]} tokens, but this ViLT embeds at most {self.text_length()} "
                             "(max_position_embeddings): tokenize with max_length at most that")
        if pixels.shape[0] != ids.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {ids.shape[0]} texts: ViLT pairs one image with one text")
        pixel_mask = inputs.get("pixel_mask")
        if pixel_mask is None:
            pixel_mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.long, device=pixels.device)
        embeddings = self.model.embeddings
        text = embeddings.text_embeddings(input_ids=ids, token_type_ids=inputs.get("token_type_ids"))
        with torch.random.fork_rng(devices=[]):  # visual_embed permutes the patches at random
            image, image_mask, (patch_index, _) = embeddings.visual_embed(pixels, pixel_mask, max_image_length=-1)
        image, image_mask = self._grid_order(image, image_mask, patch_index, pixels.shape[-1] // self.config.patch_size)
        types = self.module("embeddings.token_type_embeddings")
        index = min(int(inputs.get("image_token_type_idx", 1)), types.num_embeddings - 1)
        text = text + types(torch.zeros_like(ids))
        image = image + types(torch.full_like(image_mask, index))
        x = torch.cat([text, image], dim=1)  # B, T + 1 + n, d
        keep = torch.cat([mask, image_mask], dim=1).bool()
        bias = torch.zeros(keep.shape, dtype=torch.float32, device=x.device).masked_fill(~keep, float("-inf"))
        return x, bias

    @staticmethod
    def _grid_order(image: Tensor, image_mask: Tensor, patch_index: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """Patches back in row-major grid order (valid ones first), the image [CLS] first."""
        rank = patch_index[..., 0] * width + patch_index[..., 1]  # B, n
        rank = rank + (1 - image_mask[:, 1:]) * rank.new_tensor(10**9)  # padded area last
        order = rank.argsort(dim=1) + 1
        order = torch.cat([order.new_zeros(order.shape[0], 1), order], dim=1)
        return image.gather(1, order[..., None].expand_as(image)), image_mask.gather(1, order)

    def key_padding(self, aux: Tensor, prompts: int, extra: int) -> Tensor:
        """The padding bias (B, 1, 1, N + prompts + extra): zero for prompts (after the [CLS]) and extra keys."""
        if prompts:
            aux = torch.cat([aux[:, :1], aux.new_zeros(aux.shape[0], prompts), aux[:, 1:]], dim=1)
        if extra:
            aux = F.pad(aux, (0, extra))
        return aux[:, None, None, :]

    def block_forward(self, index, x, aux, extra_k, extra_v, bias, hook, queries, prompts) -> Tensor:
        layer = self.blocks[index]
        mask = self.key_padding(aux, prompts, 0 if extra_k is None else extra_k.shape[2])
        if bias is not None:
            mask = mask + bias
        u = layer.layernorm_before(x)
        a = attend(BertAttentionView(layer.attention.attention, layer.attention.output), u, extra_k, extra_v, mask, queries)  # dense(attention), no dropout
        if queries is not None:
            u, x = u[:, :queries], x[:, :queries]
        if hook is not None:
            a = hook(u, a)
        x = x + layer.attention.output.dropout(a)
        return layer.output(layer.intermediate(layer.layernorm_after(x)), x)

    def prompt_keys_values(self, index: int, prompts: Tensor) -> tuple[Tensor, Tensor]:
        layer = self.blocks[index]
        return prompt_keys_values(BertAttentionView(layer.attention.attention, layer.attention.output), layer.layernorm_before(prompts))

    def pooled_outputs(self) -> int | None:
        return 1

    def pooled_features(self, x: Tensor) -> Tensor:
        """ViLT's pooled output: final LayerNorm, then the pooler on the text [CLS] token."""
        return self.module("pooler")(self.model.layernorm(x[:, :1]))


# --- loading -------------------------------------------------------------------------------

def is_vilt_spec(spec: str) -> bool:
    return spec.startswith(HF_PREFIX)


def load_vilt(spec: str, weights: str | Path | None = None, pretrained: bool = False) -> nn.Module:
    """``hf:NAME`` as a ``ViltModel``: transformers' download with ``pretrained`` (online), or
    ``weights``: a local folder in transformers' ``save_pretrained`` layout, or a safetensors
    file of a ViltModel (or ViltFor* model: its ``vilt.`` prefix is dropped) on NAME's config."""
    from ..extras import require

    require("vl", "transformers", purpose=f"the ViLT backbone {spec}")
    from transformers import ViltConfig, ViltModel

    name = spec[len(HF_PREFIX):]
    if weights is not None and Path(weights).is_dir():
        return ViltModel.from_pretrained(str(weights)).eval()
    if weights is None and not pretrained:
        raise ValueError(f"{spec}: random weights need a config: pass --pretrained (online) or --weights FOLDER|FILE")
    try:
        if weights is None:
            return ViltModel.from_pretrained(name).eval()
        config = ViltConfig.from_pretrained(name)
    except OSError as error:
        raise ConnectionError(
            f"could not fetch {name!r} from the Hugging Face hub ({error}). Offline, save it elsewhere with "
            "save_pretrained and pass the folder with --weights FOLDER"
        ) from error
    model = ViltModel(config)
    load_vilt_state(model, Path(weights))
    return model.eval()


def load_vilt_state(model: nn.Module, path: Path) -> None:
    """A safetensors file into ``model``: every backbone tensor must be there and fit. A file
    that also holds an image-text-matching head (``itm.weight``, ``itm.bias``: Linear(d, 2),
    class 1 = match) leaves it on the model as ``itm_head_state``, for the retrieval head."""
    from safetensors.torch import load_file

    from .loading import load_state

    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: a ViLT weights file must be .safetensors (or pass a save_pretrained folder)")
    state = load_file(str(path))
    if {"itm.weight", "itm.bias"} <= set(state):  # a pretrained image-text-matching head (the bundled ViLT's)
        model.itm_head_state = {"weight": state["itm.weight"], "bias": state["itm.bias"]}  # not a backbone tensor
    if any(k.startswith("vilt.") for k in state):
        state = {k.removeprefix("vilt."): v for k, v in state.items() if k.startswith("vilt.")}
    load_state(model, state, source=str(path))
