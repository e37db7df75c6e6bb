"""Pretrain the bundled ViLT (``vptune pretrain --arch vilt``) with ViLT's two objectives on
captioned canvases of the pretraining pool (``minivl.pretraining_corpus``: Fashion-MNIST's train
split, never the benchmark pools):

- image-text matching (ITM): half of each batch pairs a canvas with its own caption, half with
  another canvas's caption; a Linear(d, 2) head on ViLT's pooled output says which (class 1 =
  match; transformers has no ITM head, ViLT's own is this linear layer);
- masked language modelling (MLM) on the matched pairs: BERT's masking of 15% of the words
  (``tokenizer.mask_tokens``), predicted by transformers' ``ViltMLMHead`` (from
  ``ViltForMaskedLM``, its decoder tied to the word embeddings).

The transformer starts from the bundled ViT (``vilt_bundled.init_from_vit``); everything is
tuned, the ViT-initialised tensors at a lower learning rate. The step loop, its checkpoints
and resuming are ``pretrain.train_steps`` (shared with the bundled CLIP). At the end the ViLT
weights (with the ITM and MLM heads, under ``itm.`` and ``mlm_score.``; loading takes ``vilt.``),
a model card with ITM and MLM accuracy on the pretrain-val pool and the figures file
(``docs/vilt-fmnist-figures.json``, ``figures.py``) are written; ``remeasure_vilt`` measures those
accuracies again on the shipped weights (``vptune pretrain --arch vilt --evaluate-only``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from ..data.cache import cache_root
from ..report import machine, now
from .figures import evaluate_command, figures_path, training_record, weights_figures, write_figures
from .pretrain import train_steps
from .vilt_bundled import BUNDLED_VILT, LAYERS, TEXT_LENGTH, init_from_vit, vilt_config

CARD = "VILT_MODEL_CARD.md"
PRETRAINING_HEADS = ("itm.", "mlm_score.")  # the pretraining heads in the shipped file; the backbone is under vilt.
VAL_PAIRS = 1000


class ViltPretrainer(nn.Module):
    """transformers' ``ViltForMaskedLM`` (the ViltModel and its MLM head) and an ITM head."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        from transformers import ViltForMaskedLM

        self.mlm = ViltForMaskedLM(vilt_config(vocab_size))
        self.itm = nn.Linear(self.mlm.config.hidden_size, 2)
        nn.init.normal_(self.itm.weight, std=0.02)
        nn.init.zeros_(self.itm.bias)

    @property
    def vilt(self) -> nn.Module:
        return self.mlm.vilt

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(ITM logits (B, 2), MLM logits over the text positions (B, T, vocab))."""
        out = self.vilt(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels)
        text = out.last_hidden_state[:, : input_ids.shape[1]]
        return self.itm(out.pooler_output), self.mlm.mlm_score(text)


def initial_pretrainer(vocab_size: int, seed: int) -> ViltPretrainer:
    """The pretrainer as a run with ``seed`` starts it: new tensors drawn, the transformer from the
    bundled ViT's shipped weights."""
    from .loading import load_backbone

    torch.manual_seed(seed)
    model = ViltPretrainer(vocab_size)
    init_from_vit(model.vilt, load_backbone())
    return model


def pretrainer_state(model: ViltPretrainer) -> dict[str, Tensor]:
    """What the shipped file holds: the ViLT under ``vilt.``, the heads under ``itm.`` and ``mlm_score.``."""
    state = {f"vilt.{k}": v.contiguous() for k, v in model.vilt.state_dict().items()}
    state.update({f"itm.{k}": v.contiguous() for k, v in model.itm.state_dict().items()})
    state.update({f"mlm_score.{k}": v.contiguous() for k, v in model.mlm.mlm_score.state_dict().items()
                  if k != "decoder.weight"})  # tied: the word embedding
    return state


def load_pretrainer(path: Path, vocab_size: int) -> ViltPretrainer:
    """A pretrainer with the ViLT and both heads of a file ``pretrainer_state`` wrote."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    model = ViltPretrainer(vocab_size)
    for prefix, module in (("vilt.", model.vilt), ("itm.", model.itm), ("mlm_score.", model.mlm.mlm_score)):
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        result = module.load_state_dict(part, strict=False)
        missing = [k for k in result.missing_keys if not (prefix == "mlm_score." and k == "decoder.weight")]
        if missing or result.unexpected_keys:
            raise ValueError(f"{path} is not a {BUNDLED_VILT} pretraining file: missing {missing[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]} under {prefix!r}")
    return model.eval()


def to_input(canvases: np.ndarray) -> Tensor:
    """uint8 grey canvases (B, S, S) to ViLT's input: RGB, mean and std 0.5."""
    x = torch.from_numpy(np.ascontiguousarray(canvases)).float() / 255
    return (x[:, None].expand(-1, 3, -1, -1) - 0.5) / 0.5


def mismatched(rng: np.random.Generator, canonical: np.ndarray, index: np.ndarray) -> np.ndarray:
    """For each of ``index``, another canvas whose canonical caption differs (an ITM negative)."""
    other = rng.integers(0, len(canonical), len(index))
    for _ in range(100):
        same = canonical[other] == canonical[index]
        if not same.any():
            return other
        other[same] = rng.integers(0, len(canonical), int(same.sum()))
    raise RuntimeError("the corpus has too few distinct captions to draw ITM negatives")


def itm_mlm_batch(corpus, index: np.ndarray, rng: np.random.Generator, tokenizer, mlm_probability: float,
                  generator: torch.Generator) -> dict[str, Tensor]:
    """Pixels, (masked) text and targets for the canvases ``index``: the first half with its own
    caption (ITM 1, MLM targets), the second half with a mismatched one (ITM 0, no MLM)."""
    half = len(index) // 2
    captions = corpus.captions[index].copy()
    captions[half:] = corpus.captions[mismatched(rng, corpus.canonical, index[half:])]
    text = tokenizer(captions.tolist(), padding="longest", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt")
    from ..data.tokenizer import mask_tokens

    ids, labels = mask_tokens(text["input_ids"], tokenizer, mlm_probability, generator)
    ids[half:], labels[half:] = text["input_ids"][half:], -100
    itm = torch.zeros(len(index), dtype=torch.long)
    itm[:half] = 1
    return {"pixels": to_input(corpus.images[index]), "input_ids": ids, "attention_mask": text["attention_mask"],
            "mlm_labels": labels, "itm_labels": itm}


def losses(model: ViltPretrainer, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ITM loss, MLM loss, ITM logits, MLM logits) of a batch."""
    itm, mlm = model(batch["pixels"], batch["input_ids"], batch["attention_mask"])
    itm_loss = F.cross_entropy(itm.float(), batch["itm_labels"])
    mlm_loss = F.cross_entropy(mlm.float().flatten(0, 1), batch["mlm_labels"].flatten(), ignore_index=-100)
    return itm_loss, mlm_loss, itm, mlm


@torch.no_grad()
def validate(model: ViltPretrainer, tokenizer, mlm_probability: float = 0.15, batch_size: int = 200,
             pairs: int = VAL_PAIRS) -> dict[str, float]:
    """ITM and MLM accuracy (%) on ``pairs`` canvases of the pretrain-val pool (fixed draws),
    and the MLM accuracy with every canvas blanked: what the text alone lets it fill in."""
    from ..data.minivl import pretraining_corpus

    corpus = pretraining_corpus(pairs, pool="pretrain-val")
    rng, generator = np.random.default_rng(7), torch.Generator().manual_seed(7)
    model.eval()
    counts = dict(itm=0, itm_n=0, mlm=0, blank=0, mlm_n=0)
    for start in range(0, pairs, batch_size):
        index = np.arange(start, min(start + batch_size, pairs))
        # every canvas twice: with its caption, then with a mismatched one
        batch = itm_mlm_batch(corpus, np.concatenate([index, index]), rng, tokenizer, mlm_probability, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            itm, mlm = model(batch["pixels"], batch["input_ids"], batch["attention_mask"])
            _, blank = model(torch.full_like(batch["pixels"], -1.0), batch["input_ids"], batch["attention_mask"])
        counts["itm"] += (itm.argmax(-1) == batch["itm_labels"]).sum().item()
        counts["itm_n"] += len(itm)
        chosen = batch["mlm_labels"] != -100
        counts["mlm"] += (mlm.argmax(-1)[chosen] == batch["mlm_labels"][chosen]).sum().item()
        counts["blank"] += (blank.argmax(-1)[chosen] == batch["mlm_labels"][chosen]).sum().item()
        counts["mlm_n"] += int(chosen.sum())
    model.train()
    return {"itm_accuracy": 100.0 * counts["itm"] / counts["itm_n"], "mlm_accuracy": 100.0 * counts["mlm"] / counts["mlm_n"],
            "mlm_accuracy_blank_image": 100.0 * counts["blank"] / counts["mlm_n"], "itm_pairs": counts["itm_n"],
            "mlm_tokens": counts["mlm_n"]}


def pretrain_vilt(
    out: Path, steps: int = 400, batch_size: int = 64, lr: float = 1e-3, vit_lr: float = 3e-4, weight_decay: float = 0.01,
    warmup_steps: int = 50, mlm_probability: float = 0.15, corpus_size: int = 30000, seed: int = 0, threads: int = 1,
    work_dir: Path | None = None, checkpoint_every: int = 25, log_every: int = 10, val_pairs: int = VAL_PAIRS,
    docs: Path | None = None,
) -> dict:
    """Pretrain the bundled ViLT; write ``out/vptune_vilt_fmnist.safetensors``, ``out/VILT_MODEL_CARD.md``
    (figures on ``val_pairs`` canvases of the pretrain-val pool) and the figures file
    ``vilt-fmnist-figures.json`` in ``docs`` (default ``out``). Returns the card's figures."""
    from ..data.minivl import pretraining_corpus
    from ..data.tokenizer import WordTokenizer

    torch.set_num_threads(threads)
    out, work_dir = Path(out), Path(work_dir or cache_root() / "pretrain")
    out.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    recipe = dict(steps=steps, batch_size=batch_size, lr=lr, vit_lr=vit_lr, weight_decay=weight_decay,
                  warmup_steps=warmup_steps, mlm_probability=mlm_probability, corpus_size=corpus_size, seed=seed)
    tokenizer = WordTokenizer.from_file()
    corpus = pretraining_corpus(corpus_size, pool="pretrain", seed=seed)

    model = initial_pretrainer(len(tokenizer), seed)
    start_figures = validate(model, tokenizer, mlm_probability, pairs=val_pairs)
    print("before pretraining: " + ", ".join(f"{k} {v:.1f}" for k, v in start_figures.items()), flush=True)
    from_vit = ("vilt.embeddings.patch_embeddings.", "vilt.embeddings.cls_token", "vilt.embeddings.position_embeddings",
                "vilt.encoder.", "vilt.layernorm.")
    named = list(model.mlm.named_parameters())  # the tied decoder weight is the word embedding, listed once
    groups = []
    for peak, pick in ((vit_lr, lambda n: n.startswith(from_vit)), (lr, lambda n: not n.startswith(from_vit))):
        params = [(n, p) for n, p in named if pick(n)] + ([] if peak == vit_lr else list(model.itm.named_parameters()))
        groups.append({"params": [p for _, p in params if p.ndim > 1], "weight_decay": weight_decay, "peak": peak})
        groups.append({"params": [p for _, p in params if p.ndim <= 1], "weight_decay": 0.0, "peak": peak})
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def loss_at(step: int) -> tuple[Tensor, dict[str, float]]:
        rng = np.random.default_rng([seed, step])  # the batch of a step is the same on resume
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        batch = itm_mlm_batch(corpus, rng.integers(0, corpus_size, batch_size), rng, tokenizer, mlm_probability, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            itm_loss, mlm_loss, itm, _ = losses(model, batch)
        accuracy = (itm.argmax(-1) == batch["itm_labels"]).float().mean().item()
        return itm_loss + mlm_loss, {"itm": itm_loss.item(), "mlm": mlm_loss.item(), "itm_acc": accuracy}

    print(f"pretraining {BUNDLED_VILT}: {recipe}, {threads} threads", flush=True)
    history: list[list[float]] = []
    start, elapsed = train_steps(model, optimizer, loss_at, steps=steps, warmup_steps=warmup_steps, recipe=recipe,
                                 checkpoint_path=work_dir / f"{BUNDLED_VILT}-checkpoint.pt",
                                 checkpoint_every=checkpoint_every, log_every=log_every, batch_size=batch_size,
                                 history=history)
    weights_path = out / f"{BUNDLED_VILT}.safetensors"
    save_file(pretrainer_state(model), str(weights_path), metadata={"architecture": BUNDLED_VILT})
    evaluation = evaluate_itm_mlm(model, start_figures, weights_path, PRETRAINING_HEADS, tokenizer, mlm_probability, val_pairs)
    print("pretrain-val: " + ", ".join(f"{k} {v:.1f}" for k, v in evaluation["pretrain_val"].items()), flush=True)
    docs = Path(docs or out)
    command = (f"vptune pretrain --arch vilt --out {out} --docs {docs} --steps {steps} --batch-size {batch_size} --lr {lr} "
               f"--image-lr {vit_lr} --weight-decay {weight_decay} --warmup-steps {warmup_steps} --seed {seed} "
               f"--threads {threads}")
    training = training_record(command, recipe, start, elapsed, history)
    write_figures(docs, "vilt", BUNDLED_VILT, evaluation, evaluate_command("vilt", out, docs), training)
    figures = {**evaluation, **{k: training[k] for k in ("wall_time_min", "pairs_per_s")}}
    (out / CARD).write_text(model_card(recipe, figures, command, evaluate_command("vilt", out, docs), figures_path(docs, "vilt")))
    print(f"wrote {weights_path} ({figures['weights_mb']:.1f} MB), {out / CARD} and {figures_path(docs, 'vilt')}", flush=True)
    return figures


def evaluate_itm_mlm(model: nn.Module, before: dict, weights_path: Path, heads: tuple[str, ...], tokenizer,
                     mlm_probability: float = 0.15, pairs: int = VAL_PAIRS) -> dict:
    """The model card's evaluation figures of a ViLT or METER pretrainer whose weights are the file
    ``weights_path``: ``validate`` after pretraining and at initialisation (``before``), the file's
    parameters (but the pretraining ``heads``) and size."""
    return {"pretrain_val": validate(model, tokenizer, mlm_probability, pairs=pairs), "before": before,
            **weights_figures(weights_path, heads)}


def remeasure_vilt(out: Path, docs: Path, seed: int = 0, mlm_probability: float = 0.15, val_pairs: int = VAL_PAIRS) -> dict:
    """``vptune pretrain --arch vilt --evaluate-only``: ``validate`` on the weights in ``out`` and on the
    initialisation of a run with ``seed``, into ``docs/vilt-fmnist-figures.json`` (the run's record kept)."""
    from ..data.tokenizer import WordTokenizer

    tokenizer = WordTokenizer.from_file()
    path = Path(out) / f"{BUNDLED_VILT}.safetensors"
    before = validate(initial_pretrainer(len(tokenizer), seed), tokenizer, mlm_probability, pairs=val_pairs)
    evaluation = evaluate_itm_mlm(load_pretrainer(path, len(tokenizer)), before, path, PRETRAINING_HEADS, tokenizer,
                                  mlm_probability, val_pairs)
    write_figures(docs, "vilt", BUNDLED_VILT, evaluation, evaluate_command("vilt", out, docs))
    return evaluation


def itm_mlm_rows(figures: dict) -> str:
    """The model card's table rows of ``validate``'s figures, before and after pretraining."""
    after, before = figures["pretrain_val"], figures["before"]
    return "\n".join(f"| {label} | {before[key]:.1f} | {after[key]:.1f} |" for key, label in (
        ("itm_accuracy", "image-text matching accuracy (half matched, half not; chance 50)"),
        ("mlm_accuracy", "masked-word accuracy"),
        ("mlm_accuracy_blank_image", "masked-word accuracy with every canvas blanked (text alone)")))


def model_card(recipe: dict, figures: dict, command: str, remeasure: str, figures_file: Path) -> str:
    after, rows = figures["pretrain_val"], itm_mlm_rows(figures)
    return f"""# {BUNDLED_VILT}: the bundled ViLT

A small transformers `ViltModel` (d=192, {LAYERS} layers, 3 heads, MLP 768; 32x32 canvases in
patches of 4, so 64 patches and an image [CLS]; text of at most {TEXT_LENGTH} tokens of the canvases'
word tokenizer, `vptune/data/minivl_vocab.json`, 114 words), shipped so that the vision-language
tasks (`minivl:vqa`, `minivl:nlvr`, `minivl:retrieval`) run with no download:
`--backbone {BUNDLED_VILT}`. {figures['parameters']:,} parameters (the file also holds the
pretraining heads, `itm.` and `mlm_score.`; the backbone loads `vilt.`).

## Data
`vptune.data.minivl.pretraining_corpus({recipe['corpus_size']}, pool="pretrain")`: captioned canvases of 1 to 4
Fashion-MNIST items drawn from Fashion-MNIST's train split (the *pretrain* pool), each with one random
truthful paraphrase of its description. The vision-language benchmark's canvases come from
Fashion-MNIST's test split only, never these. The figures below are on {after['itm_pairs'] // 2} canvases of the
*pretrain-val* pool (train images 55,000-59,999), also never trained on.

## Recipe
As ViLT starts from a ViT, the transformer (patch projection, class token, position embedding, the
first {LAYERS} blocks, final norm) starts from the bundled ViT `vptune_vit_fmnist`, its pixel
normalisation folded into the patch projection so that the model reads ViLT's (mean and std 0.5);
word and position embeddings of the text, token types, pooler and heads are new. ViLT's objectives:
image-text matching (half of each batch with its own caption, half with a random other canvas's
caption whose canonical caption differs; Linear(d, 2) on the pooled output) plus masked language
modelling on the matched half (15% of the words; 80% [MASK], 10% a random word, 10% kept;
transformers' `ViltMLMHead`, decoder tied to the word embeddings); loss = ITM + MLM.
AdamW (betas 0.9/0.98, eps 1e-6), lr {recipe['lr']} for the new tensors and {recipe['vit_lr']} for those from the
ViT, weight decay {recipe['weight_decay']} (none on 1-d tensors), {recipe['warmup_steps']} warm-up steps then cosine;
{recipe['steps']} steps of {recipe['batch_size']} pairs; all patches (no patch sampling); bf16 autocast; seed {recipe['seed']}.

## Results on pretrain-val

| measure (%) | at initialisation | after pretraining |
|---|---:|---:|
{rows}

{after['itm_pairs']} ITM pairs, {after['mlm_tokens']} masked words. The masked-word accuracy with blanked canvases
measures what the caption's own words give away (grammar, the template); the gap to the
accuracy with the canvases is what the model reads from the picture.

- Wall time: {figures['wall_time_min']:.1f} min of training ({figures['pairs_per_s']:.0f} pairs/s), niced, one thread, on a machine shared with other jobs (wall time, not CPU time), as recorded by the training run.
- Machine: {machine()}.
- Weights: `{BUNDLED_VILT}.safetensors`, {figures['weights_mb']:.1f} MB, float32. Written {now()}.

## Limitations
About {figures['wall_time_min']:.0f} minutes (wall) of one niced CPU thread on synthetic grey canvases with a 114-word
vocabulary: it knows only these canvases' words and pictures. It stands in for ViLT-B/32 (pretrained on
four million image-text pairs) to compare tuning methods on a CPU, not for ViLT itself.

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
