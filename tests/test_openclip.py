"""The open_clip family on tiny random CLIPs with honest weights: the walk equals open_clip's own
image tower, the key-value path equals the token path, VPT-deep equals a literal computation on
open_clip's own blocks, every method runs and tunes only what it should, LoRA through peft's
MultiheadAttention equals peft's own forward, round trips, and loading by name refuses unknown
names and tags, and runs made on another CLIP."""

from __future__ import annotations

import json

import pytest
import torch
from test_attention import assert_paths_agree, logits_and_grads, randomize_

import vptune
from honest import honest_
from vptune.backbones import load_backbone
from vptune.backbones.family import family_of

open_clip = pytest.importorskip("open_clip")

NUM_CLASSES = 5
VISION = dict(image_size=32, patch_size=8, width=48, layers=3, head_width=16, mlp_ratio=2.0, ls_init_value=0.5)
TEXT = dict(context_length=12, vocab_size=49408, width=32, heads=2, layers=2)


def tiny_clip(seed: int = 0, **vision) -> torch.nn.Module:
    """A tiny open_clip CLIP (image tower d=48, 3 blocks; text tower w=32, 2 blocks) with honest weights."""
    from vptune.backbones.openclip import describe_model

    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=16, vision_cfg={**VISION, **vision}, text_cfg=TEXT)
    return describe_model(honest_(model, seed), "open_clip:tiny-test")


def images_of(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_family_and_sites():
    clip = tiny_clip()
    family = family_of(clip)
    assert family.name == "open_clip" and family.num_features == 16
    assert [(s.width, s.num_heads, s.head_dim) for s in family.sites] == [(48, 3, 16)] * 3
    visual = sum(p.numel() for p in clip.visual.parameters())
    assert family.num_parameters() == visual < sum(p.numel() for p in clip.parameters())
    assert family.describe()["architecture"] == "open_clip:tiny-test"


@pytest.mark.parametrize("vision", [{}, dict(pool_type="avg"), dict(final_ln_after_pool=True), dict(no_ln_pre=True)],
                         ids=["tok", "avg", "ln-after-pool", "no-ln-pre"])
def test_walk_equals_open_clip_image_tower(vision):
    clip = tiny_clip(**vision)
    model = vptune.prompt_model(clip, vptune.config_for("linear"), NUM_CLASSES)
    images = images_of()
    with torch.no_grad():
        torch.testing.assert_close(model.family.features(images, model.method), clip.encode_image(images), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config", [vptune.VPTConfig(num_prompts=4, deep=True), vptune.E2VPTConfig(num_prompts=3, num_kv_prompts=2, dropout=0.0)],
                         ids=["vpt-deep", "e2vpt"])
def test_kv_path_equals_tokens_path(config):
    model = randomize_(vptune.prompt_model(tiny_clip(), config, NUM_CLASSES))
    assert_paths_agree(model, images_of())


@pytest.mark.parametrize("path", ["kv", "tokens"])
def test_vpt_deep_equals_literal_on_open_clip_blocks(path):
    """Prompts after the class embedding, open_clip's own ResidualAttentionBlock.forward over the
    whole sequence, prompt outputs dropped before ln_post, pooling and proj."""
    clip = tiny_clip()
    model = randomize_(vptune.prompt_model(clip, vptune.VPTConfig(num_prompts=4, path=path), NUM_CLASSES)).eval()
    images = images_of()
    prompts = model.method.prompt_embeddings  # depth, p, d
    with torch.no_grad():
        x = clip.visual._embeds(images)
        for i, block in enumerate(clip.visual.transformer.resblocks):
            seq = block(torch.cat([x[:, :1], prompts[i].expand(3, -1, -1), x[:, 1:]], dim=1))
            x = torch.cat([seq[:, :1], seq[:, 1 + prompts.shape[1] :]], dim=1)
        pooled, _ = clip.visual._pool(x)
        torch.testing.assert_close(model.family.features(images, model.method), pooled @ clip.visual.proj, atol=1e-5, rtol=1e-5)


METHODS = {
    "linear": (dict(), lambda n: False),
    "vpt-shallow": (dict(num_prompts=2), lambda n: False),
    "vpt-deep": (dict(num_prompts=2), lambda n: False),
    "e2vpt": (dict(num_prompts=2, num_kv_prompts=2), lambda n: False),
    "apt": (dict(num_prompts=2, rank=2), lambda n: False),
    "bias": (dict(), lambda n: n.startswith("backbone.visual.") and n.endswith("bias")),
    "partial": (dict(num_blocks=1), lambda n: n.startswith(("backbone.visual.transformer.resblocks.2.", "backbone.visual.ln_post", "backbone.visual.proj"))),
    "full": (dict(), lambda n: n.startswith("backbone.visual.")),
    "lora": (dict(rank=2), lambda n: "lora_" in n),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_tunes_only_its_tensors(method):
    options, backbone_tuned = METHODS[method]
    clip = tiny_clip()
    model = vptune.prompt_model(clip, vptune.config_for(method, **options), NUM_CLASSES)
    if method in ("apt", "lora"):  # a zero-initialised factor (APT's W2, LoRA's B) leaves its partner no gradient
        randomize_(model, scale=0.1)
    _, grads = logits_and_grads(model, images_of())
    tuned = set(grads)
    for name in tuned:
        assert name.startswith(("head.", "method.")) or backbone_tuned(name), f"{method} tunes {name}"
        assert not name.startswith(("backbone.transformer.", "backbone.token_embedding", "backbone.logit_scale")), name
    assert all(g.abs().sum() > 0 for g in grads.values())
    if method in ("bias", "partial", "full", "lora"):
        assert any(n.startswith("backbone.") for n in tuned)
    assert model.num_backbone_parameters() == sum(p.numel() for p in clip.visual.parameters())
    assert all(not p.requires_grad for p in clip.parameters())  # the shared backbone is untouched


def test_lora_counts_and_equals_merged_weights():
    """rank r on in_proj (3d x r + r x d) and out_proj (2 r d) per block: 6 r d L, as on timm; the
    walk equals open_clip's own tower with the updates merged into its weights by hand
    (W + B A scaling). Not peft's own MultiheadAttention forward: peft 0.21.2's merge adds the
    out_proj update twice (it adds the delta to the weight, then calls out_proj.merge; peft PR #3774)."""
    import copy

    clip = tiny_clip()
    model = randomize_(vptune.prompt_model(clip, vptune.LoRAConfig(rank=2), NUM_CLASSES), scale=0.3)
    d, L, r = 48, 3, 2
    assert model.num_tuned_parameters() == 6 * r * d * L + 16 * NUM_CLASSES + NUM_CLASSES
    merged = copy.deepcopy(clip)
    images = images_of()
    with torch.no_grad():
        for block, adapted in zip(merged.visual.transformer.resblocks, model.backbone.visual.transformer.resblocks):
            lora, out = adapted.attn, adapted.attn.get_base_layer().out_proj
            block.attn.in_proj_weight += lora.get_delta_weight("default")
            block.attn.out_proj.weight += out.lora_B["default"].weight @ out.lora_A["default"].weight * out.scaling["default"]
        torch.testing.assert_close(model.family.features(images, model.method), merged.visual(images), atol=1e-5, rtol=1e-5)
        assert (merged.visual(images) - clip.visual(images)).abs().max() > 1e-3  # LoRA changes the output
    proj_only = vptune.prompt_model(clip, vptune.LoRAConfig(rank=2, targets=("proj",)), NUM_CLASSES)
    assert proj_only.num_tuned_parameters() == 2 * r * d * L + 16 * NUM_CLASSES + NUM_CLASSES
    with pytest.raises(ValueError, match="in_proj .*only together with its out_proj"):
        vptune.prompt_model(clip, vptune.LoRAConfig(rank=2, targets=("qkv",)), NUM_CLASSES)


def test_round_trip_and_refusal_on_another_clip(tmp_path):
    from vptune.backbones.openclip import describe_model

    clip = tiny_clip()
    model = randomize_(vptune.prompt_model(clip, vptune.VPTConfig(num_prompts=3), NUM_CLASSES)).eval()
    model.save_pretrained(tmp_path / "run")
    back = vptune.PromptModel.from_pretrained(clip, tmp_path / "run").eval()
    images = images_of()
    with torch.no_grad():
        torch.testing.assert_close(back(images), model(images), atol=0, rtol=0)
    other = describe_model(tiny_clip(seed=1), "open_clip:other-test")
    with pytest.raises(ValueError, match="trained on open_clip:tiny-test.*open_clip:other-test"):
        vptune.PromptModel.from_pretrained(other, tmp_path / "run")


def test_load_backbone_by_name_and_local_weights(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "vptune-tiny-test.json").write_text(json.dumps({"embed_dim": 16, "vision_cfg": VISION, "text_cfg": TEXT}))
    open_clip.add_model_config(tmp_path)
    clip = tiny_clip()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = load_backbone("open_clip:vptune-tiny-test", weights=tmp_path / "w.safetensors")
    images = images_of()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), clip.encode_image(images))
    assert family_of(loaded).describe()["architecture"] == "open_clip:vptune-tiny-test"
    assert loaded.pretrained_cfg["input_size"] == (3, 32, 32)
    bad = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.ln_post")}
    save_file({k: v.contiguous() for k, v in bad.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="missing: visual.ln_post.bias, visual.ln_post.weight"):
        load_backbone("open_clip:vptune-tiny-test", weights=tmp_path / "bad.safetensors")


def test_unknown_name_and_tag_list_close_names():
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-B-61'.*Close names: .*ViT-B-16"):
        load_backbone("open_clip:ViT-B-61/openai")
    with pytest.raises(ValueError, match=r"no pretrained tag 'opnai' for ViT-B-16: its tags are openai, .*Close names: openai"):
        load_backbone("open_clip:ViT-B-16/opnai")


def timm_tower_clip() -> torch.nn.Module:
    """An open_clip CLIP whose image tower is a timm model (open_clip's TimmModel: timm's test_vit + a projection)."""
    torch.manual_seed(0)
    vision = {"timm_model_name": "test_vit", "image_size": 160, "timm_pool": "", "timm_proj": "linear"}
    return honest_(open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=TEXT), 0).eval()


def test_timm_image_tower_uses_the_timm_walk():
    clip = timm_tower_clip()
    family = family_of(clip)
    assert family.name == "open_clip_timm" and family.trunk_family.name == "vit" and family.num_features == 16
    images = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    model = vptune.prompt_model(clip, vptune.config_for("linear"), NUM_CLASSES)
    with torch.no_grad():
        torch.testing.assert_close(family.features(images, model.method), clip.encode_image(images), atol=1e-5, rtol=1e-5)
    assert_paths_agree(randomize_(vptune.prompt_model(clip, vptune.VPTConfig(num_prompts=2), NUM_CLASSES)), images)
    lora = vptune.prompt_model(clip, vptune.LoRAConfig(rank=2), NUM_CLASSES)
    assert all(name.startswith(("head.", "backbone.visual.trunk.blocks.")) for name in lora.tuned_parameters())
    partial = vptune.prompt_model(clip, vptune.PartialConfig(num_blocks=1), NUM_CLASSES)
    tuned = {name.split(".")[2] for name in partial.tuned_parameters() if name.startswith("backbone.")}
    assert tuned == {"trunk", "head"}  # the last trunk block and norm, open_clip's projection head
