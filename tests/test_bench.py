"""The bench's measurements (FLOP counting, peak memory, rows) and the memory savings of the hot
path: gradient checkpointing and what one prompted block stores for backward."""

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit
from typer.testing import CliRunner

from vptune import config_for, prompt_model
from vptune.attention import block_forward, block_prompt_keys_values
from vptune.bench import KEYS, BenchSettings, Entry, _cpu_peak_bytes, parse_methods, run_bench, write_csv, write_json
from vptune.flops import count_flops

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


def saved_bytes(fn, module: torch.nn.Module | None = None) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs, leaving out
    ``module``'s parameters (those are stored anyway)."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()} if module is not None else set()
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


# --- FLOPs ------------------------------------------------------------------------------------


def test_flop_counter_counts_cpu_fused_attention_forward_and_backward():
    B, H, N, M, Dh = 2, 3, 10, 14, 16
    q = torch.randn(B, H, N, Dh, requires_grad=True)
    k, v = torch.randn(B, H, M, Dh, requires_grad=True), torch.randn(B, H, M, Dh, requires_grad=True)
    forward = 2 * (2 * B * H * N * M * Dh)  # q k^T and attn v, 2 FLOPs per multiply-add
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == forward
    backward = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert backward == forward + 5 * (2 * B * H * N * M * Dh)  # recomputed scores, then dv, dp, dq, dk


def test_flops_of_a_block_include_attention():
    backbone = tiny_vit()
    x = torch.randn(2, 17, 48)
    block = backbone.blocks[0]
    B, N, d = x.shape
    linears = 2 * B * N * (3 * d * d + d * d + 2 * d * 4 * d)
    attention = 2 * 2 * B * N * N * d
    with torch.no_grad():
        assert count_flops(lambda: block_forward(block, x)) == linears + attention


# --- gradient checkpointing -------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, options",
    [("vpt-deep", {}), ("vpt-deep", {"path": "tokens"}), ("vpt-shallow", {}), ("e2vpt", {"dropout": 0.0}),
     ("apt", {}), ("full", {})],
)
def test_grad_checkpointing_gives_identical_gradients(method, options, images):
    model = prompt_model(tiny_vit(), config_for(method, **options), 5).train()
    labels = torch.tensor([1, 3])

    def gradients():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        return {name: p.grad.clone() for name, p in model.tuned_parameters().items()}

    plain = gradients()
    plain_saved = saved_bytes(lambda: model(images))
    model.set_grad_checkpointing(True)
    recomputed = gradients()
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)
    assert saved_bytes(lambda: model(images)) < plain_saved / 2


def test_grad_checkpointing_is_off_at_inference(images):
    model = prompt_model(tiny_vit(), config_for("vpt-deep"), 5).eval()
    reference = model(images).detach()
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference, rtol=0, atol=0)


# --- what a prompted block keeps for backward -------------------------------------------------


def test_prompted_block_saves_only_what_input_gradients_need():
    """A frozen block on VPT-deep's kv path keeps, for backward: LN1's and LN2's inputs, q, the
    extended k and v, the attention output and GELU's input (and small statistics); no input of a
    frozen linear layer, and not the fused qkv output that q was sliced from."""
    backbone = tiny_vit(depth=1).requires_grad_(False)
    block = backbone.blocks[0]
    B, N, d, p = 4, 17, 48, 5
    x = torch.randn(B, N, d, requires_grad=True)
    prompts = torch.randn(1, p, d, requires_grad=True)
    k, v = block_prompt_keys_values(block, prompts)
    expected = 4 * (B * N * d * (2 + 1 + 1 + 4) + 2 * B * (N + p) * d)  # fp32
    saved = saved_bytes(lambda: block_forward(block, x, k, v), block)
    assert expected <= saved <= expected * 1.05


# --- peak memory --------------------------------------------------------------------------------


def test_cpu_peak_counts_tensor_allocations_above_the_start():
    resting = torch.ones(1024, 1024)  # allocated before: not part of the peak

    def step():
        a = torch.empty(256, 1024)  # 1 MiB
        b = torch.empty(512, 1024)  # 2 MiB, both alive: the peak
        del a, b
        torch.empty(128, 1024)  # 0.5 MiB, after the peak

    assert _cpu_peak_bytes(step) == 3 * 2**20
    assert resting.sum() > 0


# --- rows and files -----------------------------------------------------------------------------


def test_parse_methods_puts_backbone_first_and_defaults_paths():
    assert parse_methods("apt,vpt-deep,vpt-deep:tokens,backbone") == [
        Entry("backbone"), Entry("apt"), Entry("vpt-deep", "kv"), Entry("vpt-deep", "tokens")
    ]
    with pytest.raises(ValueError, match="unknown method 'vpt'"):
        parse_methods("vpt")
    with pytest.raises(ValueError, match="only vpt-deep, e2vpt take a path"):
        parse_methods("apt:kv")


def test_bench_rows_have_exactly_the_keys(tmp_path):
    settings = BenchSettings(
        backbone="vit_tiny_patch16_224", methods=parse_methods("vpt-deep:kv,full"), num_prompts=3,
        batch_size=2, memory_batch_size=2, rounds=1, warmup=0, threads=1, model_kwargs=TINY,
    )
    rows = run_bench(settings)
    assert [(row["method"], row["path"]) for row in rows] == [("backbone", ""), ("vpt-deep", "kv"), ("full", "")]
    assert all(tuple(row) == KEYS for row in rows)
    backbone, vpt, full = rows
    assert backbone["infer_ratio"] == 1.0 and backbone["extra_gflops"] == 0.0
    assert backbone["train_img_s"] is None and backbone["peak_mem_mb"] is None and backbone["tuned_params"] == 0
    assert vpt["tuned_params"] == 2 * 3 * 48 + 48 * 100 + 100  # prompts per block + the 100-class head
    assert full["extra_gflops"] == pytest.approx(2 * 48 * 100 / 1e9, abs=1e-6)  # the head alone
    assert vpt["extra_gflops"] > full["extra_gflops"]
    assert full["mem_ratio"] == 1.0 and 0 < vpt["peak_mem_mb"] < full["peak_mem_mb"]
    # Every ratio is its row's figure over the stated reference (within the rows' rounding): time
    # per image of the method's inference or training step over the frozen backbone's inference,
    # peak memory over full fine-tuning's. Speed itself is never asserted.
    for row in (vpt, full):
        assert row["infer_ratio"] == pytest.approx(backbone["infer_img_s"] / row["infer_img_s"], rel=0.01, abs=0.002)
        assert row["train_ratio"] == pytest.approx(backbone["infer_img_s"] / row["train_img_s"], rel=0.01, abs=0.002)
        assert row["mem_ratio"] == pytest.approx(row["peak_mem_mb"] / full["peak_mem_mb"], abs=0.002 + 0.1 / full["peak_mem_mb"])

    write_json(rows, tmp_path / "rows.json")
    write_csv(rows, tmp_path / "rows.csv")
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    with open(tmp_path / "rows.csv") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == KEYS and len(list(reader)) == 3


def test_cli_bench_passes_its_flags_and_writes_files(tmp_path, monkeypatch):
    import vptune.bench
    from vptune.cli import app

    seen = {}

    def fake_run_bench(settings, progress=None):
        seen["settings"] = settings
        return [dict.fromkeys(KEYS, 1) | {"method": "backbone", "path": ""}]

    monkeypatch.setattr(vptune.bench, "run_bench", fake_run_bench)
    result = CliRunner().invoke(app, [
        "bench", "--backbone", "vit_tiny_patch16_224", "--methods", "vpt-deep:tokens,apt", "--num-prompts", "7",
        "--batch-size", "3", "--precision", "bf16", "--grad-checkpointing", "--rounds", "2", "--device", "cpu",
        "--json", str(tmp_path / "b.json"), "--csv", str(tmp_path / "b.csv"),
    ])
    assert result.exit_code == 0, result.output
    s = seen["settings"]
    assert (s.backbone, s.num_prompts, s.batch_size, s.precision, s.grad_checkpointing, s.rounds) == (
        "vit_tiny_patch16_224", 7, 3, "bf16", True, 2
    )
    assert s.methods == [Entry("backbone"), Entry("vpt-deep", "tokens"), Entry("apt")]
    assert list(json.loads((tmp_path / "b.json").read_text())[0]) == list(KEYS)
    assert (tmp_path / "b.csv").read_text().splitlines()[0] == ",".join(KEYS)

    bad = CliRunner().invoke(app, ["bench", "--precision", "fp16"])
    assert bad.exit_code == 1 and "precision must be fp32 or bf16" in bad.output


# --- the last block computes only what pooling reads --------------------------------------------


@pytest.mark.parametrize("method, options", [("vpt-deep", {}), ("vpt-deep", {"path": "tokens"}), ("apt", {}), ("lora", {})])
def test_forward_equals_pooling_the_whole_last_sequence(arch, method, options, images):
    model = prompt_model(tiny_vit(arch), config_for(method, **options), 5).train()
    model.head.bias.data.normal_()

    def logits_and_grads(logits_of):
        model.zero_grad(set_to_none=True)
        logits = logits_of(images)
        logits.square().sum().backward()
        return logits.detach(), {name: p.grad.clone() for name, p in model.tuned_parameters().items()}

    fast, fast_grads = logits_and_grads(model)
    full, full_grads = logits_and_grads(lambda x: model.head(model.family.pooled_features(model.forward_features(x))))
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    for name, grad in full_grads.items():  # 1e-5 relative to the gradient's largest entry
        assert (fast_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max() + 1e-7, name
