"""METER (Dou et al., CVPR 2022), the two-stream vision-language model of APT's headline result,
composed from library parts, and its family (docs/families.md, "METER").

``MeterModel`` is METER's ``METERTransformerSS`` without its task heads, under the official
parameter names (so that an official checkpoint loads through a short, documented mapping):

- ``vit_model``: an open_clip ``VisionTransformer`` (OpenAI CLIP's layout and QuickGELU; METER
  drops CLIP's last block and keeps every token after ``ln_post``, no projection);
- ``text_transformer``: transformers' ``RobertaModel`` (or, for the bundled METER, the bundled
  CLIP's text tower, ``ClipTextEncoder``): its last hidden states;
- ``cross_modal_text_transform`` / ``cross_modal_image_transform`` (Linear into the fusion
  width), ``token_type_embeddings`` (0: text, 1: image, 2: NLVR's second image);
- ``cross_modal_text_layers`` / ``cross_modal_image_layers``: ``FusionLayer``, METER's
  ``BertCrossLayer``, which is transformers' own ``BertAttention`` (self-attention),
  ``BertAttention(is_cross_attention=True)`` (to the other stream), ``BertIntermediate`` and
  ``BertOutput``, each post-LN;
- ``cross_modal_text_pooler`` / ``cross_modal_image_pooler``: transformers' ``BertPooler``
  (tanh(dense(first token))); the pooled feature is both concatenated (2 x hidden).

``MeterFamily`` walks the fusion layers (the encoders are frozen and untouched): its 24 (4 per
fusion depth) attention sites are, for layer i, 4i text self-attention, 4i+1 text cross-attention,
4i+2 image self-attention, 4i+3 image cross-attention (kind "cross"). At every site it calls the
method's hooks: deep prompts (``prompts``) and key-value prompts (``kv_prompts``) join the site's
keys and values (at a cross site: those of the other stream; prompts never flow on), either on the
exact key-value path (projected alone and, at inference, cached) or literally (concatenated to the
sequence keys and values are computed from, as the official deep-prompt baseline does); the
``attention_output`` hook (APT) rewrites the attention-output sublayer between ``dense`` and its
dropout, with ``u`` the sublayer's input, as the official APT code places it.

transformers and open_clip are imported only when a METER is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as recompute

from ..attention import attend, prompt_keys_values
from ..methods.base import Method
from .family import AttentionSite, Family, cached_prompt_keys_values, register_family
from .vilt import BertAttentionView

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation, which METER uses
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass
class MeterConfig:
    """The fusion part's shape and what the inputs must be (JSON values, recorded with the model)."""

    name: str = "meter"
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    num_layers: int = 6  # fusion layers per stream
    image_width: int = 768  # width of the image encoder's tokens
    text_width: int = 768  # width of the text encoder's tokens
    image_size: int = 288
    patch_size: int = 16
    max_text_len: int = 40
    drop_rate: float = 0.1
    layer_norm_eps: float = 1e-12
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def bert_config(self):
        """transformers' ``BertConfig`` of the fusion layers (METER builds them from RoBERTa's)."""
        from transformers import BertConfig

        config = BertConfig(hidden_size=self.hidden_size, num_attention_heads=self.num_heads,
                            intermediate_size=self.intermediate_size, hidden_dropout_prob=self.drop_rate,
                            attention_probs_dropout_prob=self.drop_rate, layer_norm_eps=self.layer_norm_eps)
        config._attn_implementation = "eager"  # the reference forward (tests); the walk uses vptune.attention
        return config


class FusionLayer(nn.Module):
    """METER's ``BertCrossLayer`` from transformers' own BERT modules (post-LN sublayers)."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.bert import modeling_bert as bert

        self.attention = bert.BertAttention(config)
        self.crossattention = bert.BertAttention(config, is_cross_attention=True)
        self.intermediate = bert.BertIntermediate(config)
        self.output = bert.BertOutput(config)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        """transformers' own forwards (additive masks (B, 1, 1, N|M)): the reference the walk must equal."""
        h = self.attention(x, attention_mask=mask)[0]
        h = self.crossattention(h, encoder_hidden_states=context, encoder_attention_mask=context_mask, attention_mask=context_mask)[0]
        return self.output(self.intermediate(h), h)


class ClipTextEncoder(nn.Module):
    """An open_clip CLIP's text tower as a token encoder: word and position embeddings, its
    transformer (causal mask) and ``ln_final``, every token's state (no pooling, no projection)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        n = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:n]
        mask = None if self.attn_mask is None else self.attn_mask[:n, :n]
        return self.ln_final(self.transformer(x, attn_mask=mask))


class MeterModel(nn.Module):
    """METER without task heads, under the official parameter names (module docstring)."""

    def __init__(self, vit_model: nn.Module, text_transformer: nn.Module, config: MeterConfig) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertPooler

        bert = config.bert_config()
        self.meter_config = config
        self.vit_model = vit_model
        self.text_transformer = text_transformer
        self.cross_modal_text_transform = nn.Linear(config.text_width, config.hidden_size)
        self.cross_modal_image_transform = nn.Linear(config.image_width, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(2, config.hidden_size)
        self.cross_modal_image_layers = nn.ModuleList(FusionLayer(bert) for _ in range(config.num_layers))
        self.cross_modal_text_layers = nn.ModuleList(FusionLayer(bert) for _ in range(config.num_layers))
        self.cross_modal_image_pooler = BertPooler(bert)
        self.cross_modal_text_pooler = BertPooler(bert)
        for name, module in self.named_children():
            if name not in ("vit_model", "text_transformer"):
                module.apply(init_weights)
        self.pretrained_cfg = {"architecture": config.name, "mean": config.mean, "std": config.std}

    def text_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The frozen text encoder's last hidden states (B, T, text_width)."""
        out = self.text_transformer(input_ids=input_ids, attention_mask=attention_mask)
        return getattr(out, "last_hidden_state", out)

    def image_states(self, pixels: Tensor) -> Tensor:
        """The frozen image encoder's tokens (B, 1 + patches, image_width): CLS, patches, after ``ln_post``."""
        visual = self.vit_model
        return visual.ln_post(visual.transformer(visual._embeds(pixels)))

    def forward(self, inputs: Mapping[str, Any]) -> Tensor:
        """METER's ``infer`` with transformers' own layer forwards: the pooled features (B, 2 x hidden)."""
        family = MeterFamily(self)
        x, aux = family.embed(inputs)
        T = aux.text_length
        text, image = x[:, :T], x[:, T:]
        text_mask, image_mask = aux.text_bias[:, None, None, :], aux.image_bias[:, None, None, :]
        for text_layer, image_layer in zip(self.cross_modal_text_layers, self.cross_modal_image_layers):
            text, image = text_layer(text, image, text_mask, image_mask), image_layer(image, text, image_mask, text_mask)
        return torch.cat([self.cross_modal_text_pooler(text), self.cross_modal_image_pooler(image)], dim=-1)


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """METER's ``objectives.init_weights``: Linear and Embedding N(0, 0.02), zero biases, LayerNorm 1 and 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.normal_(mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        module.bias.zero_()
        module.weight.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.zero_()


# --- building --------------------------------------------------------------------------------

def clip_image_tower(image_size: int, patch_size: int, width: int, layers: int, heads: int) -> nn.Module:
    """An open_clip ``VisionTransformer`` in OpenAI CLIP's layout (QuickGELU, pre-LN), without the
    output projection, as METER keeps it."""
    from ..extras import require

    require("clip", "open_clip", purpose="METER's image encoder")
    from open_clip.transformer import QuickGELU, VisionTransformer

    tower = VisionTransformer(image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads,
                              mlp_ratio=4.0, act_layer=QuickGELU, output_dim=width)
    tower.proj = None
    return tower


def roberta_text_encoder(vocab_size: int = 50265, hidden_size: int = 768, layers: int = 12, heads: int = 12,
                         intermediate_size: int = 3072, max_positions: int = 514, drop_rate: float = 0.1) -> nn.Module:
    """A randomly initialised transformers ``RobertaModel`` (RoBERTa-base's shape by default)."""
    from ..extras import require

    require("vl", "transformers", purpose="METER's text encoder")
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=intermediate_size,
                           max_position_embeddings=max_positions, hidden_dropout_prob=drop_rate,
                           attention_probs_dropout_prob=drop_rate, type_vocab_size=1, pad_token_id=1)
    return RobertaModel(config)


def meter_b(image_size: int = 288, text_length: int = 40) -> MeterModel:
    """A randomly initialised METER-B (METER-CLIP16-RoBERTa): CLIP ViT-B/16 without its last
    block at ``image_size``, RoBERTa-base, 6 fusion layers per stream of width 768."""
    config = MeterConfig(name="meter-clip16-roberta", image_size=image_size, max_text_len=text_length)
    tower = clip_image_tower(image_size, 16, 768, 11, 12)
    return MeterModel(tower, roberta_text_encoder(), config).eval()


def load_meter(spec: str = "meter", weights=None) -> MeterModel:
    """``meter[:SIZE]``: METER-B's shape at SIZE px (default 288), random weights, or an official
    checkpoint (``weights``: FILE.ckpt, ``load_official``; its task heads kept as ``official_heads``)."""
    size = spec.partition(":")[2]
    if size and not size.isdigit():
        raise ValueError(f"{spec!r}: expected meter or meter:SIZE (image size in pixels, a multiple of 16), e.g. meter:576")
    image_size = int(size or 288)
    if image_size % 16:
        raise ValueError(f"{spec!r}: the image size must be a multiple of METER-B's patch size 16")
    model = meter_b(image_size)
    model.official_heads = {} if weights is None else load_official(model, weights)
    return model.eval()


# --- the family --------------------------------------------------------------------------------

@dataclasses.dataclass
class MeterAux:
    """What the walk needs beside the tokens: the text length and the key padding biases (B, T|N)."""

    text_length: int
    text_bias: Tensor
    image_bias: Tensor


SITES_PER_LAYER = 4  # text self, text cross, image self, image cross


@register_family
class MeterFamily(Family):
    name = "meter"
    model_class = "vptune MeterModel (open_clip image tower, RoBERTa or CLIP text tower, BERT co-attention fusion layers)"
    add_location = False  # the text length varies
    # Trained with every method, as the official APT code does on METER (docs/methods.md, "Vision-language models").
    also_tuned = ("cross_modal_text_pooler", "cross_modal_image_pooler", "token_type_embeddings")
    backbone_train_mode = True  # the official recipe fine-tunes with the model's dropout active
    reads_text = True
    head_prefixes = ()
    frozen_prefixes = ("vit_model.", "text_transformer.")  # METER's encoders: frozen with every method
    final_prefixes = ("cross_modal_text_pooler.", "cross_modal_image_pooler.")

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return isinstance(model, MeterModel)

    def check(self) -> None:
        from transformers.models.bert import modeling_bert as bert

        for stream in ("text", "image"):
            for i, layer in enumerate(self.layers(stream)):
                for part in (layer.attention, layer.crossattention):
                    if type(part).forward is not bert.BertAttention.forward or type(part.output).forward is not bert.BertSelfOutput.forward:
                        raise TypeError(f"{stream} fusion layer {i} has a {type(part).__name__} whose forward is not "
                                        "transformers' BertAttention.forward: vptune re-composes only that")

    # --- description ----------------------------------------------------------------------
    @property
    def config(self) -> MeterConfig:
        return self.model.meter_config

    def layers(self, stream: str) -> nn.ModuleList:
        return getattr(self.model, f"cross_modal_{stream}_layers")

    @property
    def sites(self) -> list[AttentionSite]:
        c = self.config
        d, H = c.hidden_size, c.num_heads
        own, cross = AttentionSite(d, H, d // H), AttentionSite(d, H, d // H, kind="cross", context_width=d)
        return [own, cross, own, cross] * c.num_layers

    def cross_sites(self) -> list[int]:
        """The cross-attention sites (where the official deep-prompt baseline puts its prompts)."""
        return [i for i, site in enumerate(self.sites) if site.kind == "cross"]

    @property
    def num_features(self) -> int:
        return 2 * self.config.hidden_size  # text and image pooled features, concatenated

    @property
    def prompt_fan_in(self) -> int:
        conv = self.model.vit_model.conv1
        return conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]

    def input_size(self) -> tuple[int, int, int]:
        return (3, self.config.image_size, self.config.image_size)

    def text_length(self) -> int:
        return self.config.max_text_len

    def example_inputs(self, device: torch.device | str = "cpu", batch: int = 1) -> dict[str, Tensor]:
        """A full-size image with a text of the model's full length (METER-B: 288x288, 40 tokens)."""
        ids = torch.full((batch, self.text_length()), 3, dtype=torch.long, device=device)
        return {"image": torch.zeros(batch, *self.input_size(), device=device), "input_ids": ids,
                "attention_mask": torch.ones_like(ids)}

    def data_config(self) -> dict[str, Any]:
        return {"mean": tuple(self.config.mean), "std": tuple(self.config.std), "interpolation": "bicubic"}

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {**super().describe(), "architecture": c.name, "patch_size": c.patch_size, "num_prefix_tokens": 1,
                "global_pool": "meter", "fusion_layers": c.num_layers}

    def fingerprint(self) -> str:
        """A hash of the image patch embedding and the two transforms into the fusion width."""
        digest = hashlib.sha256()
        for weight in (self.model.vit_model.conv1.weight, self.model.cross_modal_text_transform.weight,
                       self.model.cross_modal_image_transform.weight):
            digest.update(weight.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def block_prefixes(self) -> list[str]:
        """One block per stream and fusion depth: text 0, image 0, text 1, ... (partial fine-tuning)."""
        return [f"cross_modal_{stream}_layers.{i}." for i in range(self.config.num_layers) for stream in ("text", "image")]

    def lora_pattern(self, targets: tuple[str, ...]) -> str:
        names = {"qkv": r"self\.(query|key|value)", "proj": r"output\.dense"}
        return rf"cross_modal_(text|image)_layers\.\d+\.(attention|crossattention)\.({'|'.join(names[t] for t in targets)})"

    # --- modules a run may hold its own copy of --------------------------------------------
    def module(self, path: str) -> nn.Module:
        """The backbone's submodule ``path``, or the run's own trained copy of it (``also_tuned``)."""
        own = self.overrides.get(path)
        return own if own is not None else self.model.get_submodule(path)

    def adapt_copies(self, copies: dict[str, nn.Module], task: Any) -> dict[str, nn.Module]:
        """For a task with two images (NLVR), a third token type started from the image's (METER's NLVR2 recipe)."""
        types = copies.get("token_type_embeddings")
        if types is not None and "image1" in getattr(task, "fields", ()) and types.num_embeddings < 3:
            grown = nn.Embedding(3, types.embedding_dim).to(types.weight)
            with torch.no_grad():
                grown.weight[: types.num_embeddings] = types.weight
                grown.weight[types.num_embeddings:] = types.weight[-1]
            copies["token_type_embeddings"] = grown
        return copies

    # --- task heads ------------------------------------------------------------------------
    def task_head(self, task: Any, in_dim: int) -> nn.Module:
        """METER's heads: VQA Linear(d, d), LayerNorm, GELU, Linear(d, answers) and NLVR2
        Linear(2d, d), LayerNorm, GELU, Linear(d, 2), d the concatenated poolers' width (ViLT's
        hidden width is 2d); retrieval's score head Linear(d, 1) as ViLT's."""
        if task.name in ("vqa", "nlvr"):
            return task.head(in_dim, hidden=in_dim)
        return task.head(in_dim)

    def pretrained_head(self, task: Any, head: nn.Module) -> str | None:
        """The official fine-tuned checkpoint's head for ``task`` (``official_heads``,
        ``load_official``) into ``head``: ``vqa_classifier`` (VQA), ``nlvr2_classifier`` (NLVR),
        ``rank_output`` or else ``itm_score``'s match row (retrieval, as the official code starts
        it). A VQA head over another number of answers than the task's is not loaded: the run
        keeps a fresh head, with a warning (docs/families.md, "METER")."""
        from ..tasks import RetrievalTask

        official = getattr(self.model, "official_heads", None) or {}
        for prefix in OFFICIAL_TASK_HEADS.get(task.name, ()):
            state = {k[len(prefix):]: v for k, v in official.items() if k.startswith(prefix)}
            if not state:
                continue
            if prefix == "itm_score.fc.":
                itm = nn.Linear(state["weight"].shape[1], 2)
                itm.load_state_dict(state)
                state = RetrievalTask.head_from_itm(itm).state_dict()
            target = head.classifier if prefix == "nlvr2_classifier." else head
            expected = target.state_dict()
            if task.name == "vqa" and "3.weight" in state and state["3.weight"].shape[0] != expected["3.weight"].shape[0]:
                import warnings

                warnings.warn(f"the checkpoint's VQA head answers {state['3.weight'].shape[0]} answers, the task has "
                              f"{expected['3.weight'].shape[0]}: the run starts a fresh VQA head (its backbone is the "
                              "checkpoint's)", stacklevel=2)
                return None
            wrong = sorted(set(expected) ^ set(state)) + sorted(
                f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape)
            if wrong:
                raise ValueError(f"the checkpoint's {prefix.rstrip('.')} does not fit the {task.name} head: {', '.join(wrong)}")
            target.load_state_dict(state)
            return prefix.rstrip(".")
        return None

    # --- the walk ---------------------------------------------------------------------------
    def embed(self, inputs: Mapping[str, Any]) -> tuple[Tensor, MeterAux]:
        """Both streams after the frozen encoders, the transforms and the token types, as one
        tensor ``[text (T), image (1 + patches)]`` (B, T + N, hidden), and their padding biases."""
        if isinstance(inputs, Tensor):
            raise TypeError("a METER backbone needs text with the image: pass a dict with image (or pixel_values), "
                            "input_ids and attention_mask")
        pixels = inputs.get("image", inputs.get("pixel_values"))
        if pixels is None:
            raise ValueError("METER input has no image: pass image (or pixel_values), (B, 3, H, W)")
        if "input_ids" not in inputs:
            raise ValueError("METER input has no text: pass input_ids and attention_mask")
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        if pixels.shape[0] != ids.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {ids.shape[0]} texts: METER pairs one image with one text")
        size = self.config.image_size
        if tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(f"images of {tuple(pixels.shape[-2:])} pixels, but this METER reads {size}x{size} "
                             f"(its position embedding's grid): resize to {size}, or build the model at that size")
        model = self.model
        with torch.no_grad():  # the encoders are frozen with every method: no activations kept for backward
            text, image = model.text_states(ids, mask), model.image_states(pixels)
        text, image = model.cross_modal_text_transform(text), model.cross_modal_image_transform(image)
        types = self.module("token_type_embeddings")
        index = min(int(inputs.get("image_token_type_idx", 1)), types.num_embeddings - 1)
        text = text + types(torch.zeros_like(ids))
        image = image + types(torch.full(image.shape[:2], index, dtype=torch.long, device=image.device))
        text_bias = torch.zeros(mask.shape, dtype=torch.float32, device=text.device).masked_fill(~mask.bool(), float("-inf"))
        image_bias = torch.zeros(image.shape[:2], dtype=torch.float32, device=image.device)
        return torch.cat([text, image], dim=1), MeterAux(ids.shape[1], text_bias, image_bias)

    def run_blocks(self, x: Tensor, aux: MeterAux, method: Method, checkpoint: bool = False,
                   outputs: int | None = None) -> Tensor:
        """Every fusion layer of both streams with ``method``'s hooks at its four sites; both
        streams of a layer read the other's previous states, as METER does. Returns ``[text, image]``."""
        T = aux.text_length
        text, image = x[:, :T], x[:, T:]
        layer = self.stream_layer
        if checkpoint and torch.is_grad_enabled():
            layer = lambda *args: recompute(self.stream_layer, *args, use_reentrant=False)  # noqa: E731
        for i in range(self.config.num_layers):
            site = SITES_PER_LAYER * i
            text, image = (layer("text", i, site, text, aux.text_bias, image, aux.image_bias, method),
                           layer("image", i, site + 2, image, aux.image_bias, text, aux.text_bias, method))
        return torch.cat([text, image], dim=1)

    def stream_layer(self, stream: str, index: int, site: int, x: Tensor, bias: Tensor, other: Tensor,
                     other_bias: Tensor, method: Method) -> Tensor:
        """One stream's fusion layer: self-attention (site), cross-attention to ``other`` (site + 1), FFN."""
        layer = self.layers(stream)[index]
        h = self.attention_sublayer(layer.attention, site, x, bias, None, None, method)
        h = self.attention_sublayer(layer.crossattention, site + 1, h, bias, other, other_bias, method)
        return layer.output(layer.intermediate(h), h)

    def attention_sublayer(self, attention: nn.Module, site: int, x: Tensor, bias: Tensor, context: Tensor | None,
                           context_bias: Tensor | None, method: Method) -> Tensor:
        """``LayerNorm(x + dropout(hook(x, dense(attention))))`` with the site's prompts among the
        keys/values: those of ``x`` (self) or of ``context`` (cross)."""
        view = BertAttentionView(attention.self, attention.output)
        B = x.shape[0]
        source_bias = bias if context is None else context_bias  # over the keys' own tokens
        prompts = method.prompts(site, B) if site in method.prompt_layers else None
        kv = method.kv_prompts(site)
        extra_k = extra_v = None
        key_parts: list[Tensor] = []
        if prompts is not None:
            p = prompts.shape[1]
            prompt_bias = method.prompt_key_bias(B)
            prompt_bias = x.new_zeros(1, p) if prompt_bias is None else prompt_bias.to(x.dtype)
            if method.path == "kv":
                if not method.training and not torch.is_grad_enabled() and prompts.shape[0] == 1:
                    extra_k, extra_v = cached_prompt_keys_values(method, site, prompts, lambda t: prompt_keys_values(view, t))
                else:
                    extra_k, extra_v = prompt_keys_values(view, prompts)
                key_parts = [source_bias, prompt_bias]
            elif context is None:  # literally: the prompts in the sequence, their outputs dropped
                x_in = torch.cat([x, prompts.expand(B, -1, -1)], dim=1)  # B, N + p, d
                return self._finish(attention, site, x, self._attend(view, x_in, None, kv, [bias, prompt_bias]), method)
            else:  # literally: the prompts before the other stream's tokens, as the official baseline
                context = torch.cat([prompts.expand(B, -1, -1), context], dim=1)  # B, p + M, d
                key_parts = [prompt_bias, source_bias]
        else:
            key_parts = [source_bias]
        if kv is not None:
            if extra_k is not None:
                n = extra_k.shape[0]
                extra_k = torch.cat([extra_k, kv[0].to(extra_k.dtype).expand(n, -1, -1, -1)], dim=2)
                extra_v = torch.cat([extra_v, kv[1].to(extra_v.dtype).expand(n, -1, -1, -1)], dim=2)
            else:
                extra_k, extra_v = kv
            key_parts.append(x.new_zeros(1, kv[0].shape[2]))
        key_bias = _key_bias(key_parts, B)
        a = attend(view, x, extra_k, extra_v, key_bias, context=context)
        return self._finish(attention, site, x, a, method)

    def _attend(self, view, x_in: Tensor, context, kv, parts: list[Tensor]) -> Tensor:
        """Self-attention over ``x_in`` whose trailing tokens are prompts; every output computed."""
        extra_k, extra_v = kv if kv is not None else (None, None)
        if kv is not None:
            parts = parts + [x_in.new_zeros(1, kv[0].shape[2])]
        return attend(view, x_in, extra_k, extra_v, _key_bias(parts, x_in.shape[0]), context=context)

    def _finish(self, attention: nn.Module, site: int, x: Tensor, a: Tensor, method: Method) -> Tensor:
        a = a[:, : x.shape[1]]  # the literal path's prompt outputs are dropped
        hook = method.attention_output(site)
        if hook is not None:
            a = hook(x, a)
        out = attention.output
        return out.LayerNorm(out.dropout(a) + x)

    def features(self, inputs: Mapping[str, Any], method: Method, checkpoint: bool = False) -> Tensor:
        """METER's pooled feature (B, 2 x hidden): the text pooler on the text's first token and
        the image pooler on the image CLS, concatenated."""
        x, aux = self.embed(inputs)
        x = self.run_blocks(x, aux, method, checkpoint=checkpoint)
        T = aux.text_length
        return torch.cat([self.module("cross_modal_text_pooler")(x[:, :T]),
                          self.module("cross_modal_image_pooler")(x[:, T:])], dim=-1)


def _key_bias(parts: list[Tensor], batch: int) -> Tensor:
    """Per-key biases (B|1, n_i) concatenated into the attention mask (B, 1, 1, sum n_i)."""
    parts = [p.expand(batch, -1) for p in parts]
    return torch.cat(parts, dim=1)[:, None, None, :]


# --- official checkpoints ------------------------------------------------------------------------

# Keys of an official METER checkpoint (``METERTransformerSS.state_dict()`` in a Lightning
# ``.ckpt``) and where they go (docs/families.md, "METER: official checkpoints"):
OFFICIAL_RENAMES = (("vit_model.visual.", "vit_model."),)  # METER keeps the whole OpenAI CLIP; we keep its image tower
# Tensors METER builds but never uses (the CLIP text tower's position table and final norm) and
# buffers older transformers saved (RoBERTa's position ids): dropped.
OFFICIAL_UNUSED = ("vit_model.positional_embedding", "vit_model.ln_final.", "text_transformer.embeddings.position_ids",
                   "text_transformer.embeddings.token_type_ids")
# The official task heads: returned beside the backbone, not part of it.
OFFICIAL_HEADS = ("vqa_classifier.", "nlvr2_classifier.", "snli_classifier.", "itm_score.", "mlm_score.", "rank_output.")
# Which official head starts which vptune task's head, in order of preference (MeterFamily.pretrained_head).
OFFICIAL_TASK_HEADS = {"vqa": ("vqa_classifier.",), "nlvr": ("nlvr2_classifier.",), "retrieval": ("rank_output.", "itm_score.fc.")}
# Lightning's hyper-parameter container: plain data, read as a dict, never its class.
INERT_CONTAINERS = {"pytorch_lightning.utilities.parsing.AttributeDict", "lightning_fabric.utilities.data.AttributeDict",
                    "lightning.fabric.utilities.data.AttributeDict"}
_SHOWN = 10


class _Inert(dict):
    """What a Lightning container (``AttributeDict``) becomes when read: a dict, no code of its class."""


def _restricted_pickle_module():
    """A pickle module whose unpickler resolves only what ``torch.load(weights_only=True)``
    allows plus ``INERT_CONTAINERS`` (as ``_Inert``); any other global is refused, so no code of
    the file runs."""
    import pickle
    import types

    from torch import _weights_only_unpickler as safe

    allowed = safe._get_allowed_globals()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            full = f"{module}.{name}"
            if full in INERT_CONTAINERS:
                return _Inert
            if full in allowed:
                return allowed[full]
            raise pickle.UnpicklingError(f"global {full} is not allowed")

    module = types.ModuleType("vptune_restricted_pickle")
    module.Unpickler = Unpickler
    module.load = pickle.load
    module.__name__ = "vptune_restricted_pickle"
    return module


def read_checkpoint(path) -> dict[str, Tensor]:
    """The ``state_dict`` of an official ``.ckpt`` (or a plain state dict file), tensors only:
    ``torch.load(weights_only=True)``; a Lightning checkpoint whose hyper-parameters are an
    ``AttributeDict`` is read by a restricted unpickler that turns it into a dict; any other
    object that would need code to unpickle is refused, naming it."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass an official METER checkpoint (.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, ...)
        try:
            needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001
            raise ValueError(f"{path} is not a readable torch checkpoint ({type(error).__name__})") from None
        if not needed or not needed <= INERT_CONTAINERS:
            raise ValueError(f"{path} needs unpickling of {sorted(needed - INERT_CONTAINERS)}, which vptune does not run: "
                             "re-save its tensors with torch.save(torch.load(FILE)['state_dict'], OUT) where you trust "
                             "the file, and pass OUT") from None
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module())
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state_dict of tensors: expected a METER checkpoint (.ckpt)")
    return dict(state)


def interpolate_positions(table: Tensor, grid: int) -> Tensor:
    """A CLIP position table (1 + g*g, w) resized to ``grid`` x ``grid`` patches, as the official
    ``adapt_position_encoding`` does (bicubic, the class position kept)."""
    before = int(round((table.shape[0] - 1) ** 0.5))
    width = table.shape[-1]
    patches = table[1:].reshape(1, before, before, width).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bicubic").to(table.dtype)
    return torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(grid * grid, width)])


def official_to_vptune(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """An official state dict split into (backbone tensors under our names, task heads, dropped keys)."""
    backbone, heads, dropped = {}, {}, []
    for key, value in state.items():
        if key.startswith(OFFICIAL_HEADS):
            heads[key] = value
            continue
        if key.startswith(OFFICIAL_UNUSED):
            dropped.append(key)
            continue
        for old, new in OFFICIAL_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
        backbone[key] = value
    return backbone, heads, dropped


def load_official(model: MeterModel, path) -> dict[str, Tensor]:
    """An official METER checkpoint into ``model``, exactly: every backbone tensor must be there
    and fit (missing, unexpected and mis-shaped keys are listed); the position table is resized
    to the model's image size as the official code does; a 3-row token-type table (NLVR2) grows
    the model's. Returns the official task heads' tensors (``vqa_classifier.*``, ``itm_score.*``, ...)."""
    state, heads, _ = official_to_vptune(read_checkpoint(path))
    positions = state.get("vit_model.positional_embedding")
    grid = model.meter_config.image_size // model.meter_config.patch_size
    if positions is not None and positions.dim() == 2 and positions.shape[0] != grid * grid + 1:
        state["vit_model.positional_embedding"] = interpolate_positions(positions, grid)
    types = state.get("token_type_embeddings.weight")
    if types is not None and types.shape[0] != model.token_type_embeddings.num_embeddings:
        model.token_type_embeddings = nn.Embedding(types.shape[0], types.shape[1])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in set(state) & set(expected)
                    if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        def listed(keys: list[str]) -> str:
            return ", ".join(keys[:_SHOWN]) + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "") or "none"

        raise ValueError(f"{path} does not fit {model.meter_config.name}: missing {listed(missing)}; unexpected "
                         f"{listed(unexpected)}; other shapes {listed(shapes)}. Official keys are mapped as "
                         "docs/families.md (METER) says")
    model.load_state_dict(state)
    return heads
