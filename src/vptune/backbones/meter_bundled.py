"""The bundled METER, ``vptune_meter_fmnist``: the bundled CLIP's two towers (``vptune_clip_fmnist``)
as METER's frozen image and text encoders, and two co-attention fusion layers per stream of
width 128 pretrained with image-text matching and masked language modelling on captioned
canvases (``vptune pretrain --arch meter``, ``pretrain_meter.py``; ``weights/METER_MODEL_CARD.md``).

As METER does with CLIP, the image tower's last block is dropped (its patch tokens were never
trained: CLIP reads only the class token there) and every token after ``ln_post`` is kept. The
text tower gives every token's state after ``ln_final`` (its causal mask kept). The shipped
file holds only what METER adds (transforms, token types, fusion layers, poolers, and the
pretraining heads under ``itm_score.``/``mlm_score.``); the towers come from the bundled
CLIP's own file, so the two stay one model.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from torch import nn

from .bundled import MEAN, STD

BUNDLED_METER = "vptune_meter_fmnist"
HIDDEN, HEADS, LAYERS = 128, 4, 2
TEXT_LENGTH = 48  # the word tokenizer's max_length
ENCODERS = ("vit_model.", "text_transformer.")


def bundled_meter_weights_path() -> Path:
    return Path(str(resources.files("vptune") / "weights" / f"{BUNDLED_METER}.safetensors"))


def build_bundled_meter(clip: nn.Module | None = None) -> nn.Module:
    """The bundled METER around ``clip`` (default: the bundled CLIP with its shipped weights);
    the fusion part random."""
    from .clip_bundled import load_bundled_clip
    from .meter import ClipTextEncoder, MeterConfig, MeterModel

    clip = load_bundled_clip() if clip is None else clip
    visual = clip.visual
    visual.transformer.resblocks = visual.transformer.resblocks[:-1]  # METER drops CLIP's last image block
    visual.proj = None
    text = ClipTextEncoder(clip)
    config = MeterConfig(name=BUNDLED_METER, hidden_size=HIDDEN, num_heads=HEADS, intermediate_size=4 * HIDDEN,
                         num_layers=LAYERS, image_width=visual.conv1.out_channels, text_width=text.width,
                         image_size=visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size,
                         patch_size=visual.conv1.kernel_size[0], max_text_len=TEXT_LENGTH, drop_rate=0.1,
                         layer_norm_eps=1e-12, mean=MEAN, std=STD)
    model = MeterModel(visual, text, config)
    model.tokenizer = clip.tokenizer
    return model.eval()


def fusion_state(model: nn.Module) -> dict:
    """What the bundled file stores of ``model``: everything but the CLIP's towers."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(ENCODERS)}


def load_bundled_meter(weights: str | Path | None = None) -> nn.Module:
    """The bundled METER with its shipped fusion weights (or ``weights``) on the bundled CLIP."""
    from safetensors.torch import load_file

    from .loading import load_state

    path = Path(weights) if weights is not None else bundled_meter_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"the bundled METER's weights are missing ({path}). Create them with "
                                "`vptune pretrain --arch meter`, or pass another backbone")
    model = build_bundled_meter()
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith(("itm_score.", "mlm_score."))}
    encoders = {k: v for k, v in model.state_dict().items() if k.startswith(ENCODERS)}
    load_state(model, {**encoders, **state}, source=str(path))
    return model.eval()
