"""Pretrain the bundled METER (``vptune pretrain --arch meter``): the fusion part on the bundled
CLIP's frozen towers, with METER's two objectives, on captioned canvases of the pretraining pool
(``minivl.pretraining_corpus``, never the benchmark pools):

- image-text matching: METER's ``ITMHead`` (``itm_score.fc``, Linear(2h, 2)) on the concatenated
  pooled feature; half of each batch matched, half with another canvas's caption;
- masked language modelling on the matched half: METER's ``MLMHead`` (transformers'
  ``BertLMPredictionHead``: transform, decoder, bias) on the fusion layers' text tokens.

The batches, the two losses, the pretrain-val figures and the step loop (checkpoints, resuming)
are the bundled ViLT's (``pretrain_vilt``: ``itm_mlm_batch``, ``losses``, ``validate``;
``pretrain.train_steps``): the same data and objective code, another model. Its pixels come in
ViLT's normalisation (mean and std 0.5) and are re-normalised here for the CLIP towers. The run
also writes the figures file (``docs/meter-fmnist-figures.json``, ``figures.py``);
``remeasure_meter`` measures the card's table again on the shipped weights
(``vptune pretrain --arch meter --evaluate-only``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..data.cache import cache_root
from ..report import machine, now
from .bundled import MEAN, STD
from .figures import evaluate_command, figures_path, training_record, write_figures
from .meter_bundled import BUNDLED_METER, HIDDEN, LAYERS, build_bundled_meter, fusion_state
from .pretrain import train_steps
from .pretrain_vilt import VAL_PAIRS, evaluate_itm_mlm, itm_mlm_batch, itm_mlm_rows, losses, validate

CARD = "METER_MODEL_CARD.md"
PRETRAINING_HEADS = ("itm_score.", "mlm_score.")  # the pretraining heads in the shipped file


class MeterPretrainer(nn.Module):
    """The bundled METER with METER's ITM and MLM heads; ``forward`` as the ViLT pretrainer's."""

    def __init__(self, meter: nn.Module, vocab_size: int) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertLMPredictionHead

        from .meter import init_weights

        self.meter = meter
        config = meter.meter_config.bert_config()
        config.vocab_size = vocab_size
        self.itm_score = nn.Module()
        self.itm_score.fc = nn.Linear(2 * HIDDEN, 2)
        self.mlm_score = BertLMPredictionHead(config)
        self.itm_score.apply(init_weights)
        self.mlm_score.apply(init_weights)
        self.register_buffer("shift", torch.tensor([(0.5 - m) / s for m, s in zip(MEAN, STD)])[:, None, None], persistent=False)
        self.register_buffer("scale", torch.tensor([0.5 / s for s in STD])[:, None, None], persistent=False)

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(ITM logits (B, 2), MLM logits over the text positions (B, T, vocab)); pixels in ViLT's normalisation."""
        from .meter import MeterFamily
        from ..methods import Method

        family = MeterFamily(self.meter)
        inputs = {"image": pixels * self.scale + self.shift, "input_ids": input_ids, "attention_mask": attention_mask}
        x, aux = family.embed(inputs)
        x = family.run_blocks(x, aux, Method())
        T = aux.text_length
        pooled = torch.cat([self.meter.cross_modal_text_pooler(x[:, :T]), self.meter.cross_modal_image_pooler(x[:, T:])], dim=-1)
        return self.itm_score.fc(pooled), self.mlm_score(x[:, :T])


def initial_pretrainer(vocab_size: int, seed: int) -> MeterPretrainer:
    """The pretrainer as a run with ``seed`` starts it: the bundled CLIP's towers, the rest drawn."""
    torch.manual_seed(seed)
    return MeterPretrainer(build_bundled_meter(), vocab_size)


def pretrainer_state(model: MeterPretrainer) -> dict[str, Tensor]:
    """What the shipped file holds: the fusion part (``fusion_state``) and the two heads."""
    state = {k: v.contiguous() for k, v in fusion_state(model.meter).items()}
    state.update({f"itm_score.{k}": v.contiguous() for k, v in model.itm_score.state_dict().items()})
    state.update({f"mlm_score.{k}": v.contiguous() for k, v in model.mlm_score.state_dict().items()})
    return state


def load_pretrainer(path: Path, vocab_size: int) -> MeterPretrainer:
    """A pretrainer with the fusion part and both heads of a file ``pretrainer_state`` wrote."""
    from safetensors.torch import load_file

    from .meter_bundled import load_bundled_meter

    model = MeterPretrainer(load_bundled_meter(path), vocab_size)
    state = load_file(str(path))
    for prefix in PRETRAINING_HEADS:
        getattr(model, prefix[:-1]).load_state_dict({k.removeprefix(prefix): v for k, v in state.items()
                                                     if k.startswith(prefix)})
    return model.eval()


def remeasure_meter(out: Path, docs: Path, seed: int = 0, mlm_probability: float = 0.15, val_pairs: int = VAL_PAIRS) -> dict:
    """``vptune pretrain --arch meter --evaluate-only``: ``validate`` on the weights in ``out`` and on
    the initialisation of a run with ``seed``, into ``docs/meter-fmnist-figures.json`` (the run's record kept)."""
    from ..data.tokenizer import WordTokenizer

    tokenizer = WordTokenizer.from_file()
    path = Path(out) / f"{BUNDLED_METER}.safetensors"
    before = validate(initial_pretrainer(len(tokenizer), seed), tokenizer, mlm_probability, pairs=val_pairs)
    evaluation = meter_evaluation(load_pretrainer(path, len(tokenizer)), before, path, tokenizer, mlm_probability, val_pairs)
    write_figures(docs, "meter", BUNDLED_METER, evaluation, evaluate_command("meter", out, docs))
    return evaluation


def meter_evaluation(model: MeterPretrainer, before: dict, path: Path, tokenizer, mlm_probability: float,
                     val_pairs: int = VAL_PAIRS) -> dict:
    """``evaluate_itm_mlm``'s figures and the frozen towers' parameter count (not in the file)."""
    towers = sum(p.numel() for e in (model.meter.vit_model, model.meter.text_transformer) for p in e.parameters())
    return {**evaluate_itm_mlm(model, before, path, PRETRAINING_HEADS, tokenizer, mlm_probability, val_pairs),
            "encoder_parameters": towers}


def pretrain_meter(
    out: Path, steps: int = 300, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.01, warmup_steps: int = 30,
    mlm_probability: float = 0.15, corpus_size: int = 30000, seed: int = 0, threads: int = 1, work_dir: Path | None = None,
    checkpoint_every: int = 25, log_every: int = 10, docs: Path | None = None, val_pairs: int = VAL_PAIRS,
) -> dict:
    """Pretrain the bundled METER's fusion part; write ``out/vptune_meter_fmnist.safetensors``,
    ``out/METER_MODEL_CARD.md`` and the figures file ``meter-fmnist-figures.json`` in ``docs``
    (default ``out``); the figures on ``val_pairs`` canvases of the pretrain-val pool. Returns the card's figures."""
    from ..data.minivl import pretraining_corpus
    from ..data.tokenizer import WordTokenizer

    torch.set_num_threads(threads)
    out, work_dir = Path(out), Path(work_dir or cache_root() / "pretrain")
    out.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    recipe = dict(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                  mlm_probability=mlm_probability, corpus_size=corpus_size, seed=seed)
    tokenizer = WordTokenizer.from_file()
    corpus = pretraining_corpus(corpus_size, pool="pretrain", seed=seed)

    model = initial_pretrainer(len(tokenizer), seed)
    encoders = [model.meter.vit_model, model.meter.text_transformer]
    for encoder in encoders:
        encoder.requires_grad_(False)
    start_figures = validate(model, tokenizer, mlm_probability, pairs=val_pairs)
    print("before pretraining: " + ", ".join(f"{k} {v:.1f}" for k, v in start_figures.items()), flush=True)
    tuned = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in tuned if p.ndim > 1], "weight_decay": weight_decay, "peak": lr},
              {"params": [p for _, p in tuned if p.ndim <= 1], "weight_decay": 0.0, "peak": lr}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def loss_at(step: int) -> tuple[Tensor, dict[str, float]]:
        for encoder in encoders:
            encoder.eval()  # frozen: no dropout either
        rng = np.random.default_rng([seed, step])  # the batch of a step is the same on resume
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        batch = itm_mlm_batch(corpus, rng.integers(0, corpus_size, batch_size), rng, tokenizer, mlm_probability, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            itm_loss, mlm_loss, itm, _ = losses(model, batch)
        accuracy = (itm.argmax(-1) == batch["itm_labels"]).float().mean().item()
        return itm_loss + mlm_loss, {"itm": itm_loss.item(), "mlm": mlm_loss.item(), "itm_acc": accuracy}

    print(f"pretraining {BUNDLED_METER}: {recipe}, {threads} threads", flush=True)
    history: list[list[float]] = []
    start, elapsed = train_steps(model, optimizer, loss_at, steps=steps, warmup_steps=warmup_steps, recipe=recipe,
                                 checkpoint_path=work_dir / f"{BUNDLED_METER}-checkpoint.pt",
                                 checkpoint_every=checkpoint_every, log_every=log_every, batch_size=batch_size,
                                 history=history)
    weights_path = out / f"{BUNDLED_METER}.safetensors"
    save_file(pretrainer_state(model), str(weights_path), metadata={"architecture": BUNDLED_METER})
    evaluation = meter_evaluation(model, start_figures, weights_path, tokenizer, mlm_probability, val_pairs)
    print("pretrain-val: " + ", ".join(f"{k} {v:.1f}" for k, v in evaluation["pretrain_val"].items()), flush=True)
    docs = Path(docs or out)
    command = (f"vptune pretrain --arch meter --out {out} --docs {docs} --steps {steps} --batch-size {batch_size} --lr {lr} "
               f"--weight-decay {weight_decay} --warmup-steps {warmup_steps} --seed {seed} --threads {threads}")
    training = training_record(command, recipe, start, elapsed, history)
    write_figures(docs, "meter", BUNDLED_METER, evaluation, evaluate_command("meter", out, docs), training)
    figures = {**evaluation, **{k: training[k] for k in ("wall_time_min", "pairs_per_s")}}
    (out / CARD).write_text(model_card(recipe, figures, command, evaluate_command("meter", out, docs), figures_path(docs, "meter")))
    print(f"wrote {weights_path} ({figures['weights_mb']:.1f} MB), {out / CARD} and {figures_path(docs, 'meter')}", flush=True)
    return figures


def model_card(recipe: dict, figures: dict, command: str, remeasure: str, figures_file: Path) -> str:
    after, rows = figures["pretrain_val"], itm_mlm_rows(figures)
    return f"""# {BUNDLED_METER}: the bundled METER

METER's architecture (docs/families.md, "METER") at a CPU's size: the bundled CLIP's two towers
(`vptune_clip_fmnist`: image tower d=192 without its last block, so 5 blocks over 64 patches and a
class token; text tower d=128, 3 layers, causal, the canvases' 114-word tokenizer) as frozen
encoders, then {LAYERS} co-attention fusion layers per stream (width {HIDDEN}, 4 heads, FFN {4 * HIDDEN}; self-attention,
cross-attention to the other stream, FFN, post-LN, transformers' BERT modules): {4 * LAYERS} attention
sites. `--backbone {BUNDLED_METER}` runs the vision-language tasks (`minivl:*`) with no download.
{figures['parameters']:,} parameters of its own (transforms, token types, fusion layers, poolers) on the
CLIP's {figures['encoder_parameters']:,}; the file holds only those (and the pretraining heads under `itm_score.`,
`mlm_score.`), the towers load from the CLIP's file.

## Data
`vptune.data.minivl.pretraining_corpus({recipe['corpus_size']}, pool="pretrain")`: captioned canvases of 1 to 4
Fashion-MNIST items from Fashion-MNIST's train split (the *pretrain* pool), each with a random truthful
paraphrase of its description; the benchmark's canvases come from the test split only. Figures below on
{after['itm_pairs'] // 2} canvases of the *pretrain-val* pool, never trained on.

## Recipe
METER's objectives with its heads: image-text matching (half of each batch with its own caption, half
with another canvas's whose canonical caption differs; `itm_score.fc`, Linear(2 x {HIDDEN}, 2), on the
concatenated pooled feature) plus masked language modelling on the matched half (15% of the words;
80% [MASK], 10% random, 10% kept; `mlm_score`, transformers' `BertLMPredictionHead`, untied); loss =
ITM + MLM. The towers frozen (eval mode, no gradient), everything else trained from METER's
initialisation: AdamW (betas 0.9/0.98, eps 1e-6), lr {recipe['lr']}, weight decay {recipe['weight_decay']} (none on 1-d
tensors), {recipe['warmup_steps']} warm-up steps then cosine, {recipe['steps']} steps of {recipe['batch_size']} pairs, dropout 0.1 in the fusion
layers, bf16 autocast, seed {recipe['seed']}. The batches, losses, validation and step loop are the bundled
ViLT's (`pretrain_vilt.py`, `pretrain.train_steps`).

## Results on pretrain-val

| measure (%) | at initialisation | after pretraining |
|---|---:|---:|
{rows}

{after['itm_pairs']} ITM pairs, {after['mlm_tokens']} masked words. The gap between the masked-word accuracy with and
without the canvases is what the fusion layers read from the picture.

- Wall time: {figures['wall_time_min']:.1f} min of training ({figures['pairs_per_s']:.0f} pairs/s), niced, one thread, on a shared machine, as recorded by the training run.
- Machine: {machine()}.
- Weights: `{BUNDLED_METER}.safetensors`, {figures['weights_mb']:.1f} MB, float32. Written {now()}.

## Limitations
A few CPU-minutes on synthetic canvases with a 114-word vocabulary, on top of a CLIP pretrained the
same way: it stands in for METER-B (pretrained on four million image-text pairs) to compare tuning
methods on a CPU, not for METER itself.

## Reproduce
```
{command}
```
Rerunning the command resumes from the last checkpoint in `$VPTUNE_CACHE/pretrain`. The run writes
its figures (the table above; recipe, steps, wall time and loss history) to
`{figures_file}`. `{remeasure}` measures the table again
on the shipped weights and on a run's initialisation, with the same code, and rewrites that file's
`evaluation` part; the training figures (wall time, pairs/s) stay as the run recorded them.
"""
