"""Run configuration: dataclasses and validation; owns the word lists. (A value's parsing from
TOML or --set: config/values.py; recipe files and --set overrides: cifar_transfer.recipes; the
augment grammar: config/augment.py.)"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any

from cifar_transfer.config.augment import MAP_OPS, augment_ops
from cifar_transfer.config.values import FIELD_TYPES, LR_FIND, coerce
from cifar_transfer.system.errors import UserError

OPTIMIZERS = ("sgd", "adam", "adamw", "lbfgs")
SCHEDULES = ("constant", "cosine", "onecycle")
AUGMENTS = ("none", "flip", "crop-flip")  # the old one-word forms of phases.N.augment (still valid)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
BATCHNORM_MODES = ("train", "eval", "auto")  # auto: chosen by a pilot on the run's data
HEADS = ("linear", "mlp", "imagenet-top")
SELECT_BY = ("accuracy", "balanced_accuracy")
TTA = ("off", "flip", "auto")
DATA_KINDS = ("auto", "cifar10", "cifar100", "folder")
CIFAR100_LABELS = ("fine", "coarse")
BAD_IMAGES = ("skip", "refuse")
CLASS_WEIGHTS = ("none", "auto")
FREEZE_FORMS = "none | all | until:<stage> | from-layer:<N> | from-module:<N>"


@dataclass
class DataConfig:
    data_dir: str = ""  # "" = download the official archive into the cache
    # auto: told apart by --data-dir's contents (datasets.py); cifar10 | cifar100 | folder
    kind: str = "auto"
    # Seeded, class-stratified, taken from the training split: a count, or a fraction below 1
    # (0.2 = a fifth of the images). A folder's own val/ replaces it.
    val_size: int | float = 5000
    train_limit: int = 0  # 0 = all remaining training images; >0 = stratified subset (smoke runs)
    seed: int = 0  # seed of the split and the subset, independent of the training seed
    cifar100_labels: str = "fine"  # fine (100 classes) | coarse (20 superclasses)
    # Folders: the square size (px) every image is decoded to (shorter side resized to it, then
    # the centre square cut); 0 = the largest resolution the config names, else 256.
    storage_size: int = 0
    bad_images: str = "skip"  # folders: skip unreadable images with a warning listing them, or refuse
    decode_workers: int = 0  # folders: decoding threads; 0 = one per CPU core
    class_weights: str = "none"  # none | auto: weight the loss by inverse class frequency
    # Folders (issue 23, honest validation): images whose perceptual hashes agree on at least this
    # share of their 64 bits are near-duplicates; a carved validation split keeps each group of
    # them on one side, and a folder's own val/ or test/ gets its cross-split pairs listed.
    # 0 = off (a plain seeded split; no listing).
    near_duplicates: float = 0.9


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    weights: str = "imagenet"  # imagenet | imagenet-v1 | none | PATH (.pth/.safetensors)
    head: str = "linear"
    resolution: int = 0  # 0 = the backbone's native resolution


@dataclass
class PhaseConfig:
    name: str = "train"
    epochs: int = 1
    freeze: str = "none"
    optimizer: str = "sgd"  # sgd is always Nesterov momentum
    lr: float | str = 0.01  # or "find": an LR range test on the run's data (training/lr_find.py)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    # The cosine's planned length in epochs, fractional, at most `epochs` (0 = `epochs`); a
    # --budget run sets it, and its pacer moves the end to the deadline: earlier, or later up to
    # `epochs`.
    schedule_epochs: float = 0.0
    label_smoothing: float = 0.0
    # The augmentation ops in the order they run: a TOML list (["rrc", "flip"]), "rrc,flip" on the
    # command line, or an old word: "none" = [], "flip", "crop-flip" = ["crop", "flip"].
    augment: list[str] = field(default_factory=lambda: ["crop", "flip"])
    batch_size: int = 128
    resolution: int = 0  # 0 = model.resolution; set per phase for progressive resizing
    early_stop_patience: int = 0  # 0 = off; else epochs without val_acc gain before the phase stops
    # optimizer = "lbfgs" only: the L2 penalties of the linear-probe sweep (one metrics row each;
    # the best validation accuracy is kept). Ignores lr, epochs, batch_size and schedule.
    l2_values: list[float] = field(default_factory=lambda: [1e-1, 3e-2, 1e-2, 3e-3, 1e-3])
    # Phases on cached features only: also cache each training image's mirror image and train on
    # both (flip augmentation for a frozen backbone; train extraction takes 2x). Val stays plain.
    cached_flips: bool = False
    # "" = run.precision; else auto | bf16 | fp32 for this phase's extraction, training and
    # validation (e.g. bf16 feature extraction, then fp32 fine-tuning where that trains faster).
    precision: str = ""
    # "train": unfrozen BatchNorm uses batch statistics and updates its running ones (PyTorch's
    # default); "eval": every backbone BatchNorm keeps its ImageNet statistics (Keras' advice for
    # fine-tuning; needed at 32 px, where the deep layers see 1x1 maps); "auto": a short pilot of
    # each on the run's own data, the better on validation kept (training/pilot.py).
    batchnorm: str = "train"
    # ---- issue 23: mixing and layer-wise LR decay (data/mixing.py, training/optim.py)
    mixup: float = 0.0  # Beta(alpha, alpha) mixup of image pairs; 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha) CutMix; 0 = off; with mixup too, one of them per batch
    layer_decay: float = 1.0  # each backbone stage's lr = lr * layer_decay^(depth from the top); 1 = off
    # Cached partial fine-tuning (training/partial.py): with a frozen prefix (until:<stage>,
    # from-layer:N) its output is computed once per image (and mirror image, with "flip") and
    # the top blocks train on the stored maps; augment may hold flip and crop (on the maps).
    cache_frozen: bool = False

    def uses_cache(self, feature_cache: bool) -> bool:
        """A frozen backbone seeing unaugmented images computes the same features every epoch,
        so with run.feature_cache on the head trains on features extracted once."""
        return (feature_cache and self.freeze == "all" and not augment_ops(self.augment)
                and not self.mixup and not self.cutmix)

    def caches_maps(self, feature_cache: bool) -> bool:
        """A partly frozen phase with cache_frozen trains its top on stored bottom maps."""
        return feature_cache and self.cache_frozen and self.freeze not in ("none", "all")


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto = per phase, what measured fastest on this machine (fp32 or bf16 on a CPU, cached per
    # machine); on a CUDA GPU bf16, or fp16 with a gradient scaler where bf16 is missing
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False  # torch.compile the training step (measure before turning on)
    compile_features: str = "auto"  # auto | on | off: compile frozen-feature extraction
    threads: int = 0  # 0 = torch's default (all cores)
    ema: float = 0.0  # EMA decay of the weights (0 = off); validation then uses the EMA weights
    eval_batch_size: int = 256
    feature_cache: bool = True  # frozen phases without augmentation train the head on cached features
    keep_best: bool = True  # the final model is the epoch with the best val_acc
    select_by: str = "accuracy"  # or "balanced_accuracy": what "best epoch" means (imbalanced data)
    # Test-time augmentation built into the bundle: "flip" averages each image's logits with its
    # mirror image's (predictions cost two passes); "auto" does so when that validates better
    # (one more validation pass at the end of training; --budget runs use it); "off" never.
    tta: str = "off"
    tensorboard: bool = False  # also log every metrics row to RUN_DIR/tensorboard (pip extra)


@dataclass
class Config:
    recipe: str = "custom"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])
    # What the published write-up did and where this recipe deviates: kept with every run.
    source: dict[str, Any] = field(default_factory=dict)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "run": RunConfig}


def phase_resolution(cfg: Config, phase: PhaseConfig, native: int) -> int:
    """A phase's input size: its own, else the model's, else the backbone's native one."""
    return phase.resolution or cfg.model.resolution or native


def valid_keys() -> list[str]:
    """Every key --set accepts, phase keys shown for phase 0 and all phases."""
    keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)]
    keys += [f"phases.N.{f.name}" for f in fields(PhaseConfig)]
    keys += [f"phases.*.{f.name}" for f in fields(PhaseConfig) if f.name != "name"]
    return keys


def val_count(val_size: float, n: int) -> int:
    """data.val_size as a number of images: a count as it is, a fraction of the n images."""
    return val_size if isinstance(val_size, int) else round(val_size * n)


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    """Make a section dataclass from a TOML table, rejecting unknown keys."""
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise UserError(
            f"unknown config key {where}.{unknown[0]}: valid keys in [{where}] are "
            + ", ".join(names)
        )
    kwargs = {k: coerce(v, FIELD_TYPES[names[k].type], f"{where}.{k}") for k, v in table.items()}
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any], recipe: str = "custom") -> Config:
    """Build and validate a Config from a parsed TOML document."""
    raw = dict(raw)
    top = {"recipe", "description", "data", "model", "run", "phases", "source"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise UserError(f"unknown config key {unknown[0]}: valid top-level keys are {sorted(top)}")
    phases_raw = raw.get("phases") or [{}]
    if not isinstance(phases_raw, list) or not all(isinstance(p, dict) for p in phases_raw):
        raise UserError("bad value for phases: write each phase as a [[phases]] table")
    cfg = Config(
        recipe=str(raw.get("recipe", recipe)),
        description=str(raw.get("description", "")),
        data=_build(DataConfig, raw.get("data", {}), "data"),
        model=_build(ModelConfig, raw.get("model", {}), "model"),
        run=_build(RunConfig, raw.get("run", {}), "run"),
        phases=[_build(PhaseConfig, p, f"phases.{i}") for i, p in enumerate(phases_raw)],
        source=dict(raw.get("source", {})),
    )
    validate(cfg)
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def validate(cfg: Config) -> None:
    """Reject values that cannot work, each with one line naming the key and the valid range."""
    d, m, r = cfg.data, cfg.model, cfg.run
    _check(
        d.val_size >= 0 and (isinstance(d.val_size, int) or d.val_size < 1),
        f"bad value for data.val_size: {d.val_size} (a count >= 0, or a fraction below 1 such as 0.2)",
    )
    for key, value, allowed in (
        ("kind", d.kind, DATA_KINDS), ("cifar100_labels", d.cifar100_labels, CIFAR100_LABELS),
        ("bad_images", d.bad_images, BAD_IMAGES), ("class_weights", d.class_weights, CLASS_WEIGHTS),
    ):
        _check(value in allowed, f"bad value for data.{key}: {value!r} (choose one of {', '.join(allowed)})")
    _check(d.storage_size >= 0, f"bad value for data.storage_size: {d.storage_size} (0 = auto, or > 0)")
    _check(d.decode_workers >= 0, f"bad value for data.decode_workers: {d.decode_workers} (0 = auto)")
    _check(0.0 <= d.near_duplicates <= 1.0,
           f"bad value for data.near_duplicates: {d.near_duplicates} (0 = off, else a share of "
           f"matching hash bits in (0, 1], e.g. 0.9)")  # fmt: skip
    _check(d.train_limit >= 0, f"bad value for data.train_limit: {d.train_limit} (0 = all, or > 0)")
    _check(m.head in HEADS, f"bad value for model.head: {m.head!r} (choose one of {', '.join(HEADS)})")
    _check(m.resolution >= 0, f"bad value for model.resolution: {m.resolution} (0 = native, or > 0)")
    _check(bool(m.backbone), "bad value for model.backbone: empty (e.g. resnet50, efficientnet_lite0)")
    _check(
        r.precision in PRECISIONS,
        f"bad value for run.precision: {r.precision!r} (choose one of {', '.join(PRECISIONS)})",
    )
    _check(
        r.device == "auto" or re.fullmatch(r"cpu|cuda(:\d+)?|mps", r.device) is not None,
        f"bad value for run.device: {r.device!r} (auto, cpu, cuda or cuda:N)",
    )
    _check(0.0 <= r.ema < 1.0, f"bad value for run.ema: {r.ema} (0 = off, else a decay in (0, 1))")
    _check(
        r.compile_features in ("auto", "on", "off"),
        f"bad value for run.compile_features: {r.compile_features!r} (auto, on or off)",
    )
    _check(
        r.select_by in SELECT_BY,
        f"bad value for run.select_by: {r.select_by!r} (choose one of {', '.join(SELECT_BY)})",
    )
    _check(r.tta in TTA, f"bad value for run.tta: {r.tta!r} (choose one of {', '.join(TTA)})")
    _check(r.eval_batch_size > 0, f"bad value for run.eval_batch_size: {r.eval_batch_size} (> 0)")
    _check(r.threads >= 0, f"bad value for run.threads: {r.threads} (0 = default, or > 0)")
    _check(len(cfg.phases) > 0, "bad value for phases: a recipe needs at least one [[phases]] table")
    for i, p in enumerate(cfg.phases):
        k = f"phases.{i}"
        _check(p.epochs >= 0, f"bad value for {k}.epochs: {p.epochs} (must be >= 0)")
        _check(p.lr == LR_FIND or (isinstance(p.lr, (int, float)) and p.lr > 0),
               f"bad value for {k}.lr: {p.lr!r} (must be > 0, or \"find\": an LR range test)")
        _check(
            p.optimizer in OPTIMIZERS,
            f"bad value for {k}.optimizer: {p.optimizer!r} (choose one of {', '.join(OPTIMIZERS)})",
        )
        _check(
            p.schedule in SCHEDULES,
            f"bad value for {k}.schedule: {p.schedule!r} (choose one of {', '.join(SCHEDULES)})",
        )
        p.augment = augment_ops(p.augment, f"{k}.augment")  # a PhaseConfig built in code, too
        _check(p.mixup >= 0, f"bad value for {k}.mixup: {p.mixup} (0 = off, else a Beta alpha > 0)")
        _check(p.cutmix >= 0, f"bad value for {k}.cutmix: {p.cutmix} (0 = off, else a Beta alpha > 0)")
        _check(0 < p.layer_decay <= 1, f"bad value for {k}.layer_decay: {p.layer_decay} (in (0, 1]; 1 = off)")
        _check(p.batch_size > 0, f"bad value for {k}.batch_size: {p.batch_size} (must be > 0)")
        _check(p.weight_decay >= 0, f"bad value for {k}.weight_decay: {p.weight_decay} (>= 0)")
        _check(0 <= p.momentum < 1, f"bad value for {k}.momentum: {p.momentum} (in [0, 1))")
        _check(p.warmup_epochs >= 0, f"bad value for {k}.warmup_epochs: {p.warmup_epochs} (>= 0)")
        _check(p.schedule_epochs >= 0,
               f"bad value for {k}.schedule_epochs: {p.schedule_epochs} (0 = epochs, else > 0)")
        _check(
            0 <= p.label_smoothing < 1,
            f"bad value for {k}.label_smoothing: {p.label_smoothing} (in [0, 1))",
        )
        _check(p.resolution >= 0, f"bad value for {k}.resolution: {p.resolution} (0 = model's)")
        _check(
            all(v >= 0 for v in p.l2_values), f"bad value for {k}.l2_values: {p.l2_values} (>= 0)"
        )
        _check(
            p.optimizer != "lbfgs" or (p.uses_cache(r.feature_cache) and cfg.model.head == "linear"),
            f"bad value for {k}.optimizer: lbfgs fits a linear probe on cached features, so it needs "
            f"freeze = \"all\", augment = \"none\", model.head = \"linear\" and run.feature_cache",
        )  # fmt: skip
        _check(
            not p.cached_flips or p.uses_cache(r.feature_cache),
            f"bad value for {k}.cached_flips: it mirrors cached features, so it needs "
            f"freeze = \"all\", augment = \"none\" and run.feature_cache (or use augment = \"flip\")",
        )
        _check(
            not p.cache_frozen or p.freeze not in ("none", "all"),
            f"bad value for {k}.cache_frozen: it caches the frozen part of the backbone, so it "
            f"needs a freeze that leaves the top training (until:<stage>, from-layer:N), not {p.freeze!r}",
        )
        _check(
            not p.cache_frozen or all(op in MAP_OPS for op in p.augment),
            f"bad value for {k}.augment: with cache_frozen the top trains on stored maps, where only "
            f"{' and '.join(MAP_OPS)} apply, not {', '.join(op for op in p.augment if op not in MAP_OPS)}",
        )
        _check(
            p.precision in ("",) + PRECISIONS,
            f"bad value for {k}.precision: {p.precision!r} (\"\" = run.precision, or one of "
            f"{', '.join(PRECISIONS)})",
        )
        _check(
            p.batchnorm in BATCHNORM_MODES,
            f"bad value for {k}.batchnorm: {p.batchnorm!r} (choose one of {', '.join(BATCHNORM_MODES)})",
        )
        _check(p.early_stop_patience >= 0, f"bad value for {k}.early_stop_patience (>= 0)")
        _check(
            p.freeze in ("none", "all")
            or re.fullmatch(r"until:\S+", p.freeze) is not None
            or re.fullmatch(r"from-(layer|module):\d+", p.freeze) is not None,
            f"bad value for {k}.freeze: {p.freeze!r} (choose {FREEZE_FORMS})",
        )
