"""The ViLT family (transformers' ViltModel) on a tiny random config with honest weights: the
walk is ViltModel's own forward, APT sits where the official code puts it (checked against a
literal transcription of its module), the exact key-value path equals the tokens path, the
vision-language heads and losses, save/load, and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import vptune
import vptune.backbones.loading
import vptune.backbones.vilt
from vptune.backbones.family import family_of
from vptune.methods import Method
from vptune.model import PromptModel
from vptune.tasks import NLVRTask, RetrievalTask, VQATask

from conftest import assert_same_logits_and_grads
from honest import honest_

transformers = pytest.importorskip("transformers")

D, T, SIDE, PATCH = 32, 10, 32, 8


def tiny_vilt(seed: int = 0, dropout: float = 0.0, attention_dropout: float = 0.0) -> nn.Module:
    config = transformers.ViltConfig(
        hidden_size=D, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=SIDE,
        patch_size=PATCH, max_image_length=-1, vocab_size=50, max_position_embeddings=12, modality_type_vocab_size=2,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=attention_dropout)
    torch.manual_seed(seed)
    model = transformers.ViltModel(config).eval()
    return honest_(model, seed=seed)


def tiny_vit() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=SIDE, patch_size=PATCH, depth=2, embed_dim=D, num_heads=4).eval()


def batch(n: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    """Image-text pairs with text padding of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[0, 6:] = 0
    mask[-1, 8:] = 0
    ids[mask == 0] = 0
    return {"image": torch.randn(n, 3, SIDE, SIDE, generator=g), "input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def vilt():
    return tiny_vilt()


def test_the_walk_without_a_method_is_vilts_own_forward(vilt):
    inputs = batch()
    n = inputs["image"].shape[0]
    torch.manual_seed(5)
    ref = vilt(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["image"])
    torch.manual_seed(5)  # the same random patch order as ViltModel drew
    _, _, (index, _) = vilt.embeddings.visual_embed(inputs["image"], torch.ones(n, SIDE, SIDE, dtype=torch.long), max_image_length=-1)
    family = family_of(vilt)
    x, aux = family.embed(inputs)
    x = family.run_blocks(x, aux, Method())
    torch.testing.assert_close(family.pooled_features(x), ref.pooler_output, atol=1e-6, rtol=1e-5)
    ours = vilt.layernorm(x)
    order = (index[..., 0] * (SIDE // PATCH) + index[..., 1]).argsort(1)
    patches = ref.last_hidden_state[:, T + 1:].gather(1, order[..., None].expand(-1, -1, D))
    torch.testing.assert_close(ours[:, : T + 1], ref.last_hidden_state[:, : T + 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[:, T + 1:], patches, atol=1e-5, rtol=1e-5)
    # text padding matters: the walk must mask it
    unmasked = dict(inputs, attention_mask=torch.ones_like(inputs["attention_mask"]))
    assert not torch.allclose(family.features(unmasked, Method())[0], family.features(inputs, Method())[0], atol=1e-4)
    # the order of the patches is fixed (visual_embed's own draw is random)
    torch.testing.assert_close(family.embed(inputs)[0], family.embed(inputs)[0], atol=0, rtol=0)


# --- APT against the official code -------------------------------------------------------

class ApproximatePrompt(nn.Module):
    """Literal transcription of ``approximate_prompt`` from DoubtedSteam/APT,
    ViLT/vilt/modules/vision_transformer_apt.py (the commented-out variants left out)."""

    def __init__(self, num_heads, dim_feature, hid_feature, tot_memory, attn_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.tot_memory = tot_memory
        self.hidden = hid_feature
        self.mm = nn.Sequential(
            nn.Linear(dim_feature, self.hidden, bias=False),
            nn.Linear(self.hidden, dim_feature, bias=False),
        )
        nn.init.normal_(self.mm[0].weight.data, mean=0, std=1.00)
        nn.init.constant_(self.mm[1].weight.data, 0)
        self.mm_tokens = nn.Parameter(torch.FloatTensor(self.tot_memory, dim_feature))
        nn.init.normal_(self.mm_tokens.data, mean=0, std=0.02)
        self.activation = nn.ReLU(inplace=True)
        self.attn_drop = nn.Dropout(p=attn_drop)
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x, res):
        B, N, C = x.shape
        mm_tokens = self.mm_tokens
        attn = res @ (mm_tokens + self.mm(mm_tokens)).t()
        attn = self.activation(attn)
        attn = self.attn_drop(attn)
        e = attn @ mm_tokens
        weights = attn.max(dim=-1, keepdim=True)[0].clone().detach()
        x = x + e * weights
        x = x * self.scale.exp()
        return x


def official_apt_block(layer, apt: ApproximatePrompt, x, mask):
    """The official ViLT APT ``Block.forward`` and ``Attention.forward`` (same file), on the
    HF layer's weights: ``_x = attn(norm1(x))`` with ``x = proj(attn @ v); x = APT(x, res);
    x = proj_drop(x)``, then ``x + _x`` and the MLP. (timm's fused qkv is HF's query/key/value.)"""
    self_attn, out = layer.attention.attention, layer.attention.output
    res = h = layer.layernorm_before(x)
    B, N, C = h.shape
    H = self_attn.num_attention_heads
    qkv = torch.cat([self_attn.query(h), self_attn.key(h), self_attn.value(h)], -1).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (C // H) ** -0.5
    attn = attn.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    attn = self_attn.dropout(attn.softmax(dim=-1))
    h = (attn @ v).transpose(1, 2).reshape(B, N, C)
    h = out.dense(h)
    h = apt(h, res)
    h = out.dropout(h)
    x = x + h
    return layer.output(layer.intermediate(layer.layernorm_after(x)), x)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_apt_is_the_official_module_after_the_output_projection(mode):
    backbone = tiny_vilt(dropout=0.2 if mode == "train" else 0.0)
    torch.manual_seed(3)
    model = PromptModel(backbone, vptune.config_for("apt", num_prompts=7, rank=3), task=VQATask(["a", "b", "c"]))
    method = model.method
    with torch.no_grad():  # away from the identity initialisation
        method.up.normal_(0, 0.1)
        method.log_scale.uniform_(-0.3, 0.3)
    officials = []
    for i in range(3):
        apt = ApproximatePrompt(4, D, 3, 7)
        with torch.no_grad():
            apt.mm_tokens.copy_(method.prompt_embeddings[i])
            apt.mm[0].weight.copy_(method.down[i].T)
            apt.mm[1].weight.copy_(method.up[i].T)
            apt.scale.copy_(method.log_scale[i].reshape(1))
        officials.append(apt)
    model.train(mode == "train")
    assert model.backbone.training == (mode == "train")  # ViLT's recipe: its dropout on while training
    inputs = batch()
    family = model.family
    torch.manual_seed(11)
    ours = family.run_blocks(*family.embed(inputs), method)  # every token: dropout draws the same masks
    torch.manual_seed(11)  # the same dropout draws, in the same order, if APT sits before the output dropout
    x, aux = family.embed(inputs)
    keep = torch.isfinite(aux)
    for layer, apt in zip(family.blocks, officials):
        x = official_apt_block(layer, apt, x, keep)
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)
    if mode == "eval":
        torch.testing.assert_close(model.encode(inputs), family.pooled_features(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("own", [None, 0.25])
def test_apt_drops_out_a_as_the_official_module(own):
    """The official module drops out A with its block's attention-dropout probability while
    training and takes w after the dropout: by default vptune's APT follows the site's own
    attention dropout (ViLT's config), ``dropout`` sets another, and evaluation has none."""
    backbone = tiny_vilt(attention_dropout=0.4)
    model = PromptModel(backbone, vptune.config_for("apt", num_prompts=7, rank=3, dropout=own), task=VQATask(["a"]))
    method = model.method
    assert method.dropouts == [0.4 if own is None else own] * 3
    with torch.no_grad():
        method.up.normal_(0, 0.1)
        method.log_scale.uniform_(-0.3, 0.3)
    apt = ApproximatePrompt(4, D, 3, 7, attn_drop=0.4 if own is None else own)
    with torch.no_grad():
        apt.mm_tokens.copy_(method.prompt_embeddings[1])
        apt.mm[0].weight.copy_(method.down[1].T)
        apt.mm[1].weight.copy_(method.up[1].T)
        apt.scale.copy_(method.log_scale[1].reshape(1))
    g = torch.Generator().manual_seed(4)
    u, a = torch.randn(2, 5, D, generator=g), torch.randn(2, 5, D, generator=g)
    for training in (True, False):
        method.train(training), apt.train(training)
        torch.manual_seed(12)
        ours = method.approximate(1, u, a)
        torch.manual_seed(12)
        torch.testing.assert_close(ours, apt(a.clone(), u), atol=1e-5, rtol=1e-5)
    method.train()
    torch.manual_seed(12)
    dropped = method.approximate(1, u, a)
    method.eval()
    assert not torch.allclose(dropped, method.approximate(1, u, a))  # the dropout is real, and off in evaluation
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        vptune.config_for("apt", dropout=1.0)


def test_apt_paper_size_and_its_trained_set(vilt):
    model = PromptModel(vilt, vptune.config_for("apt", num_prompts=200, rank=4), task=VQATask(["yes", "no"]))
    tuned = model.tuned_parameters()
    L = 3
    assert tuned["method.prompt_embeddings"].shape == (L, 200, D)
    apt = L * (200 * D + D * 4 + 4 * D + 1)
    pooler, types = D * D + D, 2 * D
    head = sum(p.numel() for p in model.head.parameters())
    assert model.num_tuned_parameters() == apt + pooler + types + head
    assert {name.split(".")[0] for name in tuned} == {"method", "also_tuned", "head"}
    assert set(name for name in tuned if name.startswith("also_tuned")) == {
        "also_tuned.pooler.dense.weight", "also_tuned.pooler.dense.bias", "also_tuned.embeddings__token_type_embeddings.weight"}


def test_the_shared_backbone_is_never_trained():
    backbone = tiny_vilt()
    before = copy.deepcopy(backbone.state_dict())
    model = PromptModel(backbone, vptune.config_for("apt", num_prompts=4), task=VQATask(["a", "b"]))
    optimizer = torch.optim.SGD(model.tuned_parameters().values(), lr=1.0)
    inputs = batch()
    inputs["vqa_targets"] = torch.tensor([[1.0, 0.0], [0.3, 1.0], [0.0, 0.6]])
    model.train()
    model.task.loss(model(inputs), inputs).backward()
    optimizer.step()
    assert model.also_tuned["pooler"].dense.weight.grad.abs().max() > 0
    assert model.also_tuned["embeddings__token_type_embeddings"].weight.grad.abs().max() > 0
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, before[name]), name


# --- the exact key-value path ------------------------------------------------------------

def logits_and_grads(model: PromptModel, inputs):
    logits = model(inputs)
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.tuned_parameters().items()}


@pytest.mark.parametrize("method", ["vpt-deep", "e2vpt"])
def test_kv_path_equals_tokens_path(vilt, method):
    inputs = batch()
    results = []
    for path in ("kv", "tokens"):
        torch.manual_seed(3)
        if method == "vpt-deep":
            config = vptune.config_for("vpt-deep", num_prompts=5, path=path)
        else:
            config = vptune.config_for("e2vpt", num_prompts=4, num_kv_prompts=3, dropout=0.0, path=path)
        model = PromptModel(vilt, config, task=VQATask(["a", "b", "c", "d"])).eval()
        honest_(model.head, seed=4)
        results.append(logits_and_grads(model, inputs))
    assert_same_logits_and_grads(*results)


def test_deep_prompts_are_the_official_appended_keys(vilt):
    """The official deep-prompt baseline appends 200 prompts per layer to the sequence (mask 1)
    and drops their queries; prompts have no position, so where they sit does not matter."""
    model = PromptModel(vilt, vptune.config_for("vpt-deep", num_prompts=6), task=VQATask(["a", "b"])).eval()
    inputs = batch()
    family = model.family
    x, aux = family.embed(inputs)
    keep = torch.isfinite(aux)
    prompts = model.method.prompt_embeddings
    for i, layer in enumerate(family.blocks):
        h = torch.cat([x, prompts[i].expand(x.shape[0], -1, -1)], dim=1)
        mask = torch.cat([keep, torch.ones(x.shape[0], prompts.shape[1], dtype=torch.bool)], dim=1)
        h = layer.layernorm_before(h)
        self_attn = layer.attention.attention
        B, N, C = h.shape
        q = self_attn.query(h[:, : x.shape[1]]).reshape(B, -1, 4, C // 4).transpose(1, 2)
        k = self_attn.key(h).reshape(B, N, 4, C // 4).transpose(1, 2)
        v = self_attn.value(h).reshape(B, N, 4, C // 4).transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * (C // 4) ** -0.5).masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
        x = x + layer.attention.output.dense((attn @ v).transpose(1, 2).reshape(B, -1, C))
        x = layer.output(layer.intermediate(layer.layernorm_after(x)), x)
    torch.testing.assert_close(model.encode(inputs), family.pooled_features(x), atol=1e-5, rtol=1e-5)


# --- every method ----------------------------------------------------------------------------

METHODS = {
    "linear": {}, "full": {}, "vpt-shallow": {"num_prompts": 3}, "vpt-deep": {"num_prompts": 3},
    "e2vpt": {"num_prompts": 3, "num_kv_prompts": 2}, "apt": {"num_prompts": 5}, "lora": {"rank": 2},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_round_trips(vilt, method, tmp_path):
    torch.manual_seed(0)
    model = PromptModel(vilt, vptune.config_for(method, **METHODS[method]), task=VQATask(["a", "b", "c"]))
    inputs = batch()
    inputs["vqa_targets"] = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.6, 1.0], [0.0, 0.0, 1.0]])
    model.train()
    loss = model.task.loss(model(inputs), inputs)
    loss.backward()
    tuned = model.tuned_parameters()
    assert all(p.grad is not None for p in tuned.values())
    if method == "lora":
        adapted = {n.split(".lora_")[0] for n in tuned if ".lora_" in n}
        assert adapted == {f"backbone.encoder.layer.{i}.attention.{part}" for i in range(3)
                           for part in ("attention.query", "attention.key", "attention.value", "output.dense")}
    if method == "full":
        assert not model.also_tuned  # the pooler and token types are tuned in the private copy already
    else:
        assert set(model.also_tuned) == {"pooler", "embeddings__token_type_embeddings"}
    with torch.no_grad():
        for p in tuned.values():
            p.add_(torch.randn_like(p) * 0.01)
    model.eval()
    expected = model(inputs)
    model.save_pretrained(tmp_path)
    loaded = PromptModel.from_pretrained(vilt, tmp_path).eval()
    assert isinstance(loaded.task, VQATask) and loaded.task.answers == ["a", "b", "c"]
    assert loaded.backbone_train_mode
    torch.testing.assert_close(loaded(inputs), expected, atol=0, rtol=0)


def test_backbone_train_mode_is_an_option(vilt):
    model = PromptModel(vilt, vptune.config_for("apt", num_prompts=2), task=VQATask(["a"]), backbone_train_mode=False)
    model.train()
    assert not model.backbone.training
    assert PromptModel(vilt, vptune.config_for("linear"), task=VQATask(["a"])).train().backbone.training
    vit = tiny_vit()
    assert not PromptModel(vit, vptune.config_for("linear"), 3).train().backbone.training


# --- tasks -----------------------------------------------------------------------------------

def test_nlvr_encodes_each_image_with_the_text_as_token_type_1_then_2(vilt):
    torch.manual_seed(0)
    model = PromptModel(vilt, vptune.config_for("apt", num_prompts=3), task=NLVRTask()).eval()
    types = model.also_tuned["embeddings__token_type_embeddings"].weight
    assert types.shape == (3, D)
    torch.testing.assert_close(types[2], vilt.embeddings.token_type_embeddings.weight[1])  # ViLT's start
    with torch.no_grad():
        types[2].add_(torch.randn(D) * 0.5)  # (a constant shift would vanish in the LayerNorms)
    pair = batch()
    pair["image0"], pair["image1"] = pair.pop("image"), torch.randn(3, 3, SIDE, SIDE)
    pair["label"] = torch.tensor([0, 1, 1])
    logits = model(pair)
    assert logits.shape == (3, 2)
    first = model.encode({**pair, "image": pair["image0"], "image_token_type_idx": 1})
    second = model.encode({**pair, "image": pair["image1"], "image_token_type_idx": 2})
    torch.testing.assert_close(logits, model.head(first, second))
    assert not torch.allclose(second, model.encode({**pair, "image": pair["image1"], "image_token_type_idx": 1}))
    assert model.task.loss(logits, pair).isfinite()
    assert set(model.task.metrics(logits, pair)) == {"test_top1", "test_loss"}


def test_retrieval_scores_each_text_against_its_images(vilt):
    model = PromptModel(vilt, vptune.config_for("vpt-deep", num_prompts=2), task=RetrievalTask()).eval()
    inputs = batch()
    images = torch.randn(3, 4, 3, SIDE, SIDE)
    scores = model({**inputs, "image": images})
    assert scores.shape == (3, 4)
    one = model({"image": images[1, 2:3], "input_ids": inputs["input_ids"][1:2], "attention_mask": inputs["attention_mask"][1:2]})
    torch.testing.assert_close(scores[1, 2], one[0, 0], atol=1e-5, rtol=1e-5)
    assert model.task.loss(scores, inputs).isfinite()


# --- refusals and bad input -----------------------------------------------------------------

def test_a_vilt_run_is_refused_on_a_vit_and_back(vilt, tmp_path):
    PromptModel(vilt, vptune.config_for("apt", num_prompts=2), task=VQATask(["a"])).save_pretrained(tmp_path / "vilt")
    vit = tiny_vit()
    with pytest.raises(ValueError, match="vilt family"):
        PromptModel.from_pretrained(vit, tmp_path / "vilt")
    PromptModel(vit, vptune.config_for("apt", num_prompts=2), 3).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="vit family"):
        PromptModel.from_pretrained(vilt, tmp_path / "vit")


def test_bad_input_is_a_clear_error(vilt):
    model = PromptModel(vilt, vptune.config_for("linear"), task=VQATask(["a"]))
    inputs = batch()
    with pytest.raises(ValueError, match="no image"):
        model({k: v for k, v in inputs.items() if k != "image"})
    with pytest.raises(TypeError, match="needs text"):
        model(inputs["image"])
    too_long = dict(inputs, input_ids=torch.ones(3, 13, dtype=torch.long), attention_mask=torch.ones(3, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="at most 12"):
        model(too_long)
    vit = PromptModel(tiny_vit(), vptune.config_for("linear"), task=VQATask(["a"]))
    with pytest.raises(ValueError, match="reads images only"):
        vit(inputs)


def test_load_backbone_reads_a_local_vilt(vilt, tmp_path):
    from safetensors.torch import save_file

    vilt.save_pretrained(tmp_path / "folder")
    loaded = vptune.backbones.loading.load_backbone("hf:dandelin/vilt-b32-mlm", weights=tmp_path / "folder")
    assert family_of(loaded).fingerprint() == family_of(vilt).fingerprint()
    inputs = batch()
    torch.testing.assert_close(family_of(loaded).features(inputs, Method()), family_of(vilt).features(inputs, Method()))
    model = transformers.ViltModel(vilt.config)
    state = {f"vilt.{k}": v for k, v in vilt.state_dict().items()}  # a ViltFor* checkpoint
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    vptune.backbones.vilt.load_vilt_state(model, tmp_path / "w.safetensors")
    assert torch.equal(model.pooler.dense.weight, vilt.pooler.dense.weight)
    del state["vilt.pooler.dense.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="missing: pooler.dense.weight"):
        vptune.backbones.vilt.load_vilt_state(model, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="random weights need a config"):
        vptune.backbones.loading.load_backbone("hf:dandelin/vilt-b32-mlm")


# --- training, evaluation and prediction through the task ------------------------------------

def vilt_folder(tmp_path, text_length: int = 48):
    """A tiny ViLT saved as transformers does, whose text length fits the word tokenizer."""
    config = transformers.ViltConfig(
        hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=SIDE, patch_size=PATCH,
        max_image_length=-1, vocab_size=120, max_position_embeddings=text_length, modality_type_vocab_size=2)
    torch.manual_seed(0)
    honest_(transformers.ViltModel(config)).save_pretrained(tmp_path / "vilt")
    return tmp_path / "vilt"


def test_train_eval_predict_a_vqa_run_from_the_command_line(tmp_path):
    import json

    from PIL import Image
    from typer.testing import CliRunner

    from vptune.cli import app
    from vptune.data import minivl

    folder, run = vilt_folder(tmp_path), tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--backbone", "hf:tiny", "--weights", str(folder), "--method", "apt", "--num-prompts", "4",
                                 "--data", "minivl:vqa", "--out", str(run), "--epochs", "1", "--batch-size", "100",
                                 "--optimizer", "adamw", "--lr", "1e-3"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "vqa" and 0 <= metrics["test_vqa_score"] <= 100
    assert metrics["tuned_params"] == sum(
        p.numel() for p in PromptModel.from_pretrained(vptune.backbones.loading.load_backbone("hf:x", weights=folder), run).tuned_parameters().values())
    assert metrics["extra_gflops"] > 0
    config = json.loads((run / "config.json").read_text())
    assert config["task"]["name"] == "vqa" and config["backbone_train_mode"] is True
    assert config["metadata"]["tokenizer"] == "word"
    assert "val_vqa_score" in (run / "curve.csv").read_text().splitlines()[0]

    result = runner.invoke(app, ["eval", "--run", str(run), "--data", "minivl:vqa"])
    assert result.exit_code == 0, result.output
    assert f"vqa_score {metrics['test_vqa_score']:.2f}" in result.output

    Image.fromarray(minivl.load("vqa")["test"].images[0]).save(tmp_path / "q.png")
    result = runner.invoke(app, ["predict", "--run", str(run), "--image", str(tmp_path / "q.png"), "--text", "how many bags are there?"])
    assert result.exit_code == 0, result.output
    assert "how many bags are there?:" in result.output
    result = runner.invoke(app, ["predict", "--run", str(run), "--image", str(tmp_path / "missing.png"), "--text", "how many bags?"])
    assert result.exit_code == 1 and "cannot read" in result.output and "missing.png" in result.output
    result = runner.invoke(app, ["predict", "--run", str(run), "--image", str(tmp_path / "q.png"), "--image", str(tmp_path / "q.png"),
                                 "--text", "how many bags?"])
    assert result.exit_code == 1 and "reads 1 image" in result.output
    result = runner.invoke(app, ["eval", "--run", str(run), "--data", "minivl:nlvr"])
    assert result.exit_code == 1 and "trained for vqa" in result.output
    with pytest.warns(UserWarning, match="truncated"):  # the tokenizer's policy: truncate, with a warning naming the text
        vptune.train.predict_vl(vptune.train.load_run(run), [tmp_path / "q.png"], "how many bags " * 40)


def test_a_vl_task_on_an_image_backbone_is_refused(tmp_path):
    from vptune.train.run import build_vl

    with pytest.raises(ValueError, match="reads images only"):
        build_vl("minivl:vqa", {"input_size": (3, SIDE, SIDE)}, tiny_vit(), None, False)


@pytest.mark.parametrize("task", ["nlvr", "retrieval"])
def test_fit_and_evaluate_go_through_the_task(task, tmp_path):
    from torch.utils.data import Subset

    from vptune.data import build_vl_data
    from vptune.data.transforms import backbone_data_config
    from vptune.data.vl import ImageTable, RetrievalData
    from vptune.train import TrainConfig, evaluate, fit

    net = vptune.backbones.loading.load_backbone("hf:x", weights=vilt_folder(tmp_path))
    bundle = build_vl_data(f"minivl:{task}", backbone_data_config(net), negatives=3)
    if task == "retrieval":  # every caption against every image: keep the split small
        test = bundle.test
        small = RetrievalData(ImageTable(test.images.arrays[:12]), test.text_image[:12].numpy(), test.input_ids[:12],
                              test.attention_mask[:12], test.transform)
        bundle.train, bundle.val, bundle.test = Subset(bundle.train, range(40)), small, small
    else:
        bundle.train, bundle.val = Subset(bundle.train, range(64)), Subset(bundle.val, range(32))
    model = PromptModel(net, vptune.config_for("vpt-deep", num_prompts=3), task=bundle.make_task())
    result = fit(model, bundle, TrainConfig(epochs=1, batch_size=16, lr=1e-3, optimizer="adamw"), progress=False)
    key = "val_top1" if task == "nlvr" else "val_ir_r1"
    assert 0 <= result["val"][key] <= 100
    again = evaluate(model, bundle.val, TrainConfig(batch_size=8))
    assert again[key.removeprefix("val_")] == result["val"][key]
    if task == "retrieval":
        scores = model.task.score_matrix(model, small)
        assert scores.shape == (12, 12)
        recalls = vptune.tasks.retrieval_recalls(scores, small.text_image)
        assert again["ir_r1"] == recalls["ir_r1"] and again["tr_r10"] == recalls["tr_r10"]


def test_the_vilt_cost_rows_follow_the_formulas(vilt):
    from vptune.bench_vl import vilt_cost

    p, r = 6, 4
    rows = {row["method"]: row for row in vilt_cost(num_prompts=p, batch_size=1, rounds=1, net=vilt)}
    n = 12 + 1 + (SIDE // PATCH) ** 2  # a full-length text (12), the image [CLS], patches; the last block computes only the [CLS] query
    queries = [n, n, 1]
    apt = sum(4 * p * D * r + 4 * q * p * D for q in queries)  # P_hat's low-rank products, u P_hat^T and A P
    kv = sum(4 * q * p * D for q in queries)  # the extra keys' scores and values; their K/V are cached at inference
    assert rows["apt"]["extra_gflops"] * 1e9 == pytest.approx(apt, rel=1e-9)
    assert rows["vpt-deep:kv"]["extra_gflops"] * 1e9 == pytest.approx(kv, rel=1e-9)
    assert rows["vpt-deep:tokens"]["extra_gflops"] > 5 * rows["vpt-deep:kv"]["extra_gflops"]
    assert rows["apt"]["apt_percent_of_this"] == 100.0
    assert rows["apt"]["tuned_params"] == 3 * (p * D + 2 * D * r + 1)
    assert rows["lora"]["tuned_params"] == 3 * 4 * 2 * 8 * D  # rank 8 on query, key, value and output.dense


def test_a_vilt_backbone_serves_vision_language_tasks_only(vilt):
    """A ViLT reads images with text: its tasks are answered by answer_vl (tests/test_server_vl.py);
    an image-classification run on it is refused with the reason."""
    from vptune.serve.multitask import MultiTaskModel

    served = MultiTaskModel(vilt)
    task = served.add_model("vqa", PromptModel(vilt, vptune.config_for("apt", num_prompts=2), task=VQATask(["a", "b"])))
    assert task.reads_text and task.kind == "vqa" and task.labels == ["a", "b"]
    with pytest.raises(ValueError, match="classifies images, but this backbone \\(vilt\\) reads images with text"):
        served.add_model("images", PromptModel(vilt, vptune.config_for("linear"), 3))
