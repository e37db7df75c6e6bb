"""The bundled ViLT (vptune_vilt_fmnist): its transformer started from a ViT is the ViT's own
function on the image (normalisation folded into the patch projection), its pretraining batches
(ITM negatives, MLM on the matched half), a tiny pretraining run whose weights load by name, and
the shipped weights (skipped until they land)."""

import numpy as np
import pytest
import torch

from honest import honest_
from vptune.backbones.bundled import MEAN, STD
from vptune.backbones.family import family_of
from vptune.methods.base import Method

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


def test_init_from_vit_computes_the_vits_image_features():
    from vptune.backbones.vilt_bundled import init_from_vit

    vit = honest_(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=4).eval())
    config = transformers.ViltConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8,
        max_image_length=-1, vocab_size=120, max_position_embeddings=12, layer_norm_eps=1e-6)
    vilt = honest_(transformers.ViltModel(config).eval(), seed=1)
    init_from_vit(vilt, vit)
    with torch.no_grad():
        vilt.embeddings.token_type_embeddings.weight.zero_()  # ViLT adds a modality embedding the ViT has not
    images = torch.rand(2, 3, 32, 32)
    ids = torch.randint(5, 120, (2, 6))
    family = family_of(vilt)
    x, aux = family.embed({"image": (images - 0.5) / 0.5, "input_ids": ids, "attention_mask": torch.zeros_like(ids)})
    ours = vilt.layernorm(family.run_blocks(x, aux, Method()))[:, 6:]  # the image [CLS] and the patches
    with torch.no_grad():
        z = vit.norm_pre(vit._pos_embed(vit.patch_embed((images - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])))
        for block in vit.blocks[:2]:  # the ViLT has the ViT's first two blocks
            z = block(z)
        theirs = vit.norm(z)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_itm_negatives_differ_and_mlm_targets_only_the_matched_half():
    from vptune.backbones.pretrain_vilt import itm_mlm_batch, mismatched
    from vptune.data.minivl import Corpus
    from vptune.data.tokenizer import WordTokenizer

    canonical = np.array(["a", "a", "b", "c", "c", "d"])
    rng = np.random.default_rng(0)
    index = np.array([0, 1, 3, 4] * 50)
    other = mismatched(rng, canonical, index)
    assert (canonical[other] != canonical[index]).all()
    with pytest.raises(RuntimeError, match="too few distinct captions"):
        mismatched(rng, np.array(["a", "a"]), np.array([0, 1]))
    captions = np.array(["1 item: a bag at the center", "1 item: a shirt at the top", "2 items: a bag and a coat",
                         "1 item: a sandal at the left", "3 items: a bag, a coat and a shirt", "1 item: a dress"])
    corpus = Corpus(np.zeros((6, 32, 32), np.uint8), captions, captions, {})
    tokenizer = WordTokenizer.from_file()
    batch = itm_mlm_batch(corpus, np.arange(6), rng, tokenizer, 1.0, torch.Generator().manual_seed(0))
    assert batch["itm_labels"].tolist() == [1, 1, 1, 0, 0, 0] and batch["pixels"].shape == (6, 3, 32, 32)
    assert (batch["mlm_labels"][3:] == -100).all() and (batch["mlm_labels"][:3] != -100).any()
    own = tokenizer(captions[3:].tolist(), padding="longest", return_tensors="pt")["input_ids"]
    shown = batch["input_ids"][3:, : own.shape[1]]
    assert not any(torch.equal(shown[j], own[j]) for j in range(3))  # each negative reads another canvas's caption


def test_a_tiny_pretraining_writes_weights_that_load_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("VPTUNE_CACHE", str(tmp_path / "cache"))
    from vptune.backbones import pretrain_vilt
    from vptune.backbones.bundled import bundled_weights_path
    from vptune.backbones.loading import load_backbone

    if not bundled_weights_path().is_file():
        pytest.skip("the bundled ViT's weights (the ViLT's initialisation) are not built here")
    figures = pretrain_vilt.pretrain_vilt(tmp_path / "out", steps=2, batch_size=4, corpus_size=16, warmup_steps=1,
                                          work_dir=tmp_path / "work", log_every=1, checkpoint_every=1,
                                          val_pairs=8)
    weights = tmp_path / "out" / "vptune_vilt_fmnist.safetensors"
    assert weights.is_file() and (tmp_path / "out" / "VILT_MODEL_CARD.md").is_file()
    assert 0 <= figures["pretrain_val"]["itm_accuracy"] <= 100 and figures["pretrain_val"]["itm_pairs"] == 16
    model = load_backbone("vptune_vilt_fmnist", weights=weights)
    assert family_of(model).name == "vilt" and family_of(model).text_length() == 48
    assert sum(p.numel() for p in model.parameters()) == figures["parameters"]
    # the pretrained ITM head is not a backbone tensor, but starts a retrieval run's score head (ViLT's recipe)
    from safetensors.torch import load_file

    from vptune import PromptModel, config_for
    from vptune.tasks import RetrievalTask, VQATask
    from vptune.train.run import init_retrieval_head

    itm = {k: v for k, v in load_file(str(weights)).items() if k.startswith("itm.")}
    retrieval = PromptModel(model, config_for("apt", num_prompts=2), task=RetrievalTask())
    assert not torch.equal(retrieval.head.weight, itm["itm.weight"][1:])
    assert init_retrieval_head(retrieval) and retrieval.metadata["head_init"] == "itm"
    assert torch.equal(retrieval.head.weight, itm["itm.weight"][1:]) and torch.equal(retrieval.head.bias, itm["itm.bias"][1:])
    assert not init_retrieval_head(PromptModel(model, config_for("apt", num_prompts=2), task=VQATask(["a", "b"])))


def test_the_shipped_bundled_vilt_loads_and_answers():
    from vptune.backbones.vilt_bundled import bundled_vilt_weights_path, load_bundled_vilt

    if not bundled_vilt_weights_path().is_file():
        pytest.skip("the bundled ViLT's weights have not landed")
    assert bundled_vilt_weights_path().stat().st_size <= 15e6
    model = load_bundled_vilt()
    family = family_of(model)
    features = family.features(family.example_inputs(batch=2), Method())
    assert features.shape == (2, 192) and torch.isfinite(features).all()
