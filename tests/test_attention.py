"""The shared mechanism: the key-value path equals the literal token path (outputs and
gradients), both equal an independent implementation on timm's own blocks, the inference
cache is exact and invalidated when prompts change, APT and E2VPT equal direct transcriptions
of docs/methods.md, and prompts never enter an average-pooled feature except through attention."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHITECTURES, MORE_ARCHITECTURES, tiny_vit

import vptune
from vptune.backbones.family import family_of

ALL_ARCHITECTURES = sorted(ARCHITECTURES) + sorted(MORE_ARCHITECTURES)
NUM_CLASSES = 5


def images_of(size: int = 32, batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize_(model: vptune.PromptModel, seed: int = 0, scale: float = 0.5) -> vptune.PromptModel:
    """Tuned tensors away from their init (a zero-init W2, a tiny head), so that every term counts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.tuned_parameters().values():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def twin(model: vptune.PromptModel, **changes) -> vptune.PromptModel:
    """The same method (config ``changes`` applied) on the same backbone with the same tuned tensors."""
    other = vptune.prompt_model(model.backbone, dataclasses.replace(model.config, **changes), model.num_classes)
    other.load_tuned_state_dict(model.tuned_state_dict())
    return other


def logits_and_grads(model: vptune.PromptModel, images: torch.Tensor, train: bool = True):
    model.train(train)
    model.zero_grad()
    logits = model(images)
    target = torch.arange(images.shape[0]) % NUM_CLASSES
    F.cross_entropy(logits, target).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.tuned_parameters().items()}


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, what: str = "") -> None:
    error = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
    assert error <= tol, f"{what}: relative error {error:.3g} > {tol}"


def assert_paths_agree(kv_model: vptune.PromptModel, images: torch.Tensor) -> None:
    assert kv_model.method.path == "kv"
    tokens_model = twin(kv_model, path="tokens")
    assert tokens_model.method.path == "tokens"
    kv_logits, kv_grads = logits_and_grads(kv_model, images)
    tokens_logits, tokens_grads = logits_and_grads(tokens_model, images)
    torch.testing.assert_close(kv_logits, tokens_logits, atol=1e-5, rtol=0)
    assert kv_grads.keys() == tokens_grads.keys()
    for name in kv_grads:
        assert tokens_grads[name].abs().sum() > 0, f"{name} got no gradient"
        assert_relative_close(kv_grads[name], tokens_grads[name], what=name)
    # The prompts must matter well above the tolerance, or the comparison above proves nothing
    # (the attention-pooled "map-pool" backbone is the least sensitive: about 7e-4).
    without = vptune.prompt_model(kv_model.backbone, vptune.config_for("linear"), NUM_CLASSES)
    without.head.load_state_dict(kv_model.head.state_dict())
    with torch.no_grad():
        assert (without(images) - kv_logits).abs().max() > 1e-4


# --- an independent implementation on timm's own Block.forward ---------------------------


def literal_vpt(backbone, prompts: dict[int, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """docs/methods.md's VPT-deep literally: before block i in ``prompts`` the prompt slot (after the
    prefix tokens) is overwritten by ``prompts[i]``; timm's own blocks run the whole sequence;
    prompt outputs are dropped before the backbone's own norm and pooling."""
    x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(backbone.patch_embed(images))))
    prefix, batch = backbone.num_prefix_tokens, images.shape[0]
    slot = None
    for i, block in enumerate(backbone.blocks):
        if i in prompts:
            slot = prompts[i].expand(batch, -1, -1)
        if slot is None:
            x = block(x)
            continue
        p = slot.shape[1]
        seq = block(torch.cat([x[:, :prefix], slot, x[:, prefix:]], dim=1))
        x, slot = torch.cat([seq[:, :prefix], seq[:, prefix + p :]], dim=1), seq[:, prefix : prefix + p]
    return backbone.forward_head(backbone.norm(x), pre_logits=True)


def vpt_prompt_tokens(model: vptune.PromptModel) -> dict[int, torch.Tensor]:
    method, config = model.method, model.config
    embeddings = method.prompt_embeddings
    if method.projection is not None:
        embeddings = method.projection(embeddings)
    layers = config.layers if config.layers is not None else (range(len(model.backbone.blocks)) if config.deep else (0,))
    return {layer: embeddings[0 if config.shared else j][None] for j, layer in enumerate(layers)}


def pooled(model: vptune.PromptModel, images: torch.Tensor) -> torch.Tensor:
    return model.family.pooled_features(model.forward_features(images))


# --- 1. kv path == tokens path ----------------------------------------------------------


@pytest.mark.parametrize("name", ALL_ARCHITECTURES)
def test_linear_method_equals_timm_forward(name):
    """With no method the walk must reproduce timm's own forward (the attention re-composition is exact)."""
    backbone = tiny_vit(name)
    model = vptune.prompt_model(backbone, vptune.config_for("linear"), NUM_CLASSES)
    images = images_of()
    with torch.no_grad():
        torch.testing.assert_close(pooled(model, images), backbone.forward_head(backbone.forward_features(images), pre_logits=True), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ALL_ARCHITECTURES)
def test_vpt_deep_kv_equals_tokens(name):
    model = randomize_(vptune.prompt_model(tiny_vit(name), vptune.VPTConfig(num_prompts=4, deep=True), NUM_CLASSES))
    assert_paths_agree(model, images_of())


@pytest.mark.parametrize("name", ALL_ARCHITECTURES)
def test_e2vpt_kv_equals_tokens(name):
    config = vptune.E2VPTConfig(num_prompts=3, num_kv_prompts=2, dropout=0.0)
    model = randomize_(vptune.prompt_model(tiny_vit(name), config, NUM_CLASSES))
    assert_paths_agree(model, images_of())


@pytest.mark.parametrize(
    "options",
    [
        dict(deep=True, layers=(0, 2)),  # prompt outputs of blocks 0 and 2 flow on into blocks 1 and 3
        dict(deep=True, layers=(1,)),
        dict(deep=True, shared=True),
        dict(deep=True, prompt_dim=16),
        dict(deep=False),  # shallow: kv only in the last block
        dict(deep=False, prompt_dim=16),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
@pytest.mark.parametrize("name", ["cls-token", "gap-qknorm-ls", "registers-dynamic"])
def test_vpt_variants_kv_equals_tokens_equals_literal(name, options):
    backbone = tiny_vit(name, depth=4)
    model = randomize_(vptune.prompt_model(backbone, vptune.VPTConfig(num_prompts=3, **options), NUM_CLASSES))
    images = images_of()
    assert_paths_agree(model, images)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(pooled(model, images), literal_vpt(backbone, vpt_prompt_tokens(model), images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL_ARCHITECTURES)
@pytest.mark.parametrize("path", ["kv", "tokens"])
def test_vpt_deep_equals_literal_on_timm_blocks(name, path):
    backbone = tiny_vit(name)
    model = randomize_(vptune.prompt_model(backbone, vptune.VPTConfig(num_prompts=4, path=path), NUM_CLASSES)).eval()
    images = images_of()
    with torch.no_grad():
        torch.testing.assert_close(pooled(model, images), literal_vpt(backbone, vpt_prompt_tokens(model), images), atol=1e-5, rtol=1e-5)


def test_dynamic_image_size_both_paths():
    backbone = tiny_vit("registers-dynamic")
    model = randomize_(vptune.prompt_model(backbone, vptune.E2VPTConfig(num_prompts=3, dropout=0.0), NUM_CLASSES))
    images = images_of(size=48)  # 6 x 6 patches where the model was built for 4 x 4
    assert_paths_agree(model, images)
    vpt = randomize_(vptune.prompt_model(backbone, vptune.VPTConfig(num_prompts=3), NUM_CLASSES)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pooled(vpt, images), literal_vpt(backbone, vpt_prompt_tokens(vpt), images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_add_location_equals_literal(deep):
    """location="add": one prompt per sequence position, added to the tokens before each prompted block."""
    backbone = tiny_vit("registers-dynamic")
    model = randomize_(vptune.prompt_model(backbone, vptune.VPTConfig(deep=deep, location="add"), NUM_CLASSES)).eval()
    images = images_of()
    prompts = model.method.prompt_embeddings  # sets, N, d
    assert prompts.shape[1] == 16 + backbone.num_prefix_tokens
    with torch.no_grad():
        x = family_of(backbone).embed(images)[0]
        for i, block in enumerate(backbone.blocks):
            if deep or i == 0:
                x = x + prompts[i if deep else 0]
            x = block(x)
        torch.testing.assert_close(pooled(model, images), backbone.forward_head(backbone.norm(x), pre_logits=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [vptune.E2VPTConfig(num_prompts=3, dropout=0.3), vptune.VPTConfig(num_prompts=3, dropout=0.3)])
def test_prompt_dropout_is_per_sample_and_identical_on_both_paths(config):
    kv_model = randomize_(vptune.prompt_model(tiny_vit("cls-token"), config, NUM_CLASSES)).train()
    tokens_model = twin(kv_model, path="tokens").train()
    images = images_of(batch=4)
    torch.manual_seed(3)
    kv_logits = kv_model(images)
    torch.manual_seed(3)
    tokens_logits = tokens_model(images)
    torch.testing.assert_close(kv_logits, tokens_logits, atol=1e-5, rtol=0)
    # One mask per sample: identical images in ONE batch get different logits in training (a mask
    # shared by the batch would give every row the same), equal ones in eval.
    same = images[:1].expand(4, -1, -1, -1)
    out = kv_model(same)
    assert (out[1:] - out[0]).abs().amax(dim=1).gt(1e-4).all()
    with torch.no_grad():
        out = kv_model.eval()(same)
    torch.testing.assert_close(out, out[:1].expand_as(out), atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", [vptune.E2VPTConfig(num_prompts=6, dropout=0.5), vptune.VPTConfig(num_prompts=6, dropout=0.5)])
def test_prompt_dropout_draws_a_mask_per_sample(config):
    """The prompts a block receives in training: (B, p, d), each sample zeroing its own elements
    at the configured rate and scaling the rest by 1 / (1 - rate); untouched in eval."""
    model = randomize_(vptune.prompt_model(tiny_vit("cls-token"), config, NUM_CLASSES)).train()
    method = model.method.visual if hasattr(model.method, "visual") else model.method
    batch = 64
    torch.manual_seed(0)
    prompts = method.prompts(0, batch)
    clean = method.eval().prompts(0, batch)
    assert prompts.shape == (batch, *clean.shape[1:]) and clean.shape[0] == 1
    kept = prompts != 0
    torch.testing.assert_close(prompts[kept], (clean.expand_as(prompts) / 0.5)[kept])
    assert abs(kept.float().mean().item() - 0.5) < 0.02
    masks = kept.flatten(1)
    assert all(not torch.equal(masks[0], masks[j]) for j in range(1, batch)), "samples share a dropout mask"


@pytest.mark.parametrize("config", [vptune.VPTConfig(num_prompts=4), vptune.E2VPTConfig(num_prompts=3, dropout=0.0)])
def test_bf16_autocast_paths_agree(config):
    kv_model = randomize_(vptune.prompt_model(tiny_vit("gap-qknorm-ls"), config, NUM_CLASSES)).eval()
    tokens_model = twin(kv_model, path="tokens").eval()
    images = images_of()
    with torch.no_grad():
        reference = kv_model(images)  # fills the fp32 cache entry
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cached = kv_model(images)
        # Neither entry may be served to the other precision.
        assert torch.equal(kv_model(images), reference)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(kv_model(images), cached)
    assert cached.dtype == torch.bfloat16
    torch.testing.assert_close(cached.float(), reference, atol=0.1, rtol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kv_logits, kv_grads = logits_and_grads(kv_model, images)
        tokens_logits, tokens_grads = logits_and_grads(tokens_model, images)
    torch.testing.assert_close(kv_logits.float(), tokens_logits.float(), atol=0.1, rtol=0.05)
    torch.testing.assert_close(kv_logits.float(), reference, atol=0.1, rtol=0.05)
    for name in kv_grads:
        assert_relative_close(kv_grads[name].float(), tokens_grads[name].float(), tol=0.1, what=name)


# --- the inference cache -------------------------------------------------------------------


def uncached_logits(model: vptune.PromptModel, images: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits with grad enabled, where the cache must not be used."""
    return model(images).detach()


@pytest.fixture(params=["vpt-deep", "vpt-shallow", "e2vpt"])
def cached_model(request) -> vptune.PromptModel:
    options = dict(num_prompts=3) if request.param != "e2vpt" else dict(num_prompts=3, dropout=0.0)
    config = vptune.config_for(request.param, **options)
    return randomize_(vptune.prompt_model(tiny_vit("gap-qknorm-ls"), config, NUM_CLASSES)).eval()


def test_cache_is_exact_and_filled_only_without_grad(cached_model):
    images = images_of()
    expected = uncached_logits(cached_model, images)
    assert not cached_model.method.kv_cache, "the cache was filled with grad enabled"
    with torch.no_grad():
        first = cached_model(images)
        filled = len(cached_model.method.kv_cache)
        second = cached_model(images)
    if cached_model.config.method_name() != "vpt-shallow":  # shallow prompts depend on the input after block 0
        assert filled > 0, "eval + no_grad did not cache the prompt keys and values"
    torch.testing.assert_close(first, expected, atol=1e-6, rtol=0)
    assert torch.equal(first, second)


def test_cache_under_inference_mode(cached_model):
    images = images_of()
    expected = uncached_logits(cached_model, images)
    with torch.inference_mode():
        first, second = cached_model(images), cached_model(images)
    with torch.no_grad():
        third = cached_model(images)  # entries made in inference mode serve a no_grad forward
    for out in (first, second, third):
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_cache_not_used_when_grad_is_enabled(cached_model):
    images = images_of()
    fresh = twin(cached_model).eval()
    with torch.no_grad():
        cached_model(images)  # fill the cache
    logits_c, grads_c = logits_and_grads(cached_model, images, train=False)
    logits_f, grads_f = logits_and_grads(fresh, images, train=False)
    torch.testing.assert_close(logits_c, logits_f, atol=0, rtol=0)
    for name in grads_f:
        assert grads_f[name].abs().sum() > 0
        torch.testing.assert_close(grads_c[name], grads_f[name], atol=0, rtol=0)


def _prompt_tensor(model: vptune.PromptModel) -> torch.Tensor:
    method = model.method
    return method.visual.prompt_embeddings if hasattr(method, "visual") else method.prompt_embeddings


@pytest.mark.parametrize(
    "change",
    ["data_add", "no_grad_add", "optimizer_step", "load_tuned_state_dict", "load_state_dict", "replace_parameter", "projection_only"],
)
def test_cache_invalidated_when_prompts_change(change):
    config = vptune.VPTConfig(num_prompts=3, prompt_dim=8) if change == "projection_only" else vptune.VPTConfig(num_prompts=3)
    model = randomize_(vptune.prompt_model(tiny_vit("cls-token"), config, NUM_CLASSES)).eval()
    images = images_of()
    with torch.no_grad():
        before = model(images)
    prompts = _prompt_tensor(model)
    # Not a constant shift or scale: LayerNorm would all but cancel it.
    noise = torch.randn(prompts.shape, generator=torch.Generator().manual_seed(5))
    if change == "data_add":
        prompts.data.add_(noise)
    elif change == "no_grad_add":
        with torch.no_grad():
            prompts.add_(noise)
    elif change == "optimizer_step":  # in eval mode throughout: no .train(), which clears the cache
        optimizer = torch.optim.SGD(model.tuned_parameters().values(), lr=5.0)
        F.cross_entropy(model(images), torch.arange(images.shape[0]) % NUM_CLASSES).backward()
        optimizer.step()
    elif change == "load_tuned_state_dict":
        state = {k: v.clone() for k, v in model.tuned_state_dict().items()}
        state["method.prompt_embeddings"] += noise
        model.load_tuned_state_dict(state)
    elif change == "load_state_dict":
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["method.prompt_embeddings"] += noise
        model.load_state_dict(state)
    elif change == "replace_parameter":
        model.method.prompt_embeddings = torch.nn.Parameter(prompts.detach() + noise)
    elif change == "projection_only":
        model.method.projection.weight.data.add_(torch.randn(model.method.projection.weight.shape))
    if change != "load_tuned_state_dict":  # which clears the cache itself
        assert model.method.kv_cache, "the cache was emptied: its own validity rule would go untested"
    with torch.no_grad():
        after = model(images)
    expected = uncached_logits(model, images)
    assert (expected - before).abs().max() > 1e-3, "the change did not change the model"
    torch.testing.assert_close(after, expected, atol=1e-6, rtol=0)


def test_e2vpt_cache_sees_key_value_prompt_changes():
    model = randomize_(vptune.prompt_model(tiny_vit("cls-token"), vptune.E2VPTConfig(num_prompts=3, dropout=0.0), NUM_CLASSES)).eval()
    images = images_of()
    with torch.no_grad():
        model(images)
    with torch.no_grad():
        before = model(images)
    model.method.key_prompts.data.add_(torch.randn(model.method.key_prompts.shape))
    model.method.visual.prompt_embeddings.data.add_(torch.randn(model.method.visual.prompt_embeddings.shape))
    with torch.no_grad():
        after = model(images)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, uncached_logits(model, images), atol=1e-6, rtol=0)


def test_train_clears_cache_and_eval_keeps_it(cached_model):
    with torch.no_grad():
        cached_model(images_of())
    filled = list(cached_model.method.kv_cache)
    cached_model.eval()  # a server or the bench calls eval() before every batch
    assert list(cached_model.method.kv_cache) == filled
    cached_model.train()
    assert not cached_model.method.kv_cache
    assert not cached_model.backbone.training
    assert not any(m.training for m in cached_model.backbone.modules())


# --- 5. single-block transcriptions of docs/methods.md -----------------------------------------


def explicit_attention(attn, u: torch.Tensor, extra_k=None, extra_v=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_h)) v by hand, with keys/values (1, H, M, Dh) appended; then proj."""
    assert attn.gate is None and isinstance(attn.norm, torch.nn.Identity)
    B, N, _ = u.shape
    H, Dh = attn.num_heads, attn.head_dim
    qkv = u @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (qkv[..., j * H * Dh : (j + 1) * H * Dh].reshape(B, N, H, Dh).transpose(1, 2) for j in range(3))
    q, k = attn.q_norm(q), attn.k_norm(k)
    if extra_k is not None:
        k = torch.cat([k, extra_k.expand(B, -1, -1, -1)], dim=2)
        v = torch.cat([v, extra_v.expand(B, -1, -1, -1)], dim=2)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(Dh)
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    out = (weights @ v).transpose(1, 2).reshape(B, N, H * Dh)
    return out @ attn.proj.weight.T + attn.proj.bias


def finish_block(block, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    x = x + block.ls1(a)
    return x + block.ls2(block.mlp(block.norm2(x)))


@pytest.mark.parametrize("name", ["cls-token", "gap-qknorm-ls"])
def test_apt_equals_reference_formula(name):
    backbone = tiny_vit(name, depth=1)
    model = randomize_(vptune.prompt_model(backbone, vptune.APTConfig(num_prompts=6, rank=2), NUM_CLASSES), scale=0.3)
    with torch.no_grad():
        model.method.log_scale.fill_(0.3)
    images = images_of()
    method, block = model.method, backbone.blocks[0]
    parameters = [method.prompt_embeddings, method.down, method.up, method.log_scale]
    P, W1, W2, s = (t[0] for t in parameters)

    x = family_of(backbone).embed(images)[0].detach()
    u = block.norm1(x)
    a = explicit_attention(block.attn, u)
    P_hat = P + (P @ W1) @ W2
    A = torch.relu(u @ P_hat.T)  # n x p, no scaling, heads or softmax
    E = A @ P
    w = A.max(dim=-1, keepdim=True).values.detach()
    expected = finish_block(block, x, (a + w * E) * torch.exp(s))

    actual = model.forward_features(images)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # Gradients too: in particular w is detached.
    grads_actual = torch.autograd.grad(actual.square().sum(), parameters)
    grads_expected = torch.autograd.grad(expected.square().sum(), parameters)
    for got, want in zip(grads_actual, grads_expected):
        assert want.abs().sum() > 0
        assert_relative_close(got, want)


@pytest.mark.parametrize("shared_kv", [False, True])
@pytest.mark.parametrize("path", ["kv", "tokens"])
@pytest.mark.parametrize("name", ["cls-token", "gap-qknorm-ls"])
def test_e2vpt_attention_equals_explicit_softmax(name, path, shared_kv):
    backbone = tiny_vit(name, depth=1)
    config = vptune.E2VPTConfig(num_prompts=3, num_kv_prompts=4, shared_kv=shared_kv, dropout=0.0, path=path)
    model = randomize_(vptune.prompt_model(backbone, config, NUM_CLASSES)).eval()
    images = images_of()
    method, block = model.method, backbone.blocks[0]
    key_kv = method.key_prompts[0][None]  # 1, H, m, Dh
    value_kv = key_kv if shared_kv else method.value_prompts[0][None]
    prompts = method.visual.prompt_embeddings[0][None]  # 1, p, d

    x = family_of(backbone).embed(images)[0]
    prefix, p = backbone.num_prefix_tokens, prompts.shape[1]
    seq = torch.cat([x[:, :prefix], prompts.expand(x.shape[0], -1, -1), x[:, prefix:]], dim=1)
    out = finish_block(block, seq, explicit_attention(block.attn, block.norm1(seq), key_kv, value_kv))
    expected = torch.cat([out[:, :prefix], out[:, prefix + p :]], dim=1)  # visual prompt outputs dropped

    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), expected, atol=1e-5, rtol=1e-5)
        no_kv = explicit_attention(block.attn, block.norm1(seq))
        assert (finish_block(block, seq, no_kv) - out).abs().max() > 1e-3, "key-value prompts had no effect"


# --- 6. average pooling -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gap-qknorm-ls", "clip-style"])
@pytest.mark.parametrize(
    "config",
    [
        vptune.VPTConfig(num_prompts=3, deep=True),
        vptune.VPTConfig(num_prompts=3, deep=True, path="tokens"),
        vptune.VPTConfig(num_prompts=3, deep=False),
        vptune.VPTConfig(num_prompts=3, deep=False, path="tokens"),
        vptune.E2VPTConfig(num_prompts=3, dropout=0.0),
        vptune.E2VPTConfig(num_prompts=3, dropout=0.0, path="tokens"),
    ],
    ids=lambda c: f"{c.method_name()}-{c.path}",
)
def test_avg_pool_prompts_act_only_through_attention(name, config):
    backbone = tiny_vit(name)
    model = randomize_(vptune.prompt_model(backbone, config, NUM_CLASSES)).eval()
    without = vptune.prompt_model(backbone, vptune.config_for("linear"), NUM_CLASSES)
    images = images_of()
    with torch.no_grad():
        tokens = model.forward_features(images)
        # The pooled feature is the mean over the patch tokens of the prompt-free sequence.
        assert tokens.shape == without.forward_features(images).shape
        patches = backbone.norm(tokens)[:, backbone.num_prefix_tokens :]
        torch.testing.assert_close(pooled(model, images), backbone.fc_norm(patches.mean(dim=1)), atol=1e-6, rtol=0)
        assert (pooled(model, images) - pooled(without, images)).abs().max() > 1e-3
        # With every block's attention output zeroed, prompts cannot change anything.
        for block in backbone.blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
        model.method.kv_cache.clear()
        torch.testing.assert_close(pooled(model, images), pooled(without, images), atol=1e-6, rtol=0)


# --- 7. padding keys for the CPU attention kernel ----------------------------------------------


def test_key_count_pads_only_extra_keys_on_the_cpu():
    from vptune.attention import key_count

    assert key_count(49, 10, "cpu") == 64  # Swin-T's 7x7 window and 10 prompt keys
    assert key_count(49, 0, "cpu") == 49  # no extra keys: the keys are not copied, nothing is padded
    assert key_count(49, 1, "cpu") == 50  # a remainder of 2 is as fast as padding
    assert key_count(197, 50, "cpu") == 256
    assert key_count(49, 10, "meta") == 59  # other devices' kernels: untouched
    assert key_count(49, 10, "cpu", align=False) == 59  # long sequences (every family but Swin): untouched


@pytest.mark.parametrize("extra", [1, 5, 12, 15])
def test_padded_keys_change_no_output_and_no_gradient(extra):
    """attend with extra keys equals softmax(q k^T / sqrt(d_h) + position bias + key bias) v by
    hand, outputs and gradients, whether key_count pads the keys (5, 12 here) or not (1, 15)."""
    from vptune.attention import attend, key_count

    attn = tiny_vit("cls-token", depth=1).blocks[0].attn
    H, Dh = attn.num_heads, attn.head_dim
    g = torch.Generator().manual_seed(3)
    B, N = 3, 17
    x = torch.randn(B, N, H * Dh, generator=g, requires_grad=True)
    extra_k = torch.randn(1, H, extra, Dh, generator=g, requires_grad=True)
    extra_v = torch.randn(1, H, extra, Dh, generator=g, requires_grad=True)
    position = torch.randn(1, H, N, N, generator=g)
    key_bias = torch.zeros(B, 1, 1, N + extra)
    key_bias[1, ..., N] = float("-inf")  # sample 1 drops the first extra key
    pads = key_count(N, extra, "cpu") > N + extra
    assert pads == (extra in (5, 12))

    ours = attend(attn, x, extra_k, extra_v, key_bias, position_bias=position, align_keys=True)
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (qkv[..., j * H * Dh : (j + 1) * H * Dh].reshape(B, N, H, Dh).transpose(1, 2) for j in range(3))
    k = torch.cat([k, extra_k.expand(B, -1, -1, -1)], dim=2)
    v = torch.cat([v, extra_v.expand(B, -1, -1, -1)], dim=2)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(Dh) + F.pad(position, (0, extra)) + key_bias
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, H * Dh)
    expected = out @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    weights = torch.randn(expected.shape, generator=g)
    grads = torch.autograd.grad((ours * weights).sum(), (x, extra_k, extra_v))
    for got, want in zip(grads, torch.autograd.grad((expected * weights).sum(), (x, extra_k, extra_v))):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
