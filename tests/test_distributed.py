"""DistributedDataParallel under torchrun: two CPU processes (gloo), each on half a batch, take
the same optimiser step (with --scale-lr, at the same lr) as one process on the whole batch;
``vptune train`` under torchrun writes its run folder once, from rank 0."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vptune.train import fit

WORKER = '''
import sys, types

import torch
import vptune
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import TensorDataset

from vptune.train import TrainConfig, fit
from vptune.train.distributed import process_group_from_env

sys.path.insert(0, TESTS_DIR)  # the tests' honest weights (the worker runs from a temporary folder)
from honest import honest_


def setup(batch_size, clip_grad=None):
    torch.manual_seed(0)
    backbone = honest_(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=0), seed=0).eval()
    model = vptune.prompt_model(backbone, vptune.config_for("vpt-deep", num_prompts=4), num_classes=5)
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 5, (8,), generator=generator)
    data = types.SimpleNamespace(train=TensorDataset(images, labels), val=TensorDataset(images, labels))
    # --scale-lr: peak lr 16 * 8 / 256 = 0.5 for one process on batch 8 and for two on 4 each (the
    # world-size factor), so the two runs agree only if that factor is applied.
    # clip_grad: each process clips the gradient DDP has averaged over both, so they clip alike.
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=16.0, scale_lr=True, weight_decay=0.01, warmup_epochs=0,
                      clip_grad=clip_grad, device="cpu")
    return model, data, cfg


if __name__ == "__main__":
    torch.set_num_threads(1)
    model, data, cfg = setup(batch_size=4, clip_grad=float(sys.argv[2]) if len(sys.argv) > 2 else None)
    with process_group_from_env(torch.device("cpu")):
        import torch.distributed as dist

        result = fit(model, data, cfg, progress=False)
        state = {"tuned": model.tuned_state_dict(), "world": dist.get_world_size(), "train_loss": result["train_loss"],
                 "val_top1": result["val_top1"]}
        torch.save(state, f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
'''

NAN_ON_ONE_RANK = WORKER.split('if __name__ == "__main__":')[0] + '''
if __name__ == "__main__":
    from pathlib import Path

    from vptune.train import NonFiniteLossError

    torch.set_num_threads(1)
    model, data, cfg = setup(batch_size=4)
    with process_group_from_env(torch.device("cpu")):
        import torch.distributed as dist

        rank = dist.get_rank()
        if rank == 1:  # a hook, not a weight: DDP would overwrite a NaN weight with rank 0's
            model.head.register_forward_hook(lambda module, inputs, output: output * float("nan"))
        try:
            fit(model, data, cfg, progress=False)
        except NonFiniteLossError as err:
            Path(sys.argv[1], f"rank{rank}.txt").write_text(str(err))
'''


def worker_code(template: str) -> str:
    return template.replace("TESTS_DIR", repr(str(Path(__file__).resolve().parent)))


def torchrun(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("clip_grad", [None, 0.05])
def test_two_processes_take_the_step_of_one_process_on_the_combined_batch(tmp_path, clip_grad):
    worker = tmp_path / "worker.py"
    worker.write_text(worker_code(WORKER))
    torchrun(str(worker), str(tmp_path), *([] if clip_grad is None else [str(clip_grad)]), cwd=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]

    setup = runpy.run_path(str(worker))["setup"]
    model, data, cfg = setup(batch_size=8, clip_grad=clip_grad)
    before = {name: t.clone() for name, t in model.tuned_state_dict().items()}
    result = fit(model, data, cfg, progress=False)
    single = model.tuned_state_dict()
    assert all(not torch.equal(before[name], single[name]) for name in single)  # the step moved every tuned tensor
    if clip_grad is not None:  # the limit bites: unclipped, the step is another
        unclipped, _, plain = setup(batch_size=8)
        fit(unclipped, data, plain, progress=False)
        assert any(not torch.equal(unclipped.tuned_state_dict()[name], single[name]) for name in single)
    for rank in ranks:
        assert rank["tuned"].keys() == single.keys()
        for name, tensor in single.items():
            torch.testing.assert_close(rank["tuned"][name], tensor, atol=1e-6, rtol=0)
        assert abs(rank["train_loss"] - result["train_loss"]) < 1e-6  # summed over both processes
        assert rank["val_top1"] == result["val_top1"]  # evaluation counts summed over the shards


def test_a_nan_loss_on_one_process_stops_every_process(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(worker_code(NAN_ON_ONE_RANK))
    torchrun(str(worker), str(tmp_path), cwd=tmp_path, timeout=120)  # without the shared check rank 0 waits forever
    assert "loss became nan" in (tmp_path / "rank1.txt").read_text()
    assert "loss became NaN or infinite on another process" in (tmp_path / "rank0.txt").read_text()


def test_vptune_train_under_torchrun_writes_the_run_once(tmp_path):
    from safetensors.torch import save_file

    from vptune.backbones.bundled import BUNDLED_BACKBONE, build_bundled

    torch.manual_seed(0)
    weights = tmp_path / "random.safetensors"
    save_file(build_bundled().state_dict(), str(weights))
    out = tmp_path / "run"
    vptune = Path(sys.executable).with_name("vptune")
    done = torchrun(
        str(vptune), "train", "--method", "linear", "--data", "mini:digits", "--out", str(out),
        "--backbone", BUNDLED_BACKBONE, "--weights", str(weights), "--epochs", "1", "--batch-size", "200",
        "--lr", "0.5", "--warmup-epochs", "0", "--device", "cpu", cwd=tmp_path,
    )
    assert done.stdout.count("run folder:") == 1  # only rank 0 prints
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_images"] == 800 and metrics["steps"] == 2  # 800 images, 2 x 200 per step
    assert not (out / "checkpoint.pt").exists()
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".tmp") == []
