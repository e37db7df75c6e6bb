"""METER (vptune.backbones.meter) on a tiny random config with honest weights: the walk is the
fusion layers' own transformers forward, APT sits where the official APT code puts it (checked
against a literal transcription of its module), the deep prompt's exact key-value path equals
its literal path and the official baseline's transcription, official checkpoints load through
the documented mapping, the run folder round-trips, and which tensors train."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn as nn

from vptune.backbones.family import family_of
from vptune.methods import Method, config_for
from vptune.model import PromptModel
from vptune.tasks import NLVRTask, VQATask

from conftest import assert_same_logits_and_grads
from honest import honest_

pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from vptune.backbones import meter as M  # noqa: E402

D, H, LAYERS, T, SIDE, PATCH = 16, 4, 2, 10, 32, 8


def tiny_meter(seed: int = 0, side: int = SIDE, dropout: float = 0.0) -> M.MeterModel:
    torch.manual_seed(seed)
    config = M.MeterConfig(name="tiny-meter", hidden_size=D, num_heads=H, intermediate_size=32, num_layers=LAYERS,
                           image_width=24, text_width=20, image_size=side, patch_size=PATCH, max_text_len=T, drop_rate=dropout)
    model = M.MeterModel(M.clip_image_tower(side, PATCH, 24, 2, 2), M.roberta_text_encoder(50, 20, 1, 2, 40, 20, dropout), config)
    return honest_(model.eval(), seed=seed)


def batch(n: int = 3, seed: int = 1, side: int = SIDE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[0, 6:] = 0
    mask[-1, 8:] = 0
    ids[mask == 0] = 1  # RoBERTa's padding id
    return {"image": torch.randn(n, 3, side, side, generator=g), "input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def meter():
    return tiny_meter()


def randomise_(method: nn.Module, seed: int = 3) -> None:
    """Trained-looking method tensors (APT's W2 and scale start at 0, which would hide a
    misplacement); an untrained tensor (APT's scale on METER) keeps its value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_the_walk_without_a_method_is_the_fusion_layers_own_forward(meter):
    inputs = batch()
    family = family_of(meter)
    assert isinstance(family, M.MeterFamily)
    torch.testing.assert_close(family.features(inputs, Method()), meter(inputs), atol=1e-5, rtol=1e-5)
    unmasked = dict(inputs, attention_mask=torch.ones_like(inputs["attention_mask"]))
    assert not torch.allclose(family.features(unmasked, Method())[0], family.features(inputs, Method())[0], atol=1e-4)


def test_sites_are_self_and_cross_attention_of_both_streams(meter):
    sites = family_of(meter).sites
    assert len(sites) == 4 * LAYERS
    assert [s.kind for s in sites[:4]] == ["self", "cross", "self", "cross"]
    assert all(s.width == D and s.num_heads == H and s.kv_width == D for s in sites)
    assert family_of(meter).cross_sites() == [1, 3, 5, 7]


# --- APT against the official module ----------------------------------------------------------

class OfficialAPT(nn.Module):
    """``approximate_prompt`` of the official APT code (METER/meter/modules/bert_model_apt.py),
    transcribed literally (num_heads unused there)."""

    def __init__(self, dim_feature: int, hid_feature: int, tot_memory: int) -> None:
        super().__init__()
        self.mm = nn.Sequential(nn.Linear(dim_feature, hid_feature, bias=False), nn.Linear(hid_feature, dim_feature, bias=False))
        self.mm_tokens = nn.Parameter(torch.zeros(tot_memory, dim_feature))
        self.activation = nn.ReLU(inplace=True)
        self.attn_drop = nn.Dropout(p=0.0)
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x, res):
        mm_tokens = self.mm_tokens
        attn = res @ (mm_tokens + self.mm(mm_tokens)).t()
        attn = self.activation(attn)
        attn = self.attn_drop(attn)
        e = attn @ mm_tokens
        weights = attn.max(dim=-1, keepdim=True)[0].clone().detach()
        x = x + e * weights
        x = x * self.scale.exp()
        return x


def official_apt_features(model: M.MeterModel, inputs, apts: list[OfficialAPT]) -> torch.Tensor:
    """METER's ``infer`` with the official ``BertSelfOutput`` (dense -> APT(h, input) -> dropout ->
    LayerNorm(h + input)) in the self- and cross-attention of every fusion layer."""
    family = M.MeterFamily(model)
    x, aux = family.embed(inputs)
    text, image = x[:, :aux.text_length], x[:, aux.text_length:]
    masks = {"text": aux.text_bias[:, None, None, :], "image": aux.image_bias[:, None, None, :]}

    def sublayer(attention, apt, h, mask, context=None):
        if context is None:
            ctx = attention.self(h, attention_mask=mask)[0]
        else:
            ctx = attention.self(h, encoder_hidden_states=context, attention_mask=mask)[0]
        out = apt(attention.output.dense(ctx), h)
        return attention.output.LayerNorm(attention.output.dropout(out) + h)

    def layer(stream, i, h, other, other_stream):
        fusion = getattr(model, f"cross_modal_{stream}_layers")[i]
        site = 4 * i + (0 if stream == "text" else 2)
        h = sublayer(fusion.attention, apts[site], h, masks[stream])
        h = sublayer(fusion.crossattention, apts[site + 1], h, masks[other_stream], other)
        return fusion.output(fusion.intermediate(h), h)

    for i in range(LAYERS):
        text, image = layer("text", i, text, image, "image"), layer("image", i, image, text, "text")
    return torch.cat([model.cross_modal_text_pooler(text), model.cross_modal_image_pooler(image)], dim=-1)


def test_apt_is_placed_as_the_official_code_places_it(meter):
    model = PromptModel(meter, config_for("apt", num_prompts=6, rank=4), task=VQATask(["a", "b"]), also_tune=False).eval()
    randomise_(model.method)
    apts = []
    for site in range(4 * LAYERS):
        apt = OfficialAPT(D, 4, 6)
        with torch.no_grad():
            apt.mm_tokens.copy_(model.method.site_parameter("prompt_embeddings", site))
            apt.mm[0].weight.copy_(model.method.site_parameter("down", site).T)
            apt.mm[1].weight.copy_(model.method.site_parameter("up", site).T)
            apt.scale.fill_(model.method.site_parameter("log_scale", site).item())
        apts.append(apt)
    inputs = batch()
    ours = model.encode(inputs)
    torch.testing.assert_close(ours, official_apt_features(meter, inputs, apts), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, meter(inputs), atol=1e-3)  # APT changed something
    # one site moved to another place changes the result: the test can tell placements apart
    apts[1], apts[3] = apts[3], apts[1]
    assert not torch.allclose(ours, official_apt_features(meter, inputs, apts), atol=1e-4)


def test_apt_scale_untrained_as_officially_on_meter(meter):
    model = PromptModel(meter, config_for("apt", num_prompts=5, train_scale=False), task=VQATask(["a", "b"]))
    names = set(model.tuned_parameters())
    assert "method.log_scale" not in names and "method.prompt_embeddings" in names
    model.train()
    model(batch()).sum().backward()
    assert model.method.log_scale.grad is None


# --- the deep prompt: exact kv path, literal path, official baseline ------------------------------

def grads_of(model: PromptModel, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    logits = model(inputs)
    (logits ** 2).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.tuned_parameters().items()}


@pytest.mark.parametrize("method, layers", [("vpt-deep", None), ("vpt-deep", "cross"), ("e2vpt", None)])
def test_kv_path_equals_tokens_path(meter, method, layers):
    options = {"num_prompts": 5}
    if layers == "cross":  # the official baseline's sites
        options["layers"] = tuple(family_of(meter).cross_sites())
    runs = []
    for path in ("kv", "tokens"):
        torch.manual_seed(0)
        model = PromptModel(meter, config_for(method, path=path, **options), task=VQATask(["a", "b", "c"])).eval()
        runs.append(grads_of(model, batch()))
    assert_same_logits_and_grads(*runs)
    # inference on the kv path uses (and refreshes) the prompt key/value cache: still the same logits
    with torch.no_grad():
        model = PromptModel(meter, config_for(method, path="kv", **options), task=VQATask(["a", "b", "c"])).eval()
        first, second = model(batch()), model(batch())
        torch.testing.assert_close(first, second)


def test_cross_attention_prompts_are_the_official_deep_prompt_baseline(meter):
    """meter_module_prompt.py: per layer i, text prompts prompts[0][i] before the text stream as the
    image layer's keys/values, image prompts prompts[1][i] before the image stream as the text layer's."""
    p = 5
    cross = family_of(meter).cross_sites()
    model = PromptModel(meter, config_for("vpt-deep", num_prompts=p, layers=tuple(cross), path="tokens"),
                        task=VQATask(["a", "b"]), also_tune=False).eval()
    table = model.method.prompt_embeddings  # (sets, p, d), one set per cross site in order
    prompts = [torch.stack([table[2 * i + 1] for i in range(LAYERS)])[:, None],  # text prompts: image cross sites
               torch.stack([table[2 * i] for i in range(LAYERS)])[:, None]]  # image prompts: text cross sites
    inputs = batch()
    family = M.MeterFamily(meter)
    x, aux = family.embed(inputs)
    x_, y_ = x[:, :aux.text_length], x[:, aux.text_length:]
    bsz = x.shape[0]
    zeros = torch.zeros(bsz, p)
    text_mask, image_mask = aux.text_bias[:, None, None, :], aux.image_bias[:, None, None, :]
    text_prompt_mask = torch.cat([zeros, aux.text_bias], 1)[:, None, None, :]
    image_prompt_mask = torch.cat([zeros, aux.image_bias], 1)[:, None, None, :]
    for i, (text_layer, image_layer) in enumerate(zip(meter.cross_modal_text_layers, meter.cross_modal_image_layers)):
        x_t = torch.cat([prompts[0][i].repeat(bsz, 1, 1), x_], dim=1)
        y_t = torch.cat([prompts[1][i].repeat(bsz, 1, 1), y_], dim=1)
        x_, y_ = text_layer(x_, y_t, text_mask, image_prompt_mask), image_layer(y_, x_t, image_mask, text_prompt_mask)
    official = torch.cat([meter.cross_modal_text_pooler(x_), meter.cross_modal_image_pooler(y_)], dim=-1)
    torch.testing.assert_close(model.encode(inputs), official, atol=1e-5, rtol=1e-5)


# --- what trains, how many ------------------------------------------------------------------------

def test_which_tensors_get_gradients(meter):
    inputs = batch()
    apt = PromptModel(meter, config_for("apt", num_prompts=4, train_scale=False), task=VQATask(["a", "b"]))
    apt.train()
    apt(inputs).sum().backward()
    assert all(p.grad is None for p in meter.parameters())  # the shared backbone is untouched
    assert {n.split(".")[0] for n in apt.tuned_parameters()} == {"method", "head", "also_tuned"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in apt.tuned_parameters().items()
               if n != "method.down")  # W1 gets none while W2 = 0 (its initial value)
    full = PromptModel(meter, config_for("full"), task=VQATask(["a", "b"]))
    tuned = {n for n, p in full.backbone.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("vit_model.", "text_transformer.")) for n in tuned)  # encoders frozen
    assert {n.split(".")[0] for n in tuned} == {"cross_modal_text_transform", "cross_modal_image_transform", "token_type_embeddings",
                                               "cross_modal_image_layers", "cross_modal_text_layers",
                                               "cross_modal_image_pooler", "cross_modal_text_pooler"}
    full.train()
    full(inputs).sum().backward()
    assert all(p.grad is not None for n, p in full.backbone.named_parameters() if n in tuned)


def test_parameter_counts_follow_the_formulas(meter):
    p, r, sites = 7, 4, 4 * LAYERS
    head = family_of(meter).task_head(VQATask(["a", "b"]), 2 * D)
    head_count = sum(t.numel() for t in head.parameters())
    also = 2 * (D * D + D) + 2 * D  # two poolers, two token types
    counts = {
        "apt": (dict(num_prompts=p, rank=r, train_scale=False), sites * (p * D + 2 * D * r)),
        "vpt-deep": (dict(num_prompts=p), sites * p * D),
        "lora": (dict(rank=r), sites * 4 * r * (D + D)),  # query, key, value, output.dense at every site
        "linear": ({}, 0),
    }
    for name, (options, formula) in counts.items():
        model = PromptModel(meter, config_for(name, **options), task=VQATask(["a", "b"]))
        assert model.num_tuned_parameters() == formula + head_count + also, name
    official_12 = PromptModel(meter, config_for("vpt-deep", num_prompts=p, layers=tuple(family_of(meter).cross_sites())),
                              task=VQATask(["a", "b"]), also_tune=False)
    assert official_12.num_tuned_parameters() == 2 * LAYERS * p * D + head_count


def test_lora_at_initialisation_is_the_frozen_model(meter):
    model = PromptModel(meter, config_for("lora", rank=2), task=VQATask(["a", "b"]), also_tune=False).eval()
    adapted = [n for n, _ in model.backbone.named_modules() if n.endswith(".lora_A")]
    assert len(adapted) == 4 * LAYERS * 4
    torch.testing.assert_close(model.encode(batch()), meter(batch()), atol=1e-6, rtol=1e-5)


def test_nlvr_grows_a_third_token_type(meter):
    model = PromptModel(meter, config_for("apt", num_prompts=3), task=NLVRTask())
    assert model.also_tuned["token_type_embeddings"].num_embeddings == 3
    inputs = batch()
    pair = {"image0": inputs["image"], "image1": inputs["image"].flip(-1), "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"]}
    assert model(pair).shape == (3, 2)


# --- run folders ---------------------------------------------------------------------------------

def test_run_folder_round_trip(meter, tmp_path):
    model = PromptModel(meter, config_for("apt", num_prompts=4, train_scale=False), task=VQATask(["a", "b", "c"])).eval()
    randomise_(model.method)
    model.save_pretrained(tmp_path)
    again = PromptModel.from_pretrained(meter, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(batch()), model(batch()))
    with pytest.raises(ValueError, match="other backbone weights"):
        PromptModel.from_pretrained(tiny_meter(seed=5), tmp_path)


# --- official checkpoints --------------------------------------------------------------------------

OFFICIAL_NAMES = (  # literal keys of an official METER-CLIP16-RoBERTa checkpoint
    "vit_model.visual.conv1.weight", "vit_model.visual.class_embedding", "vit_model.visual.positional_embedding",
    "vit_model.visual.ln_pre.weight", "vit_model.visual.transformer.resblocks.0.attn.in_proj_weight",
    "vit_model.visual.transformer.resblocks.1.mlp.c_fc.weight", "vit_model.visual.ln_post.bias",
    "text_transformer.embeddings.word_embeddings.weight", "text_transformer.encoder.layer.0.attention.self.query.weight",
    "text_transformer.pooler.dense.weight", "cross_modal_text_transform.weight", "cross_modal_image_transform.bias",
    "token_type_embeddings.weight", "cross_modal_image_layers.0.attention.self.query.weight",
    "cross_modal_image_layers.1.crossattention.self.value.bias", "cross_modal_text_layers.0.crossattention.output.LayerNorm.weight",
    "cross_modal_text_layers.1.intermediate.dense.weight", "cross_modal_text_layers.1.output.LayerNorm.bias",
    "cross_modal_image_pooler.dense.weight", "cross_modal_text_pooler.dense.bias",
)


def official_state(model: M.MeterModel, grid: int | None = None) -> dict[str, torch.Tensor]:
    """``model``'s tensors under the official names, with what an official checkpoint has beside them."""
    state = {}
    for key, value in model.state_dict().items():
        state[("vit_model.visual." + key[len("vit_model."):]) if key.startswith("vit_model.") else key] = value.clone()
    if grid is not None:  # a checkpoint made at another image size
        table = state["vit_model.visual.positional_embedding"]
        state["vit_model.visual.positional_embedding"] = torch.randn(grid * grid + 1, table.shape[1])
    state["vit_model.positional_embedding"] = torch.randn(77, 12)  # the CLIP text tower METER builds, unused
    state["vit_model.ln_final.weight"] = torch.ones(12)
    state["vit_model.ln_final.bias"] = torch.zeros(12)
    state["text_transformer.embeddings.position_ids"] = torch.arange(40)[None]
    state["itm_score.fc.weight"] = torch.randn(2, 2 * D)
    state["itm_score.fc.bias"] = torch.randn(2)
    state["vqa_classifier.0.weight"] = torch.randn(2 * D, 2 * D)
    return state


def save_lightning(state, path, container: bool = False) -> None:
    """A Lightning-style .ckpt; with ``container`` its hyper-parameters are pytorch_lightning's
    ``AttributeDict`` (a class this environment does not have), as real ones are."""
    hyper = {"config": {"image_size": SIDE}}
    if container:
        module = types.ModuleType("pytorch_lightning.utilities.parsing")
        cls = type("AttributeDict", (dict,), {"__module__": "pytorch_lightning.utilities.parsing"})
        module.AttributeDict = cls
        names = ("pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing")
        for name in names:
            sys.modules[name] = module if name.endswith("parsing") else types.ModuleType(name)
        try:
            torch.save({"state_dict": state, "epoch": 9, "hyper_parameters": cls(hyper)}, path)
        finally:
            for name in names:
                del sys.modules[name]
    else:
        torch.save({"state_dict": state, "epoch": 9, "global_step": 100, "hyper_parameters": hyper}, path)


@pytest.mark.parametrize("container", [False, True])
def test_official_checkpoint_loads_exactly(meter, tmp_path, container):
    state = official_state(meter)
    assert set(OFFICIAL_NAMES) <= set(state)
    path = tmp_path / "meter.ckpt"
    save_lightning(state, path, container)
    fresh = tiny_meter(seed=9)
    heads = M.load_official(fresh, path)
    assert sorted(heads) == ["itm_score.fc.bias", "itm_score.fc.weight", "vqa_classifier.0.weight"]
    for key, value in meter.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    torch.testing.assert_close(fresh(batch()), meter(batch()))


class OfficialHeads(nn.Module):
    """The task heads of ``METERTransformerSS.__init__`` (METER/meter/modules/meter_module.py and
    heads.py), transcribed literally: ``hs`` the fusion width, ``vs`` the answer count."""

    def __init__(self, hs: int, vs: int) -> None:
        super().__init__()
        self.itm_score = nn.Module()
        self.itm_score.fc = nn.Linear(hs * 2, 2)  # heads.ITMHead(hs * 2)
        self.vqa_classifier = nn.Sequential(nn.Linear(hs * 2, hs * 2), nn.LayerNorm(hs * 2), nn.GELU(), nn.Linear(hs * 2, vs))
        self.nlvr2_classifier = nn.Sequential(nn.Linear(hs * 4, hs * 2), nn.LayerNorm(hs * 2), nn.GELU(), nn.Linear(hs * 2, 2))
        self.rank_output = nn.Linear(hs, 1)
        self.rank_output.weight.data = self.itm_score.fc.weight.data[1:, :]
        self.rank_output.bias.data = self.itm_score.fc.bias.data[1:]


def run_with_official_heads(meter, tmp_path, task, heads: dict[str, torch.Tensor]) -> PromptModel:
    """A run's model on a tiny METER loaded from an official-style checkpoint holding ``heads``,
    its head started as ``vptune train --weights FILE.ckpt`` starts it."""
    from vptune.train.run import init_pretrained_head

    state = {k: v for k, v in official_state(meter).items() if not k.startswith(M.OFFICIAL_HEADS)}
    save_lightning({**state, **heads}, tmp_path / "finetuned.ckpt")
    fresh = tiny_meter(seed=9)
    fresh.official_heads = M.load_official(fresh, tmp_path / "finetuned.ckpt")
    torch.manual_seed(0)
    model = PromptModel(fresh, config_for("linear"), task=task)
    model.fresh_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    model.loaded = init_pretrained_head(model)
    return model


def test_official_finetuned_heads_start_the_runs_heads_exactly(meter, tmp_path):
    from vptune.tasks import RetrievalTask

    official = honest_(OfficialHeads(D, 5), seed=4)
    official.rank_output.weight.data = official.rank_output.weight.data + 0.5  # fine-tuned away from itm_score's row
    heads = {k: v.clone() for k, v in official.state_dict().items()}
    features = torch.randn(3, 2 * D) * 0.7
    pairs = torch.randn(3, 2 * D) * 0.7

    vqa = run_with_official_heads(meter, tmp_path, VQATask(list("abcde")), heads)
    assert vqa.loaded and vqa.metadata["head_init"] == "vqa_classifier"
    assert [tuple(vqa.head[i].weight.shape) for i in (0, 3)] == [(2 * D, 2 * D), (5, 2 * D)]  # METER's widths
    torch.testing.assert_close(vqa.head(features), official.vqa_classifier(features), rtol=0, atol=0)
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(vqa.eval()(inputs), official.vqa_classifier(vqa.encode(inputs)))

    nlvr = run_with_official_heads(meter, tmp_path, NLVRTask(), heads)
    assert nlvr.metadata["head_init"] == "nlvr2_classifier"
    torch.testing.assert_close(nlvr.head(features, pairs), official.nlvr2_classifier(torch.cat([features, pairs], -1)),
                               rtol=0, atol=0)

    retrieval = run_with_official_heads(meter, tmp_path, RetrievalTask(), heads)  # fine-tuned for retrieval
    assert retrieval.metadata["head_init"] == "rank_output"
    torch.testing.assert_close(retrieval.head(features), official.rank_output(features), rtol=0, atol=0)
    itm_only = {k: v for k, v in heads.items() if k.startswith("itm_score.")}  # pre-trained: the match row
    retrieval = run_with_official_heads(meter, tmp_path, RetrievalTask(), itm_only)
    assert retrieval.metadata["head_init"] == "itm_score.fc"
    assert torch.equal(retrieval.head.weight, official.itm_score.fc.weight[1:]) and torch.equal(retrieval.head.bias, official.itm_score.fc.bias[1:])
    torch.testing.assert_close(retrieval.head(features)[:, 0], official.itm_score.fc(features)[:, 1])
    assert not run_with_official_heads(meter, tmp_path, VQATask(list("abcde")), itm_only).loaded  # no VQA head: fresh


def test_official_vqa_head_over_other_answers_leaves_a_fresh_head(meter, tmp_path):
    heads = {k: v for k, v in honest_(OfficialHeads(D, 5), seed=4).state_dict().items()}
    with pytest.warns(UserWarning, match="answers 5 answers, the task has 3: the run starts a fresh VQA head"):
        model = run_with_official_heads(meter, tmp_path, VQATask(list("abc")), heads)
    assert not model.loaded and "head_init" not in model.metadata
    for key, value in model.fresh_head.items():
        assert torch.equal(model.head.state_dict()[key], value), key
    heads["vqa_classifier.0.weight"] = torch.zeros(2 * D, 3 * D)  # not METER's width: refused, naming the tensor
    with pytest.raises(ValueError, match=r"vqa_classifier does not fit the vqa head: 0.weight \(32, 48\) vs \(32, 32\)"):
        run_with_official_heads(meter, tmp_path, VQATask(list("abcde")), heads)


def test_official_checkpoint_with_wrong_keys_lists_them(meter, tmp_path):
    state = official_state(meter)
    del state["cross_modal_image_layers.1.crossattention.self.key.weight"]
    state["cross_modal_text_layers.7.attention.self.query.weight"] = torch.zeros(D, D)
    state["cross_modal_text_transform.weight"] = torch.zeros(D, 99)
    save_lightning(state, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError) as error:
        M.load_official(tiny_meter(), tmp_path / "bad.ckpt")
    message = str(error.value)
    assert "missing cross_modal_image_layers.1.crossattention.self.key.weight" in message
    assert "unexpected cross_modal_text_layers.7.attention.self.query.weight" in message
    assert "cross_modal_text_transform.weight (16, 99) vs (16, 20)" in message


def official_adapt_position_encoding(pos: torch.Tensor, patch_size: int, after: int) -> torch.Tensor:
    """meter/modules/clip_model.py ``adapt_position_encoding`` on one table, transcribed."""
    import numpy as np

    origin = pos.unsqueeze(0)
    grid_before = int(np.sqrt(origin.shape[1] - 1))
    grid_after = after // patch_size
    dim = origin.shape[-1]
    pos_embed = origin[0, 1:, :].reshape((grid_before, grid_before, dim))
    pos_embed = torch.nn.functional.interpolate(pos_embed.permute((2, 0, 1)).unsqueeze(0), size=(grid_after, grid_after), mode="bicubic")
    pos_embed = pos_embed.squeeze(0).permute((1, 2, 0)).reshape((-1, dim))
    return torch.cat((origin[0, 0:1, :], pos_embed), dim=0)


def test_checkpoint_of_another_image_size_is_interpolated_as_officially(tmp_path):
    model = tiny_meter(side=48)  # a 6x6 grid; the checkpoint's is 4x4
    state = official_state(model, grid=4)
    save_lightning(state, tmp_path / "small.ckpt")
    M.load_official(model, tmp_path / "small.ckpt")
    expected = official_adapt_position_encoding(state["vit_model.visual.positional_embedding"], PATCH, 48)
    torch.testing.assert_close(model.vit_model.positional_embedding.detach(), expected)


def test_checkpoint_needing_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w').close()",))

    torch.save({"state_dict": {"a": torch.zeros(1)}, "hyper_parameters": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="builtins.eval"):
        M.read_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


# --- bad input ---------------------------------------------------------------------------------------

def test_bad_inputs_are_refused_with_the_fix(meter):
    family = family_of(meter)
    with pytest.raises(TypeError, match="needs text with the image"):
        family.embed(torch.zeros(1, 3, SIDE, SIDE))
    with pytest.raises(ValueError, match="resize to 32"):
        family.embed(batch(side=48))
    inputs = batch()
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        family.embed(dict(inputs, input_ids=inputs["input_ids"][:2]))
    with pytest.raises(ValueError, match="no text"):
        family.embed({"image": inputs["image"]})
    with pytest.raises(ValueError, match="location='add' is not possible"):
        PromptModel(meter, config_for("vpt-deep", location="add"), task=VQATask(["a"]))


# --- cost -------------------------------------------------------------------------------------------

def test_the_meter_cost_rows_follow_the_formulas(meter):
    from vptune.bench_vl import meter_cost

    p, r = 6, 4
    rows = {row["method"]: row for row in meter_cost(num_prompts=p, batch_size=1, rounds=1, net=meter)}
    n = 1 + (SIDE // PATCH) ** 2  # image CLS and patches; the text has its full length T
    per_layer = {"self": (T, n), "cross": (T, n)}  # queries of the text and image sites
    apt = LAYERS * sum(2 * (4 * p * D * r + 4 * q * p * D) for q in per_layer["self"])  # self and cross sites of each stream
    kv_all = LAYERS * sum(2 * 4 * q * p * D for q in (T, n))  # 200 extra keys' scores and values at 4 sites per layer
    kv_cross = LAYERS * sum(4 * q * p * D for q in (T, n))
    cross_literal = kv_cross + LAYERS * 2 * (2 * 2 * p * D * D)  # the prompts' keys and values, every forward
    assert rows["apt"]["extra_gflops"] * 1e9 == pytest.approx(apt, rel=1e-9)
    assert rows["vpt-deep:kv"]["extra_gflops"] * 1e9 == pytest.approx(kv_all, rel=1e-9)
    assert rows["vpt-deep:kv:cross"]["extra_gflops"] * 1e9 == pytest.approx(kv_cross, rel=1e-9)
    assert rows["vpt-deep:tokens:cross"]["extra_gflops"] * 1e9 == pytest.approx(cross_literal, rel=1e-9)
    assert rows["vpt-deep:tokens"]["extra_gflops"] > rows["vpt-deep:tokens:cross"]["extra_gflops"]
    assert rows["apt"]["tuned_params"] == 4 * LAYERS * (p * D + 2 * D * r)  # the scale untrained, as officially
    assert rows["vpt-deep:kv:cross"]["tuned_params"] == 2 * LAYERS * p * D


# --- the bundled METER ------------------------------------------------------------------------------

def test_bundled_meter_is_the_bundled_clips_towers_under_fusion_layers(tmp_path):
    from safetensors.torch import save_file

    from vptune.backbones import meter_bundled as bundled
    from vptune.backbones.clip_bundled import load_bundled_clip

    clip = load_bundled_clip()
    model = bundled.build_bundled_meter()
    for name, part in model.named_children():
        if name not in ("vit_model", "text_transformer"):  # the towers keep the CLIP's shipped weights
            honest_(part, seed=len(name))
    family = family_of(model)
    assert len(family.sites) == 4 * bundled.LAYERS and family.config.image_size == 32
    assert len(model.vit_model.transformer.resblocks) == len(clip.visual.transformer.resblocks) - 1  # METER drops CLIP's last block
    state = bundled.fusion_state(model)
    assert not any(k.startswith(("vit_model.", "text_transformer.")) for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "meter.safetensors"))
    loaded = bundled.load_bundled_meter(tmp_path / "meter.safetensors")
    words = model.tokenizer.words(["a shirt on the left"], padding="max_length", max_length=12, return_tensors="pt")
    inputs = {"image": torch.randn(1, 3, 32, 32), "input_ids": words["input_ids"], "attention_mask": words["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), model(inputs))
        ids = inputs["input_ids"]
        # the text tower is the CLIP's: the same token states as its own transformer
        x = clip.token_embedding(ids) + clip.positional_embedding[: ids.shape[1]]
        ref = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[: ids.shape[1], : ids.shape[1]]))
        torch.testing.assert_close(loaded.text_states(ids, inputs["attention_mask"]), ref)
    with pytest.raises(FileNotFoundError, match="pretrain --arch meter"):
        bundled.load_bundled_meter(tmp_path / "absent.safetensors")


def test_meters_minivl_section_sets_the_papers_meter_table_beside_it():
    from vptune.compare import VL_RECIPES
    from vptune.report import PAPER_METER, results_minivl_block

    row = {"method": "apt", "lr": 1e-3, "tuned_params": 1000, "extra_gflops": 0.01, "wall_time_s": 1.0, "error": None,
           "task": "vqa", "test_vqa_score": 50.0, "val_vqa_score": 50.0, "val_top1": None, "test_top1": None}
    block = results_minivl_block([row], [VL_RECIPES["apt"]], command="c", lr_factors=(1,), backbone="vptune_meter_fmnist",
                                 specs=["minivl:vqa"], wall_time_s=1.0, complete=False)
    assert "METER table" in block and "323.31M" in block and "2.31 vs 13.05 (17.7%)" in block and "ViLT" not in block
    for p in PAPER_METER:
        parts = [p[k] for k in ("vqa", "nlvr", "ir", "tr")]
        if None not in parts:
            assert sum(parts) / 4 == pytest.approx(p["avg"], abs=0.01), p["label"]


def test_gradient_checkpointing_changes_nothing(meter):
    runs = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = PromptModel(meter, config_for("apt", num_prompts=4), task=VQATask(["a", "b"])).eval()
        randomise_(model.method)
        model.set_grad_checkpointing(recompute)
        runs.append(grads_of(model, batch()))
    assert_same_logits_and_grads(*runs, tol=1e-6)


def test_deep_prompts_start_as_the_official_baselines(meter):
    """meter_module_prompt.py: uniform in +-sqrt(6 / (3 * 16 * 16 + 768)), the patch's fan-in and the width."""
    model = PromptModel(meter, config_for("vpt-deep", num_prompts=50), task=VQATask(["a"]))
    assert family_of(meter).prompt_fan_in == 3 * PATCH * PATCH
    bound = (6.0 / (3 * PATCH * PATCH + D)) ** 0.5
    table = model.method.prompt_embeddings
    assert table.abs().max() <= bound and table.abs().max() > 0.9 * bound


def test_meter_specs_are_checked_before_building():
    with pytest.raises(ValueError, match="meter:SIZE"):
        M.load_meter("meter:big")
    with pytest.raises(ValueError, match="multiple of METER-B's patch size 16"):
        M.load_meter("meter:300")


def test_the_pretrainer_trains_the_fusion_part_only():
    from vptune.backbones.meter_bundled import build_bundled_meter
    from vptune.backbones.pretrain_meter import MeterPretrainer

    words = build_bundled_meter().tokenizer.words
    model = MeterPretrainer(build_bundled_meter(), len(words))
    for encoder in (model.meter.vit_model, model.meter.text_transformer):
        encoder.requires_grad_(False)
    text = words(["a shirt on the left", "two bags"], padding="max_length", max_length=10, return_tensors="pt")
    itm, mlm = model(torch.zeros(2, 3, 32, 32), text["input_ids"], text["attention_mask"])
    assert itm.shape == (2, 2) and mlm.shape == (2, 10, len(words))
    (itm.sum() + mlm.sum()).backward()
    assert all(p.grad is None for p in model.meter.vit_model.parameters())
    assert model.meter.cross_modal_image_layers[0].crossattention.self.key.weight.grad is not None
    assert model.itm_score.fc.weight.grad is not None


def test_a_bundled_meter_vqa_run_predicts_and_serves(tmp_path):
    """``vptune train`` on the shipped bundled METER, then ``vptune predict`` and the HTTP server on
    its run: both give the run's own model's answer (the server refused every METER before)."""
    import httpx
    from PIL import Image
    from typer.testing import CliRunner

    import vptune.train
    from vptune.cli import app
    from vptune.data import minivl
    from vptune.serve.server import BackgroundServer, ServeConfig, create_app, load_tasks

    runner, run = CliRunner(), tmp_path / "tasks" / "vqa"
    result = runner.invoke(app, ["train", "--backbone", "vptune_meter_fmnist", "--method", "apt", "--num-prompts", "2",
                                 "--data", "minivl:vqa?train=16&val=4&test=4", "--out", str(run), "--epochs", "1",
                                 "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    Image.fromarray(minivl.load("vqa")["test"].images[0]).save(tmp_path / "q.png")
    question = "how many bags are there?"
    model = vptune.train.load_run(run)
    answers = vptune.train.predict_vl(model, [tmp_path / "q.png"], question, top_k=3)
    result = runner.invoke(app, ["predict", "--run", str(run), "--image", str(tmp_path / "q.png"), "--text", question])
    assert result.exit_code == 0, result.output
    assert f"{question}: {answers['top'][0][0]} (" in result.output

    served, skipped = load_tasks(model.backbone, tmp_path / "tasks")
    assert not skipped and served.task("vqa").kind == "vqa"
    with BackgroundServer(create_app(served, ServeConfig(max_batch=4, max_wait_ms=10))) as server, \
            httpx.Client(base_url=server.url, timeout=httpx.Timeout(30.0)) as client:
        response = client.post("/v1/tasks/vqa/predict", files=[("file", (tmp_path / "q.png").read_bytes())],
                               data={"text": question}, params={"k": 3})
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert [p["label"] for p in predictions] == [label for label, _ in answers["top"]]  # the run's own answers
        assert [p["score"] for p in predictions] == pytest.approx([score for _, score in answers["top"]], abs=1e-5)
        response = client.post("/v1/tasks/vqa/predict", files=[("file", (tmp_path / "q.png").read_bytes())])
        assert response.status_code == 400 and "form field 'text'" in response.json()["detail"]


@pytest.mark.parametrize("method,options", [("vpt-deep", dict(num_prompts=3)), ("e2vpt", dict(num_prompts=2))])
def test_a_meter_serves_vision_language_tasks_only(meter, method, options):
    from vptune.serve.multitask import MultiTaskModel

    served = MultiTaskModel(meter)
    torch.manual_seed(0)
    model = PromptModel(meter, config_for(method, **options), task=VQATask(["a", "b", "c"]))
    randomise_(model.method)
    task = served.add_model("vqa", model)
    assert task.reads_text and task.labels == ["a", "b", "c"]
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(served.answer_vl("vqa", inputs), model.eval()(inputs))
    with pytest.raises(ValueError, match="classifies images, but this backbone \\(meter\\) reads images with text"):
        served.add_model("images", PromptModel(meter, config_for("linear"), 3))
