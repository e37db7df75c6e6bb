"""Extra GFLOPs per denoising step of each method in Stable Diffusion 1.5's UNet, counted on
torch's meta device (the shapes of SD 1.5's UNet2DConditionModel, no weights, nothing downloaded):
one UNet pass on one 64x64x4 latent with 77 text states of width 768, without classifier-free
guidance (which doubles every figure), as generation runs it (prompt keys and values from the
cache: what a step computes). FLOPs are torch's count, 2 per multiply-add.

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/diffusion_cost.py --json docs/diffusion-cost-sd15.json
"""

from __future__ import annotations

import argparse
import json

import torch

# label, method, options, sites
ROWS = [
    ("apt-cross", "apt", {"num_prompts": 16}, "cross"),
    ("apt-self", "apt", {"num_prompts": 16}, "self"),
    ("apt-both", "apt", {"num_prompts": 16}, "both"),
    ("vpt-deep-cross", "vpt-deep", {"num_prompts": 16}, "cross"),
    ("vpt-deep-cross-tokens", "vpt-deep", {"num_prompts": 16, "path": "tokens"}, "cross"),
    ("lora", "lora", {"rank": 4, "alpha": 4.0}, "both"),
    ("full-dreambooth", "full", {}, "both"),
]
SD15 = dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)  # the rest: diffusers' defaults, SD 1.x's UNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel

    import vptune.backbones.unet as walks
    from vptune.backbones.unet import UNetFamily
    from vptune.flops import count_flops
    from vptune.methods import config_for

    cache: dict = {}

    def cached(method, key, prompts, compute):  # the key-value cache without its equality check (none on meta)
        if key not in cache:
            cache[key] = compute(prompts)
        return cache[key]

    walks.cached_prompt_keys_values = cached

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15).requires_grad_(False).eval()
        latents, steps, text = torch.zeros(1, 4, 64, 64), torch.tensor([10]), torch.zeros(1, 77, 768)
    with torch.no_grad():
        frozen = count_flops(lambda: unet(latents, steps, encoder_hidden_states=text))
    rows = {}
    for label, method, options, sites in ROWS:
        family = UNetFamily(unet, sites)
        cache.clear()
        with torch.device("meta"):
            module = config_for(method, **options).build(family)
            net = module.prepare_backbone(unet)
        walk = family if net is unet else UNetFamily(net, sites)
        module.eval()
        with torch.no_grad():
            walk.predict_noise(module, latents, steps, text)  # fills the key-value cache
            tuned = count_flops(lambda: walk.predict_noise(module, latents, steps, text))
        params = sum(p.numel() for p in module.parameters()) if net is unet else sum(
            p.numel() for p in net.parameters() if p.requires_grad)
        rows[label] = {"method": method, "options": options, "sites": sites, "tuned_params": params,
                       "extra_gflops_per_step": (tuned - frozen) / 1e9,
                       "extra_percent": 100.0 * (tuned - frozen) / frozen}
        print(label, rows[label], flush=True)
    result = {"unet": "Stable Diffusion 1.5's UNet2DConditionModel shape " + json.dumps(SD15),
              "unet_params": sum(p.numel() for p in unet.parameters()), "frozen_gflops_per_step": frozen / 1e9,
              "sites": {"self": len(UNetFamily(unet, "self").sites), "cross": len(UNetFamily(unet, "cross").sites)},
              "textual-inversion": "0: its word changes the text states, encoded once per prompt",
              "rows": rows, "command": "PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/diffusion_cost.py --json " + args.json}
    with open(args.json, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
