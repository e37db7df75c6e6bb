"""Methods in a diffusers UNet's attention (vptune.backbones.unet), subject-driven generation runs
(vptune.diffusion.train) and their metrics, on a tiny random text-to-image model with honest weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from honest import honest_  # noqa: E402

from vptune.backbones.unet import UNetFamily, attention_modules  # noqa: E402
from vptune.diffusion import backbone as diffusion_backbone  # noqa: E402
from vptune.diffusion.backbone import tiny_random_backbone  # noqa: E402
from vptune.diffusion.model import TextToImage, tuned_parts  # noqa: E402
from vptune.methods import config_for  # noqa: E402
from vptune.model import PromptModel  # noqa: E402
from vptune.tasks import GenerationTask  # noqa: E402
from vptune.train import TrainConfig  # noqa: E402

PROMPT = "a photo of sks bag"


@pytest.fixture(scope="module")
def backbone():
    return tiny_random_backbone(0, init=honest_)


@pytest.fixture
def inputs(backbone):
    torch.manual_seed(1)
    latents = torch.randn(2, backbone.latent_channels, backbone.latent_size, backbone.latent_size)
    return latents, torch.tensor([3, 70]), backbone.encode_prompt([PROMPT, "a bag at the top-left"])


def make(backbone, method: str, sites: str = "both", **options) -> PromptModel:
    torch.manual_seed(0)
    return PromptModel(TextToImage(backbone, sites), config_for(method, **options), task=GenerationTask(PROMPT))


def perturb_(model: PromptModel, seed: int = 3) -> None:
    """Move every tuned tensor away from its initial value (APT's W2 = 0, LoRA's B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# --- sites and the processors ---------------------------------------------------------------


def test_sites_are_the_chosen_attention_kinds(backbone):
    everything = attention_modules(backbone.unet)
    for choice, kinds in (("self", {"self"}), ("cross", {"cross"}), ("both", {"self", "cross"})):
        family = UNetFamily(TextToImage(backbone, choice))
        assert {s.kind for s in family.sites} == kinds
        assert len(family.sites) == sum(1 for _, a in everything if ("cross" if a.is_cross_attention else "self") in kinds)
    cross = UNetFamily(TextToImage(backbone, "cross")).sites
    assert all(s.context_width == backbone.unet.config.cross_attention_dim == s.kv_width for s in cross)
    with pytest.raises(ValueError, match="sites must be one of self, cross, both"):
        UNetFamily(TextToImage(backbone, "spatial"))


def test_processors_without_a_method_compute_the_frozen_unet(backbone, inputs):
    latents, steps, text = inputs
    family = UNetFamily(TextToImage(backbone, "both"))
    with torch.no_grad():
        reference = backbone.unet(latents, steps, encoder_hidden_states=text).sample
        ours = family.predict_noise(config_for("linear").build(family), latents, steps, text)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def assert_same_outputs_and_grads(model, run_a, run_b):
    params = list(model.tuned_parameters().values())
    out_a = run_a()
    grads_a = torch.autograd.grad(out_a.square().sum(), params)
    out_b = run_b()
    grads_b = torch.autograd.grad(out_b.square().sum(), params)
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_kv_path_equals_appending_the_prompts_to_the_text_states(backbone, inputs):
    """One prompt set shared by every cross-attention site (shared=True) is exactly prompts appended
    to the text states the frozen UNet attends to: outputs and the prompts' gradients."""
    latents, steps, text = inputs
    for path in ("kv", "tokens"):
        model = make(backbone, "vpt-deep", "cross", num_prompts=3, shared=True, path=path)
        prompts = model.method.prompts(0, 1)  # (1, 3, 16): the one set

        def appended():
            states = torch.cat([text, model.method.prompts(0, 1).expand(len(text), -1, -1)], dim=1)
            return backbone.unet(latents, steps, encoder_hidden_states=states).sample

        assert prompts.shape == (1, 3, backbone.unet.config.cross_attention_dim)
        assert_same_outputs_and_grads(model, lambda: model.family.predict_noise(model.method, latents, steps, text), appended)


def test_kv_path_equals_tokens_path_per_site_prompts(backbone, inputs):
    latents, steps, text = inputs
    kv = make(backbone, "vpt-deep", "both", num_prompts=4)
    tokens = make(backbone, "vpt-deep", "both", num_prompts=4, path="tokens")
    tokens.load_tuned_state_dict(kv.tuned_state_dict())
    out = lambda m: m.family.predict_noise(m.method, latents, steps, text)  # noqa: E731
    torch.testing.assert_close(out(kv), out(tokens), rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(out(m).square().sum(), list(m.tuned_parameters().values())) for m in (kv, tokens)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    kv.eval()
    with torch.no_grad():  # at inference the prompt keys/values come from the cache, filled by the first call
        first, second = out(kv), out(kv)
    assert kv.method.kv_cache
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, out(tokens).detach(), rtol=1e-5, atol=1e-6)


def test_apt_adds_its_term_to_each_chosen_attention_output(backbone, inputs):
    """APT's term (docs/methods.md, "APT: approximated prompt tuning") checked against an
    independent transcription with torch hooks on the frozen UNet: u is what enters to_q, a what
    leaves to_out[0]."""
    latents, steps, text = inputs
    for sites in ("self", "cross", "both"):
        model = make(backbone, "apt", sites, num_prompts=5, rank=2)
        perturb_(model)
        method, handles = model.method, []
        for index, (_, attn) in enumerate(model.family.site_modules):
            seen = {}
            handles.append(attn.to_q.register_forward_pre_hook(lambda m, args, seen=seen: seen.update(u=args[0])))

            def term(module, args, a, seen=seen, i=index):
                P = method.site_parameter("prompt_embeddings", i)
                P_hat = P + P @ method.site_parameter("down", i) @ method.site_parameter("up", i)
                A = torch.relu(seen["u"] @ P_hat.T)
                w = A.max(dim=-1, keepdim=True).values.detach()
                return (a + w * (A @ P)) * method.site_parameter("log_scale", i).exp()

            handles.append(attn.to_out[0].register_forward_hook(term))
        try:
            reference = backbone.unet(latents, steps, encoder_hidden_states=text).sample
        finally:
            for handle in handles:
                handle.remove()
        ours = model.family.predict_noise(method, latents, steps, text)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(ours, backbone.unet(latents, steps, encoder_hidden_states=text).sample, atol=1e-4)


def test_processors_do_not_leak_between_runs_sharing_the_unet(backbone, inputs):
    latents, steps, text = inputs
    own = {name: attn.processor for name, attn in attention_modules(backbone.unet)}
    apt = make(backbone, "apt", "both")
    perturb_(apt)
    apt.family.predict_noise(apt.method, latents, steps, text)
    with pytest.raises(RuntimeError, match="boom"):
        with apt.family.hooks(apt.method):
            raise RuntimeError("boom")
    assert {name: attn.processor for name, attn in attention_modules(backbone.unet)} == own
    prompts = make(backbone, "vpt-deep", "cross", num_prompts=2)
    alone = prompts.family.predict_noise(prompts.method, latents, steps, text)
    fresh = make(backbone, "vpt-deep", "cross", num_prompts=2)  # same seed: same prompts, no APT anywhere
    torch.testing.assert_close(alone, fresh.family.predict_noise(fresh.method, latents, steps, text), rtol=0, atol=0)


# --- what is tuned ----------------------------------------------------------------------------


def lora_count(family, rank: int) -> int:
    total = 0
    for _, attn in family.site_modules:
        for linear in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            total += rank * (linear.in_features + linear.out_features)
    return total


@pytest.mark.parametrize("method,sites,options", [
    ("apt", "cross", {"num_prompts": 5, "rank": 2}), ("apt", "both", {"num_prompts": 5, "rank": 2}),
    ("vpt-deep", "cross", {"num_prompts": 3}), ("e2vpt", "cross", {"num_prompts": 2, "num_kv_prompts": 2}),
    ("lora", "both", {"rank": 2}), ("full", "both", {}), ("textual-inversion", "both", {"init_word": "bag"}),
])
def test_counts_grads_and_the_frozen_backbone(backbone, method, sites, options):
    before = {name: state(module) for name, module in backbone.modules().items()}
    model = make(backbone, method, sites, **options)
    perturb_(model)
    family, sites_list = model.family, model.family.sites
    expected = {
        "apt": lambda: sum(options["num_prompts"] * s.width + 2 * s.width * options["rank"] + 1 for s in sites_list),
        "vpt-deep": lambda: sum(options["num_prompts"] * s.kv_width for s in sites_list),
        "e2vpt": lambda: sum(options["num_prompts"] * s.kv_width + 2 * options["num_kv_prompts"] * s.num_heads * s.head_dim
                             for s in sites_list),
        "lora": lambda: lora_count(family, options["rank"]),
        "full": lambda: sum(p.numel() for p in backbone.unet.parameters()),
        "textual-inversion": lambda: backbone.text_encoder.width,
    }[method]()
    assert model.num_tuned_parameters() == expected
    assert model.num_backbone_parameters() == sum(p.numel() for p in backbone.unet.parameters())
    batch = {"image": torch.rand(2, 1, 8, 8), "prompt": [PROMPT] * 2, "weight": torch.ones(2)}
    model.train()
    loss = model.task.loss(model(batch), batch)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    torch.optim.SGD(model.tuned_parameters().values(), lr=1.0).step()
    for name, module in backbone.modules().items():  # the shared model, bitwise
        after = module.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before[name].items()), name
        assert not any(p.requires_grad for p in module.parameters()), name
    if method in ("full", "lora"):
        assert model.backbone.unet is not backbone.unet and model.backbone.text_encoder is backbone.text_encoder
    else:
        assert model.backbone.unet is backbone.unet


def test_textual_inversion_changes_only_the_identifier(backbone):
    model = make(backbone, "textual-inversion", init_word="bag")
    family, method = model.family, model.method
    bag = backbone.text_encoder.token_embedding.weight[family.token_id("bag")]
    assert torch.equal(method.embedding[0], bag)  # v* starts at the descriptor's embedding
    with torch.no_grad():
        method.embedding.add_(0.5)
        plain = backbone.encode_prompt(["a photo of a bag", PROMPT])
        tuned = family.encode_prompt(["a photo of a bag", PROMPT], method)
    torch.testing.assert_close(tuned[0], plain[0], rtol=0, atol=0)  # no identifier: unchanged
    assert not torch.allclose(tuned[1], plain[1])
    with pytest.raises(ValueError, match="'zzyzx' is not in this text encoder's vocabulary"):
        make(backbone, "textual-inversion", token="zzyzx")
    with pytest.raises(ValueError, match="token must be one word"):
        make(backbone, "textual-inversion", token="a bag")


# --- generation runs -----------------------------------------------------------------------


@pytest.fixture
def subject(tmp_path):
    from PIL import Image

    folder = tmp_path / "subject"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        pixels = (torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def tiny_loader(backbone, monkeypatch):
    monkeypatch.setattr(diffusion_backbone, "load_diffusion_backbone", lambda spec, **kw: backbone)


def train(subject, out, method="apt", epochs=2, **kw):
    from vptune.diffusion.train import train_generation_run

    cfg = TrainConfig(epochs=epochs, batch_size=4, lr=kw.pop("lr", 1e-3), optimizer="adamw", warmup_epochs=0)
    return train_generation_run("tiny", method, kw.pop("options", {}), f"subject:{subject}", out, cfg, prompt=kw.pop("prompt", PROMPT),
                                repeats=2, progress=False, **kw)


def test_run_folder_round_trip_and_generation(tiny_loader, backbone, subject, tmp_path, inputs):
    from vptune.diffusion.sample import generate
    from vptune.diffusion.train import load_generation_run

    out = tmp_path / "run"
    metrics = train(subject, out, class_images=2, prior_weight=0.5)
    assert metrics["train_images"] == 2 * (3 + 2) and metrics["tuned_params"] > 0 and metrics["extra_gflops"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "curve.csv", "metrics.json", "model.safetensors"]
    saved = load_file(str(out / "model.safetensors"))
    assert all(name.startswith("method.") for name in saved)  # the tuned tensors only
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == {"name": "generation", "instance_prompt": PROMPT, "identifier": "sks",
                              "class_prompt": "a photo of bag", "prior_weight": 0.5, "class_images": 2}
    loaded = load_generation_run(out)
    loaded.eval()
    latents, steps, text = inputs
    for name, tensor in saved.items():
        assert torch.equal(loaded.tuned_state_dict()[name], tensor)
    with torch.no_grad():
        ours = loaded.family.predict_noise(loaded.method, latents, steps, text)
        frozen = backbone.unet(latents, steps, encoder_hidden_states=text).sample
    assert not torch.allclose(ours, frozen)
    images = generate(backbone, [PROMPT], num_images=2, steps=3, **tuned_parts(loaded))
    plain = generate(backbone, [PROMPT], num_images=2, steps=3)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all() and not torch.equal(images, plain)


def test_resume_after_interruption_is_exact(tiny_loader, subject, tmp_path):
    straight = tmp_path / "straight"
    train(subject, straight, epochs=3, method="vpt-deep", options={"num_prompts": 2})

    def stop(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(subject, killed, epochs=3, method="vpt-deep", options={"num_prompts": 2}, on_epoch_end=stop)
    assert (killed / "checkpoint.pt").is_file()
    with pytest.raises(ValueError, match="other settings .*instance_prompt 'a photo of sks bag' vs 'a photo of sks sneaker'"):
        train(subject, killed, epochs=3, method="vpt-deep", options={"num_prompts": 2}, prompt="a photo of sks sneaker",
              resume=True)
    train(subject, killed, epochs=3, method="vpt-deep", options={"num_prompts": 2}, resume=True)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_keeps_the_last_checkpoint_and_resumes(tiny_loader, subject, tmp_path, monkeypatch):
    from vptune.train import loop
    from vptune.train.loop import NonFiniteLossError

    models = []
    fit = loop.fit
    monkeypatch.setattr(loop, "fit", lambda model, *a, **k: models.append(model) or fit(model, *a, **k))

    def diverge(record):  # after epoch 1 is saved, the tuned word blows up
        if record["epoch"] == 1:
            with torch.no_grad():
                models[-1].method.embedding.fill_(float("nan"))

    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"became nan in epoch 2 .*checkpoint .* \(after epoch 1\) is kept"):
        train(subject, out, epochs=2, method="textual-inversion", on_epoch_end=diverge)
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "model.safetensors")).values())
    metrics = train(subject, out, epochs=2, method="textual-inversion", resume=True)
    assert metrics["epochs"] == 2 and metrics["train_loss"] == metrics["train_loss"]  # finite, not NaN


def test_bad_subject_folders_and_prompts(tiny_loader, subject, tmp_path):
    from PIL import Image

    from vptune.diffusion.train import subject_images

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no image"):
        subject_images(empty, 8, 1)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read .*a.png"):
        subject_images(broken, 8, 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        subject_images(tmp_path / "missing", 8, 1)
    Image.new("L", (12, 10), 128).save(subject / "wide.png")  # mixed sizes: resized, with a note
    images, names, notes = subject_images(subject, 8, 1)
    assert images.shape == (4, 1, 8, 8) and "wide.png" in names
    assert len(notes) == 1 and "mixed sizes" in notes[0] and "resized to 8x8" in notes[0]
    with pytest.raises(ValueError, match="does not contain the identifier 'sks'"):
        train(subject, tmp_path / "x", prompt="a photo of a bag")
    assert not (tmp_path / "x").exists()  # nothing written


def test_a_run_on_another_pipeline_is_refused(tiny_loader, subject, tmp_path, monkeypatch):
    from vptune.diffusion.train import load_generation_run

    out = tmp_path / "run"
    train(subject, out, epochs=1)
    other = tiny_random_backbone(1, vae=True, init=honest_)
    monkeypatch.setattr(diffusion_backbone, "load_diffusion_backbone", lambda spec, **kw: other)
    with pytest.raises(ValueError, match="pass --backbone"):
        load_generation_run(out)


def test_extra_flops_per_step(tiny_loader, backbone):
    from vptune.diffusion.train import extra_gflops_per_step

    assert extra_gflops_per_step(make(backbone, "textual-inversion")) == 0
    assert extra_gflops_per_step(make(backbone, "full")) == 0
    apt_cross, apt_both = extra_gflops_per_step(make(backbone, "apt", "cross")), extra_gflops_per_step(make(backbone, "apt", "both"))
    assert 0 < apt_cross < apt_both
    assert extra_gflops_per_step(make(backbone, "lora", rank=2)) > 0


def test_fidelity_metrics(backbone):
    from vptune.diffusion.metrics import prompt_fidelity, subject_fidelity

    a = torch.nn.functional.normalize(torch.randn(3, 5), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(2, 5), dim=-1)
    assert subject_fidelity(a, b) == pytest.approx(sum(float(x @ y) for x in a for y in b) / 6, abs=1e-6)
    assert subject_fidelity(a, a[:1]) < 1 and prompt_fidelity(a, a) == pytest.approx(1.0, abs=1e-6)


def test_command_line_refuses_bad_subject_runs(subject, tmp_path):
    from typer.testing import CliRunner

    from vptune.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    base = ["train", "--method", "apt", "--data", f"subject:{subject}", "--out", str(out)]
    result = runner.invoke(app, base)
    assert result.exit_code == 1 and "needs --prompt" in result.output
    result = runner.invoke(app, base + ["--prompt", "a photo of a bag"])
    assert result.exit_code == 1 and "does not contain the identifier 'sks'" in result.output
    assert not out.exists()
    result = runner.invoke(app, ["train", "--method", "apt", "--data", "mini:count", "--out", str(out), "--sites", "cross"])
    assert result.exit_code == 1 and "--sites belong to subject-driven generation" in result.output
    classification = tmp_path / "classification"
    classification.mkdir()
    (classification / "config.json").write_text(json.dumps({"method_config": {"method": "linear"}, "num_classes": 2, "backbone": {}}))
    result = runner.invoke(app, ["generate", "--run", str(classification), "--prompt", PROMPT])
    assert result.exit_code == 1 and "is not a generation run" in result.output


def test_generate_and_eval_commands_on_a_generation_run(tiny_loader, subject, tmp_path):
    from typer.testing import CliRunner

    from vptune.cli import app

    run = tmp_path / "run"
    train(subject, run, epochs=1, method="lora", options={"rank": 2})
    runner = CliRunner()
    grid = tmp_path / "grid.png"
    result = runner.invoke(app, ["generate", "--run", str(run), "--prompt", PROMPT, "--num-images", "2", "--steps", "2",
                                 "--out", str(grid), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert grid.is_file() and "run" in result.output
    scores = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--run", str(run), "--num-images", "1", "--steps", "2", "--json", str(scores),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(scores.read_text())
    assert len(data["prompts"]) == len(data["per_prompt"]) == 4 and all("sks bag" in p for p in data["prompts"])
    assert all(-1 <= data[k] <= 1 for k in ("subject_dino", "subject_clip", "prompt_clip"))
    assert data["dino"] == "vptune_vit_fmnist" and data["clip"] == "vptune_clip_fmnist"
