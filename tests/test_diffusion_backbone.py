"""Diffusion backbones (``vptune.diffusion``): a tiny random UNet with honest weights, frozen;
generation a few steps end to end, seeded and deterministic; grids; refusing another pipeline;
local pipeline folders and bad specs; the pretraining's resume."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from honest import honest_
from vptune.diffusion import backbone as bb
from vptune.diffusion import sample
from vptune.diffusion.backbone import (
    BUNDLED_SD,
    denoising_loss,
    is_diffusion_spec,
    load_diffusion_backbone,
    tiny_random_backbone,
)

PROMPTS = ["a photo of sks bag", "2 items: a small bag at the left and a tiny sneaker at the right"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_backbone(0, init=honest_)


@pytest.fixture(scope="module")
def tiny_vae():
    return tiny_random_backbone(0, vae=True, init=honest_)


def test_frozen_and_honest(tiny):
    for name, module in tiny.modules().items():
        assert not module.training, name
        assert all(not p.requires_grad for p in module.parameters()), name
    biases = [p for n, p in tiny.unet.named_parameters() if n.endswith("bias")]
    assert all(p.abs().sum() > 0 for p in biases)  # honest_: no all-zero bias


def test_encode_prompt_shape_and_identifier(tiny):
    states = tiny.encode_prompt(PROMPTS + [""])
    assert states.shape == (3, tiny.text_encoder.max_length, tiny.unet.config.cross_attention_dim)
    ids = tiny.tokenize(["a photo of sks bag"])[0].tolist()
    unk = tiny.text_encoder._tokenizer.unk_token_id
    assert unk not in ids  # every word, the identifier included, is in the vocabulary
    sks = tiny.text_encoder._tokenizer.convert_tokens_to_ids("sks")
    assert sks in ids and sks != unk
    # the identifier changes the states: the prompt is not read as "a photo of bag"
    assert not torch.allclose(states[0], tiny.encode_prompt(["a photo of bag"])[0])


def test_bundled_tokenizer_holds_sks():
    pytest.importorskip("open_clip")
    from vptune.backbones.clip_bundled import CLIPWordTokenizer

    tokenizer = CLIPWordTokenizer()
    ids = tokenizer(["a photo of sks bag"])[0].tolist()
    assert tokenizer.words.unk_token_id not in ids
    assert tokenizer.words.encode("sks")[1] in ids  # [CLS] sks [SEP]


def test_pixel_latents_round_trip(tiny):
    images = torch.rand(2, 1, 8, 8)
    latents = tiny.to_latents(images)
    assert latents.min() >= -1 and latents.max() <= 1
    torch.testing.assert_close(tiny.to_images(latents), images)


def test_vae_latents(tiny_vae):
    latents = tiny_vae.to_latents(torch.rand(2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, tiny_vae.latent_channels, tiny_vae.latent_size, tiny_vae.latent_size)
    images = tiny_vae.to_images(latents)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("sampler", ["ddim", "dpm", "ddpm"])
def test_generate_deterministic(tiny, sampler):
    first = sample.generate(tiny, PROMPTS, num_images=2, steps=3, guidance=2.0, seed=5, sampler=sampler)
    again = sample.generate(tiny, PROMPTS, num_images=2, steps=3, guidance=2.0, seed=5, sampler=sampler, batch_size=3)
    assert first.shape == (4, 1, 8, 8)
    torch.testing.assert_close(first, again, rtol=0, atol=1e-6)  # the batching does not change an image
    other = sample.generate(tiny, PROMPTS, num_images=2, steps=3, guidance=2.0, seed=6, sampler=sampler)
    assert not torch.allclose(first, other)
    # image k starts from the noise of seed + k, whatever the number of images
    alone = sample.generate(tiny, PROMPTS[:1], num_images=1, steps=3, guidance=2.0, seed=5, sampler=sampler)
    torch.testing.assert_close(alone[0], first[0], rtol=0, atol=1e-6)


def test_generate_guidance_is_the_documented_combination(tiny):
    """One DDIM step from the same noise: the guided prediction is eps(empty) + g (eps(p) - eps(empty))."""
    calls = []

    class Recording(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, encoder_hidden_states):
            calls.append(len(x))
            return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)

    guided = sample.generate(tiny, PROMPTS[:1], steps=1, guidance=3.0, seed=1, unet=Recording(tiny.unet))
    assert calls == [2]  # empty and prompt in one batch
    plain = sample.generate(tiny, PROMPTS[:1], steps=1, guidance=1.0, seed=1, unet=Recording(tiny.unet))
    assert calls == [2, 1]

    scheduler = sample.make_sampler(tiny, "ddim")
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    noise = sample.initial_noise(tiny, sample.image_generators(1, 1))
    eps_p = tiny.unet(noise, t, encoder_hidden_states=tiny.encode_prompt(PROMPTS[:1])).sample
    eps_0 = tiny.unet(noise, t, encoder_hidden_states=tiny.encode_prompt([""])).sample
    expected = scheduler.step(eps_0 + 3.0 * (eps_p - eps_0), t, noise).prev_sample
    torch.testing.assert_close(guided, tiny.to_images(expected), rtol=0, atol=1e-5)
    scheduler.set_timesteps(1)
    torch.testing.assert_close(plain, tiny.to_images(scheduler.step(eps_p, t, noise).prev_sample), rtol=0, atol=1e-5)


def test_generate_with_vae_and_encoder_override(tiny_vae):
    seen = []

    def encode(prompts):
        seen.append(list(prompts))
        return tiny_vae.encode_prompt(prompts)

    images = sample.generate(tiny_vae, PROMPTS[:1], num_images=2, steps=2, seed=0, encode_prompt=encode)
    assert images.shape == (2, 3, 16, 16)
    assert seen == [[""], PROMPTS[:1] * 2]


def test_grid_written(tiny, tmp_path):
    from PIL import Image

    images = sample.generate(tiny, PROMPTS, num_images=3, steps=2, seed=0)
    path = sample.save_grid(images, tmp_path / "sub" / "grid.png", columns=3, scale=4, labels=PROMPTS)
    grid = np.asarray(Image.open(path))
    label_h, pad = 14, 2
    assert grid.shape == (2 * (32 + pad + label_h) + pad, 3 * (32 + pad) + pad, 3)
    cell = grid[pad + label_h:pad + label_h + 32, pad:pad + 32, 0]  # first image, enlarged 4x
    expected = (images[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    assert (cell[::4, ::4] == expected).all()
    with pytest.raises(ValueError, match="PNG"):
        sample.save_grid(images, tmp_path / "grid.jpg")
    with pytest.raises(ValueError, match="labels"):
        sample.save_grid(images, tmp_path / "g.png", columns=3, labels=PROMPTS[:1])


def test_generate_bad_input(tiny):
    with pytest.raises(ValueError, match="prompt"):
        sample.generate(tiny, [])
    with pytest.raises(ValueError, match="sampler"):
        sample.generate(tiny, PROMPTS, sampler="euler-x")
    with pytest.raises(ValueError, match="at least 1"):
        sample.generate(tiny, PROMPTS, steps=0)


def test_describe_and_refusal(tiny, tiny_vae):
    tiny.check_matches(tiny.describe(), tiny.fingerprint())
    with pytest.raises(ValueError, match="differs from this backbone.*latent.*pass --backbone tiny-random"):
        tiny.check_matches(tiny_vae.describe())
    with pytest.raises(ValueError, match="not a diffusion UNet"):
        tiny.check_matches({"family": "timm-vit", "name": "vit_small_patch16_224"})
    other_weights = tiny_random_backbone(1, init=honest_)
    assert other_weights.describe() == tiny.describe()
    with pytest.raises(ValueError, match="other weights"):
        tiny.check_matches(other_weights.describe(), other_weights.fingerprint())
    json.dumps(tiny.describe())  # a run folder stores it as JSON


def test_denoising_loss(tiny):
    latents = tiny.to_latents(torch.rand(3, 1, 8, 8))
    states = tiny.encode_prompt(PROMPTS[:1] * 3)
    a = denoising_loss(tiny, latents, states, generator=torch.Generator().manual_seed(0))
    b = denoising_loss(tiny, latents, states, generator=torch.Generator().manual_seed(0))
    assert a.item() == b.item() and a.item() > 0 and not a.requires_grad  # frozen
    weighted = denoising_loss(tiny, latents, states, generator=torch.Generator().manual_seed(0),
                              weights=torch.tensor([1.0, 0.0, 0.0]))
    assert weighted.item() < a.item()
    # a tuned copy gets gradients; the frozen one never does
    import copy

    tuned = copy.deepcopy(tiny.unet).requires_grad_(True)
    denoising_loss(tiny, latents, states, unet=tuned).backward()
    assert all(p.grad is not None for p in tuned.parameters())
    assert all(p.grad is None for p in tiny.unet.parameters())


def _save_pipeline(backbone, folder, class_name="StableDiffusionPipeline"):
    backbone.unet.save_pretrained(folder / "unet")
    backbone.text_encoder.model.save_pretrained(folder / "text_encoder")
    backbone.text_encoder._tokenizer.save_pretrained(folder / "tokenizer")
    backbone.noise_scheduler.save_pretrained(folder / "scheduler")
    backbone.vae.save_pretrained(folder / "vae")
    index = {"_class_name": class_name, "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(index))


def test_local_pipeline_folder(tiny_vae, tmp_path):
    _save_pipeline(tiny_vae, tmp_path / "pipe")
    assert is_diffusion_spec("hf:my-pipeline", tmp_path / "pipe")
    loaded = load_diffusion_backbone("hf:my-pipeline", weights=tmp_path / "pipe")
    assert all(not p.requires_grad for m in loaded.modules().values() for p in m.parameters())
    assert loaded.image_size == 16 and loaded.latent_channels == 4
    loaded.check_matches({**tiny_vae.describe(), "name": "hf:my-pipeline"}, tiny_vae.fingerprint())
    ours = sample.generate(tiny_vae, PROMPTS[:1], steps=2, seed=0)
    theirs = sample.generate(loaded, PROMPTS[:1], steps=2, seed=0)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    # the folder as NAME itself
    assert load_diffusion_backbone(f"hf:{tmp_path / 'pipe'}").describe()["latent"] == [4, 8]


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="unknown diffusion backbone 'vit_small_patch16_224'"):
        load_diffusion_backbone("vit_small_patch16_224")
    with pytest.raises(ValueError, match="pass --pretrained"):
        load_diffusion_backbone("hf:stable-diffusion-v1-5/stable-diffusion-v1-5")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_diffusion_backbone("hf:stable-diffusion-v1-5/stable-diffusion-v1-5", weights=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_diffusion_backbone("hf:sd", weights=tmp_path / "empty")
    (tmp_path / "xl").mkdir()
    (tmp_path / "xl" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionXLPipeline", "unet": [], "text_encoder": [], "text_encoder_2": []}))
    with pytest.raises(ValueError, match="SDXL"):
        load_diffusion_backbone("hf:sdxl", weights=tmp_path / "xl")
    with pytest.raises(ValueError, match="SDXL"):
        load_diffusion_backbone("hf:stabilityai/stable-diffusion-xl-base-1.0", pretrained=True)
    with pytest.raises(FileNotFoundError, match="pretrain --arch sd"):
        load_diffusion_backbone(BUNDLED_SD, weights=tmp_path / "none.safetensors")
    assert is_diffusion_spec(BUNDLED_SD) and not is_diffusion_spec("vptune_vit_fmnist")
    assert is_diffusion_spec("hf:stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert not is_diffusion_spec("hf:dandelin/vilt-b32-mlm")


# ---- pretraining (vptune pretrain --arch sd) on the tiny model ---------------------------------

class Interrupted(Exception):
    pass


def _pretrain(tmp_path, folder, interrupt_at=None, **options):
    from vptune.diffusion import pretrain_sd

    backbone = tiny_random_backbone(0, init=honest_)
    calls = []
    real_loss = pretrain_sd.denoising_loss

    def loss(*args, **kwargs):
        calls.append(1)
        if interrupt_at is not None and len(calls) == interrupt_at + 1:
            raise Interrupted
        return real_loss(*args, **kwargs)

    pretrain_sd.denoising_loss = loss
    try:
        ema, record = pretrain_sd.pretrain_unet(
            backbone, checkpoint_path=tmp_path / folder / "ckpt.pt", steps=2, batch_size=3, warmup_steps=1,
            checkpoint_every=1, log_every=1, **options)
    finally:
        pretrain_sd.denoising_loss = real_loss
    return backbone, ema, record


def test_pretrain_resume_equals_uninterrupted(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    start = tiny_random_backbone(0, init=honest_).unet.state_dict()
    whole, whole_ema, record = _pretrain(tmp_path, "a")
    assert record["start"] == 0 and [step for step, _ in record["history"]] == [1, 2]
    with pytest.raises(Interrupted):
        _pretrain(tmp_path, "b", interrupt_at=1)  # killed during step 2, after step 1's checkpoint
    resumed, resumed_ema, again = _pretrain(tmp_path, "b")
    assert again["start"] == 1 and again["history"] == record["history"]
    for key, value in whole.unet.state_dict().items():
        torch.testing.assert_close(resumed.unet.state_dict()[key], value, rtol=0, atol=0)
        torch.testing.assert_close(resumed_ema.state_dict()[key], whole_ema.state_dict()[key], rtol=0, atol=0)
    changed = [key for key, value in whole.unet.state_dict().items() if not torch.equal(value, start[key])]
    assert len(changed) == len(start)  # every UNet tensor was trained
    assert all(not p.requires_grad for p in whole.text_encoder.parameters())  # the text encoder stayed frozen
    # another recipe does not resume from this checkpoint
    _, _, other = _pretrain(tmp_path, "b", lr=5e-4)
    assert other["start"] == 0


def test_pretrain_nan_loss_names_the_checkpoint(tmp_path, monkeypatch):
    from vptune.diffusion import pretrain_sd

    monkeypatch.setattr(pretrain_sd, "denoising_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(FloatingPointError, match="loss became nan at step 0.*ckpt.pt"):
        pretrain_sd.pretrain_unet(tiny_random_backbone(0), checkpoint_path=tmp_path / "ckpt.pt", steps=2, batch_size=2)


def test_canvas_batch_caption_dropout():
    from vptune.diffusion.pretrain_sd import canvas_batch

    images, captions = canvas_batch(np.random.default_rng(0), 40, 8, caption_dropout=0.5)
    assert images.shape == (40, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    dropped = sum(text == "" for text in captions)
    assert 8 <= dropped <= 32
    _, none = canvas_batch(np.random.default_rng(0), 40, 8, caption_dropout=0.0)
    assert all(none)


def test_held_out_subject(tmp_path):
    from vptune.data.scenes import POOLS
    from vptune.diffusion.subjects import subject_images, subject_index, write_subject_folder

    subject = subject_images(kind=8, count=4, seed=3)
    split, low, high = POOLS["test"]
    assert split == "test" and low <= subject.index < high  # Fashion-MNIST test split: never pretrained on
    assert subject.images.shape == (4, 32, 32) and subject.images.dtype == np.uint8
    assert all(len(s.items) == 1 and s.items[0].kind == 8 and s.items[0].rotation == 0 for s in subject.scenes)
    assert len({(s.items[0].place, s.items[0].size) for s in subject.scenes}) > 1  # varied places / sizes
    assert subject_index(8, 1) != subject.index
    paths = write_subject_folder(tmp_path / "subject", kind=8, count=3)
    assert [p.name for p in paths] == ["subject_0.png", "subject_1.png", "subject_2.png"]
    assert json.loads((tmp_path / "subject" / "subject.json").read_text())["index"] == subject.index
    with pytest.raises(ValueError, match="kind must be 0..9"):
        subject_index(10)


# ---- the bundled model and vptune generate --------------------------------------------------

needs_bundled = pytest.mark.skipif(not bb.bundled_sd_weights_path().is_file(),
                                   reason="the bundled text-to-image model is not created yet (vptune pretrain --arch sd)")


@needs_bundled
def test_bundled_model_loads_frozen():
    pytest.importorskip("open_clip")
    model = load_diffusion_backbone(BUNDLED_SD)
    assert all(not p.requires_grad for m in model.modules().values() for p in m.parameters())
    assert model.describe()["text_states"] == [48, 128] and model.describe()["latent"] == [1, 32]
    assert model.encode_prompt(["a photo of sks bag"]).shape == (1, 48, 128)


@needs_bundled
def test_generate_command_writes_a_grid(tmp_path):
    pytest.importorskip("open_clip")
    from PIL import Image
    from typer.testing import CliRunner

    from vptune.cli import app

    out = tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["generate", "--prompt", "a large bag at the center", "--prompt", "a photo of sks bag",
                                      "--num-images", "2", "--steps", "2", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "wrote" in said and "4 images of 32x32" in said
    assert Image.open(out).size == (2 * (128 + 2) + 2, 2 * (128 + 2 + 14) + 2)
    bad = CliRunner().invoke(app, ["generate", "--prompt", "x", "--backbone", "hf:stable-diffusion-v1-5/stable-diffusion-v1-5",
                                   "--out", str(out)])
    assert bad.exit_code == 1 and "pass --pretrained" in " ".join(bad.output.split())


def test_conditioning_loss_same_noise_for_every_text(tiny):
    from vptune.diffusion.pretrain_sd import conditioning_loss

    losses = conditioning_loss(tiny, count=8)
    assert set(losses) == {"own caption", "another canvas's caption", "empty prompt"}
    assert all(value > 0 for value in losses.values())
    assert losses == conditioning_loss(tiny, count=8)  # seeded: the same noise and timesteps
    assert len(set(losses.values())) == 3  # the texts differ, so do the losses
