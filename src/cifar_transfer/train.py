"""Phases and the training loop: device-resident data, AMP, EMA, schedules, early stop,
checkpoint/resume, and DistributedDataParallel under torchrun (see distributed.py)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from cifar_transfer import bundle, distributed, hardware, probe, runlock
from cifar_transfer.checkpoint import (
    atomic_write_text,
    is_temp_file,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
    save_safetensors,
)
from cifar_transfer.config import Config, PhaseConfig, config_from_dict, to_toml
from cifar_transfer.data import (
    augment,
    batch_indices,
    default_cache_dir,
    load_split,
    resolve_data_dir,
    stratified_split,
    stratified_subset,
    to_model_input,
)
from cifar_transfer.errors import UserError
from cifar_transfer.evaluate import predict_logits
from cifar_transfer.features import cache_key, cached_features, fingerprint
from cifar_transfer.models import TransferModel, apply_freeze, create_model

LAST = "checkpoints/last.pt"
BEST = "checkpoints/best.safetensors"


@dataclass
class Data:
    """The split, resident on the training device as uint8 images and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    source: str


def load_data(cfg: Config, device: torch.device) -> Data:
    """Read CIFAR-10's training split, split off validation, cap training images, move to device."""
    batches_dir = resolve_data_dir(cfg.data.data_dir or None)
    x, y = load_split(batches_dir, "train")
    if cfg.data.val_size >= len(y):
        raise UserError(
            f"bad value for data.val_size: {cfg.data.val_size} leaves no training images "
            f"(the split has {len(y)}): use a smaller value"
        )
    train_idx, val_idx = stratified_split(y, cfg.data.val_size, cfg.data.seed)
    if cfg.data.train_limit:
        train_idx = stratified_subset(train_idx, y, cfg.data.train_limit, cfg.data.seed)
    return Data(
        x[train_idx].to(device), y[train_idx].to(device),
        x[val_idx].to(device), y[val_idx].to(device), str(batches_dir),
    )


def phase_resolution(cfg: Config, phase: PhaseConfig, model: TransferModel) -> int:
    """A phase's input size: its own, else the model's, else the backbone's native one."""
    return phase.resolution or cfg.model.resolution or model.spec.resolution


def uses_feature_cache(cfg: Config, phase: PhaseConfig) -> bool:
    """A frozen backbone seeing unaugmented images computes the same features every epoch."""
    return cfg.run.feature_cache and phase.freeze == "all" and phase.augment == "none"


def make_optimizer(model: torch.nn.Module, phase: PhaseConfig) -> torch.optim.Optimizer:
    """The phase's optimizer over trainable parameters; no weight decay on biases and norm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"phase {phase.name!r} freezes every parameter: nothing to train; fix its freeze")
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": phase.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if phase.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=phase.lr, momentum=phase.momentum, nesterov=phase.momentum > 0)
    if phase.optimizer == "adam":
        return torch.optim.Adam(groups, lr=phase.lr)
    return torch.optim.AdamW(groups, lr=phase.lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, phase: PhaseConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step LR schedule: constant or cosine (both with linear warmup), or one-cycle."""
    total = max(1, phase.epochs * steps_per_epoch)
    warmup = min(total - 1, round(phase.warmup_epochs * steps_per_epoch))
    if phase.schedule == "onecycle":
        pct = warmup / total if warmup > 0 else 0.25
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=phase.lr, total_steps=total, pct_start=max(pct, 1e-3),
            cycle_momentum=phase.optimizer == "sgd", div_factor=25.0, final_div_factor=1e3,
        )
    cosine = phase.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# Steps between two host reads of the loss (is it finite?), per device type: on a GPU each read
# waits for the queued steps to finish, on a CPU it costs nothing.
CHECK_EVERY = {"cpu": 1, "cuda": 50}

# metrics.jsonl fields that measure time, not the computation: they differ between two runs.
TIMING_KEYS = frozenset({"seconds", "img_per_s", "extract_seconds", "elapsed_seconds"})


def _ending_val_acc(metrics: list[dict]) -> float | None:
    """val_acc of the weights the logged epochs end on: a probe phase ends on its best penalty."""
    if not metrics:
        return None
    last = metrics[-1]
    if "l2" not in last:
        return last["val_acc"]
    rows = [m for m in metrics if m["phase"] == last["phase"] and m["val_acc"] is not None]
    return max((m["val_acc"] for m in rows), default=None)


class Trainer:
    """One run: builds everything from a Config, trains its phases, writes the run dir."""

    def __init__(self, cfg: Config, out: Path, resume: bool = False, progress: bool = True):
        self.t_start = time.perf_counter()  # elapsed_seconds counts from here: data load included
        # Under torchrun only rank 0 prints and writes; every rank computes the same state.
        self.main = distributed.is_main()
        self.cfg, self.out, self.progress = cfg, Path(out), progress and self.main
        self.world = distributed.world_size()
        check_batch_sizes(cfg, self.world)
        hardware.set_threads(cfg.run.threads)
        self.device = distributed.rank_device(hardware.pick_device(cfg.run.device))
        self.precision = hardware.pick_precision(cfg.run.precision, self.device)
        self.state = load_checkpoint(self.out / LAST) if resume else None
        torch.manual_seed(cfg.run.seed)
        self.data = load_data(cfg, self.device)
        self.model = create_model(cfg.model.backbone, cfg.model.weights, cfg.model.head).to(self.device)
        if self.world > 1:  # BatchNorm over the global batch, as one process would compute it
            self.model = distributed.convert_sync_batchnorm(self.model, self.device)
        if cfg.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.gen = torch.Generator().manual_seed(cfg.run.seed + 1)
        self.tensorboard = _tensorboard_writer(cfg, self.out) if self.main else None
        self.metrics: list[dict] = []
        self.last_val_acc: float | None = None  # of the weights the run ends on (keep_best off)
        self.best_acc, self.best_epoch = -1.0, -1
        self.elapsed_before = 0.0
        if self.state is not None:
            self.model.load_state_dict(self.state["model"])
            self.gen.set_state(self.state["generator"])
            torch.set_rng_state(self.state["torch_rng"])
            self.best_acc, self.best_epoch = self.state["best_acc"], self.state["best_epoch"]
            self.metrics = [json.loads(line) for line in self._metric_lines()][: self.state["global_epoch"]]
            self.last_val_acc = _ending_val_acc(self.metrics)
            # Earlier sessions' wall time up to their last logged epoch (work lost to a kill is not).
            self.elapsed_before = self.metrics[-1].get("elapsed_seconds", 0.0) if self.metrics else 0.0

    # -- run dir -------------------------------------------------------------------------------
    def _metric_lines(self) -> list[str]:
        path = self.out / "metrics.jsonl"
        return path.read_text().splitlines() if path.is_file() else []

    def _log_epoch(self, row: dict) -> None:
        row["elapsed_seconds"] = self.elapsed_before + time.perf_counter() - self.t_start
        self.metrics.append(row)
        self.last_val_acc = row["val_acc"]
        if self.main:
            text = "".join(json.dumps(r) + "\n" for r in self.metrics)
            atomic_write_text(self.out / "metrics.jsonl", text)
        if self.tensorboard is not None:
            _tensorboard_row(self.tensorboard, row)

    # -- one phase -----------------------------------------------------------------------------
    def _evaluated_model(self, ema: AveragedModel | None) -> torch.nn.Module:
        return ema.module if ema is not None else self.model

    def _keep_if_best(self, row: dict, ema: AveragedModel | None) -> None:
        """Record a new best val_acc and, with keep_best, save the weights that reached it."""
        if row["val_acc"] is None or row["val_acc"] <= self.best_acc:
            return
        self.best_acc, self.best_epoch = row["val_acc"], row["epoch"]
        if self.cfg.run.keep_best and self.main:
            weights = self._evaluated_model(ema).state_dict()
            save_safetensors(self.out / BEST, weights, {"epoch": str(row["epoch"])})

    def run_phase(self, p_idx: int, phase: PhaseConfig) -> None:
        """Train one phase from its start or from the checkpointed epoch inside it."""
        cfg, model, data = self.cfg, self.model, self.data
        apply_freeze(model, phase.freeze)
        res = phase_resolution(cfg, phase, model)
        # A phase may run at its own precision: bf16 extraction is 2x faster than fp32 on a bf16
        # CPU while Lite training below 224 px is faster in fp32 (BENCHMARKS.md).
        prec = hardware.pick_precision(phase.precision or cfg.run.precision, self.device)
        spec = model.spec
        cached = uses_feature_cache(cfg, phase)
        extract_seconds = 0.0
        if cached:
            train_in, train_y, val_in, extract_seconds = self._features(res, phase.cached_flips, prec)
            net: torch.nn.Module = model.head
        else:
            train_in, train_y, val_in, net = data.train_x, data.train_y, data.val_x, model
        if phase.optimizer == "lbfgs":  # validated: cached features and a linear head
            self._probe_phase(p_idx, phase, train_in, train_y, val_in, res, extract_seconds)
            return
        n_train = len(train_in)
        steps = math.ceil(n_train / phase.batch_size)
        optimizer = make_optimizer(net, phase)
        scheduler = make_scheduler(optimizer, phase, steps)
        ema = None
        if cfg.run.ema > 0 and not cached:
            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.run.ema), use_buffers=True)
        start_epoch, stale = 0, 0
        if self.state is not None and self.state["phase"] == p_idx:
            optimizer.load_state_dict(self.state["optimizer"])
            scheduler.load_state_dict(self.state["scheduler"])
            if ema is not None and self.state.get("ema") is not None:
                ema.load_state_dict(self.state["ema"])
            start_epoch, stale = self.state["phase_epoch"], self.state["stale"]
        self.state = None  # consumed: later phases start fresh
        train_net = net
        if self.world > 1:  # a new wrapper per phase: each phase trains other parameters
            ids = [self.device] if self.device.type == "cuda" else None
            train_net = DistributedDataParallel(net, device_ids=ids)
        forward = torch.compile(train_net) if cfg.run.compile and not cached else train_net
        phase_best = max(
            (m["val_acc"] for m in self.metrics if m["phase"] == p_idx and m["val_acc"] is not None),
            default=-1.0,
        )
        for epoch in range(start_epoch, phase.epochs):
            t0 = time.perf_counter()
            net.train()
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device, dtype=torch.long)
            batches = batch_indices(n_train, phase.batch_size, shuffle=True, generator=self.gen)
            bar = tqdm(
                batches, desc=f"{phase.name} {epoch + 1}/{phase.epochs}", unit="batch",
                disable=not self.progress, mininterval=1.0, dynamic_ncols=True, leave=False,
            )
            seen = 0
            # Reading a GPU value on the host (is the loss finite?) makes the host wait for the
            # GPU to finish every queued step, so there the check runs every CHECK_EVERY steps
            # and at the epoch's end; the first non-finite loss is kept for the message. No
            # checkpoint is written inside an epoch, so the last one stays good either way.
            check_every = CHECK_EVERY.get(self.device.type, 1)
            nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
            first_bad = torch.zeros((), device=self.device)
            for step, idx in enumerate(bar):
                if len(idx) < self.world:  # a tail batch too small to give every rank an image
                    continue
                # Every rank draws the same global batch (and its augmentation) from the shared
                # generator, then trains on its own slice: world size 1 takes all of it.
                part = distributed.shard(len(idx))
                idx_dev = idx.to(self.device, non_blocking=True)
                y = train_y[idx_dev[part]]
                if cached:
                    x = train_in[idx_dev[part]]
                else:
                    x = augment(data.train_x[idx_dev], phase.augment, self.gen)[part]
                    x = to_model_input(x, res, spec.mean, spec.std, cfg.run.channels_last)
                with hardware.autocast(self.device, prec):
                    logits = forward(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=phase.label_smoothing)
                finite = torch.isfinite(loss.detach())
                first_bad = torch.where(nonfinite | finite, first_bad, loss.detach())
                nonfinite |= ~finite
                if step % check_every == check_every - 1 and nonfinite:
                    self._diverged(first_bad, phase, epoch)
                optimizer.zero_grad(set_to_none=True)
                # DDP averages gradients over ranks; weighting each slice by its share of the
                # global batch makes that the global batch's mean even when slices differ in size.
                share = len(y) * self.world / len(idx)
                (loss if share == 1 else loss * share).backward()
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                if self.progress:
                    bar.set_postfix(img_s=f"{seen / (time.perf_counter() - t0):.0f}", refresh=False)
            bar.close()
            if nonfinite:  # the steps since the last check (all of them on a GPU's last stretch)
                self._diverged(first_bad, phase, epoch)
            if self.world > 1:  # sums over every rank's slices
                seen_t = torch.tensor(float(seen), dtype=torch.float64, device=self.device)
                totals = distributed.all_reduce_sum(torch.stack([loss_sum.double(), correct.double(), seen_t]))
                loss_sum, correct, seen = totals[0], totals[1], int(totals[2])
            train_seconds = time.perf_counter() - t0
            val = self._validate(cached, val_in, res, ema, prec)
            row = {
                "phase": p_idx, "phase_name": phase.name, "epoch": len(self.metrics) + 1,
                "phase_epoch": epoch + 1, "train_loss": float(loss_sum) / max(1, seen),
                "train_acc": float(correct) / max(1, seen), "val_loss": val[0], "val_acc": val[1],
                "lr": optimizer.param_groups[0]["lr"], "img_per_s": seen / train_seconds,
                "seconds": time.perf_counter() - t0, "resolution": res, "cached_features": cached,
            }
            if cached and epoch == start_epoch:
                row["extract_seconds"] = extract_seconds
            self._log_epoch(row)
            self._print_epoch(row, phase)
            self._keep_if_best(row, ema)
            if val[1] is not None:
                stale = 0 if val[1] > phase_best else stale + 1
                phase_best = max(phase_best, val[1])
            stop = bool(phase.early_stop_patience) and stale >= phase.early_stop_patience
            done = stop or epoch + 1 == phase.epochs
            if done and ema is not None:  # later phases and the final model go on from the average
                model.load_state_dict(ema.module.state_dict())
            self._checkpoint(p_idx, epoch + 1, stale, optimizer, scheduler, ema, done)
            if stop:
                if self.main:
                    print(f"early stop: {phase.name} had no val_acc gain for {stale} epochs", flush=True)
                break

    def _diverged(self, loss: torch.Tensor, phase: PhaseConfig, epoch: int) -> None:
        raise UserError(
            f"loss became {loss.item()} in phase {phase.name!r} epoch {epoch + 1}: lower the lr "
            f"({phase.lr}); the last good checkpoint is {self.out / LAST}"
        )

    def _probe_phase(
        self, p_idx: int, phase: PhaseConfig, train_in: torch.Tensor, train_y: torch.Tensor,
        val_in: torch.Tensor, res: int, extract_seconds: float,
    ) -> None:
        """Linear probe by L-BFGS: one metrics row per L2 penalty; the head ends on the best one.

        Every rank fits the same probe on the same features (seconds), so nothing is sharded.
        """
        head = self.model.head
        assert isinstance(head, torch.nn.Linear)
        t0 = time.perf_counter()
        best: tuple[tuple[float, float], float, dict] | None = None  # (score, l2, head weights)
        rows_before = len(self.metrics)
        for fit in probe.sweep(train_in, train_y, phase.l2_values, head.out_features):
            with torch.no_grad():
                head.weight.copy_(fit.weight.to(head.weight))
                head.bias.copy_(fit.bias.to(head.bias))
            val_loss, val_acc = self._validate(True, val_in, res, None)
            seconds = time.perf_counter() - t0
            row = {
                "phase": p_idx, "phase_name": phase.name, "epoch": len(self.metrics) + 1,
                "phase_epoch": len(self.metrics) - rows_before + 1, "train_loss": fit.train_loss,
                "train_acc": fit.train_acc, "val_loss": val_loss, "val_acc": val_acc, "lr": 0.0,
                "l2": fit.l2, "lbfgs_iterations": fit.iterations,
                "img_per_s": len(train_in) / max(seconds, 1e-9), "seconds": seconds,
                "resolution": res, "cached_features": True,
            }  # fmt: skip
            if row["phase_epoch"] == 1:
                row["extract_seconds"] = extract_seconds
            t0 = time.perf_counter()
            self._log_epoch(row)
            self._print_epoch(row, phase)
            score = (val_acc if val_acc is not None else -fit.train_loss, -(val_loss or 0.0))
            if best is None or score > best[0]:
                best = (score, fit.l2, {k: v.clone() for k, v in head.state_dict().items()})
            self._keep_if_best(row, None)
        assert best is not None
        head.load_state_dict(best[2])  # later phases start from the chosen penalty's head
        if self.metrics[-1]["val_acc"] is not None:
            self.last_val_acc = best[0][0]
        if self.progress:
            print(f"probe: kept l2 {best[1]:g} (best validation accuracy)", flush=True)
        self._checkpoint(p_idx, phase.epochs, 0, None, None, None, True)

    def _features(
        self, res: int, flips: bool = False, precision: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Cached frozen-backbone features: (train features, their labels, val features, seconds).

        With `flips` the training rows are each image's features followed by its mirror image's
        (labels repeated), so a head trained on them sees flip augmentation; val stays unflipped.

        Under torchrun rank 0 extracts them into the cache while the others wait, then they read
        them (a rank that cannot see rank 0's cache folder, e.g. on another machine, extracts too).
        """
        cfg, model, data = self.cfg, self.model, self.data
        precision = precision or self.precision
        folder = default_cache_dir() / "features"
        seconds = 0.0
        out = []
        sets = [("train", data.train_x, data.train_y), ("val", data.val_x, data.val_y)]
        if flips:
            sets.insert(1, ("mirrored train", data.train_x.flip(-1), data.train_y))
        with distributed.main_first():
            for name, x, y in sets:
                key = cache_key(
                    cfg.model.backbone, cfg.model.weights, cfg.model.head, res, precision,
                    fingerprint(x, y),
                )
                feats, s = cached_features(
                    folder, key, model, x, res, cfg.run.eval_batch_size, precision,
                    cfg.run.channels_last, desc=f"{name} features",
                    compile_setting=cfg.run.compile_features, progress=self.progress,
                )  # fmt: skip
                out.append(feats)
                seconds += s
        if flips:
            return torch.cat(out[:2]), data.train_y.repeat(2), out[2], seconds
        return out[0], data.train_y, out[1], seconds

    def _validate(
        self, cached: bool, val_in: torch.Tensor, res: int, ema: AveragedModel | None,
        precision: str | None = None,
    ) -> tuple[float | None, float | None]:
        if len(self.data.val_y) == 0:  # val_size=0: nothing to measure (JSON has no NaN)
            return None, None
        precision = precision or self.precision
        if self.world > 1:
            return self._validate_shards(cached, val_in, res, ema, precision)
        if cached:
            self.model.head.eval()
            with torch.inference_mode():
                logits = self.model.head(val_in).float().cpu()
        else:
            model = self._evaluated_model(ema)
            spec = self.model.spec
            logits = predict_logits(
                model, val_in, res, spec.mean, spec.std, self.cfg.run.eval_batch_size,
                precision, self.cfg.run.channels_last,
            )
        y = self.data.val_y.cpu()
        return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())

    def _validate_shards(
        self, cached: bool, val_in: torch.Tensor, res: int, ema: AveragedModel | None, precision: str
    ) -> tuple[float, float]:
        """Each rank scores its slice of the validation images; loss and hits are summed."""
        part = distributed.shard(len(val_in))
        x, y = val_in[part], self.data.val_y[part]
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        if len(y):
            if cached:
                self.model.head.eval()
                with torch.inference_mode():
                    logits = self.model.head(x).float()
            else:
                spec = self.model.spec
                logits = predict_logits(
                    self._evaluated_model(ema), x, res, spec.mean, spec.std,
                    self.cfg.run.eval_batch_size, precision, self.cfg.run.channels_last,
                ).to(self.device)
            sums[0] = F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] = (logits.argmax(1) == y).sum().double()
        loss_sum, hits = distributed.all_reduce_sum(sums).tolist()
        n = len(val_in)
        # float32 division, as the one-process mean computes it, so best-epoch ties compare equal
        # when a run is resumed under another world size.
        return loss_sum / n, float(torch.tensor(hits, dtype=torch.float32) / n)

    def _checkpoint(self, p_idx, phase_epoch, stale, optimizer, scheduler, ema, done) -> None:
        if not self.main:
            return
        save_checkpoint(self.out / LAST, {
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "ema": ema.state_dict() if ema is not None else None,
            # bf16/fp32 need no GradScaler; fp16 is not offered, so there is no scaler state to keep.
            "scaler": None, "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
            "phase": p_idx, "phase_epoch": phase_epoch, "phase_done": done, "stale": stale,
            "global_epoch": len(self.metrics), "best_acc": self.best_acc, "best_epoch": self.best_epoch,
        })

    def _print_epoch(self, row: dict, phase: PhaseConfig) -> None:
        if not self.progress:
            return
        extra = f" (features {row['extract_seconds']:.0f}s)" if "extract_seconds" in row else ""
        val = "" if row["val_acc"] is None else (
            f" val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}")
        total = len(phase.l2_values) if phase.optimizer == "lbfgs" else phase.epochs
        if "l2" in row:
            extra = f" l2 {row['l2']:g} ({row['lbfgs_iterations']} L-BFGS iterations)" + extra
        print(
            f"[{row['phase_name']} {row['phase_epoch']}/{total}] train_loss "
            f"{row['train_loss']:.4f} train_acc {row['train_acc']:.4f}{val} lr {row['lr']:.2e} {row['img_per_s']:.0f} img/s "
            f"{row['seconds']:.1f}s{extra}",
            flush=True,
        )

    # -- whole run -----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train every phase (resuming where the checkpoint says), then write the model bundle."""
        first = self.state["phase"] if self.state is not None else 0
        if self.state is not None and self.state["phase_done"]:
            first, self.state = first + 1, None
        t0 = time.perf_counter()
        for p_idx in range(first, len(self.cfg.phases)):
            phase = self.cfg.phases[p_idx]
            if phase.epochs > 0:
                self.run_phase(p_idx, phase)
        if self.cfg.run.keep_best and self.main and (self.out / BEST).is_file():
            from safetensors.torch import load_file

            self.model.load_state_dict(load_file(self.out / BEST, device=str(self.device)))
        final_acc = self.best_acc if self.best_epoch > 0 else None
        if not self.cfg.run.keep_best and self.metrics:
            final_acc = self.last_val_acc
        summary = {
            "val_acc": final_acc, "best_epoch": self.best_epoch, "epochs_run": len(self.metrics),
            "train_seconds_this_session": time.perf_counter() - t0,
            "train_images": len(self.data.train_y), "val_images": len(self.data.val_y),
            **hardware.describe(self.device, self.precision),
        }
        if self.main:
            bundle.save_bundle(self.model, self.cfg, self.out, summary)
        if self.tensorboard is not None and self.tensorboard.writer is not None:
            self.tensorboard.writer.close()
        return summary


def check_batch_sizes(cfg: Config, world: int) -> None:
    """Under torchrun each phase's batch_size is the global batch: it must split evenly over ranks."""
    for i, phase in enumerate(cfg.phases):
        if phase.epochs > 0 and phase.batch_size % world:
            raise UserError(
                f"phases.{i}.batch_size {phase.batch_size} (the global batch) does not split "
                f"evenly over {world} processes: start a number of processes that divides it, or "
                f"set a batch size that is a multiple of {world}"
            )


def _run_files(out: Path) -> list[Path]:
    """What a run dir holds besides its lock and temp files that a killed writer left."""
    return [p for p in out.iterdir() if p.name != runlock.LOCK_NAME and not is_temp_file(p)]


def claim_run_dir(out: Path, new: bool) -> runlock.RunLock:
    """Lock the run dir for this process; a new run also needs it empty. Cleans killed writes."""
    out = Path(out)
    if new:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file: give a folder path for the run")
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
    elif not out.is_dir():
        raise UserError(f"{out} is not a run dir: pass the --out of an earlier train")
    try:
        lock = runlock.acquire(out)
    except BaseException:
        if new and created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    if new and _run_files(out):
        lock.release()
        raise UserError(
            f"run dir {out} is not empty: choose a new --out, or continue it with --resume {out}"
        )
    remove_stale_temp_files(out)  # safe now: nobody else writes here
    return lock


@contextlib.contextmanager
def _holding(out: Path, new: bool) -> Iterator[None]:
    """Rank 0 holds the run dir's lock for the body; a refusal stops every rank."""
    out = Path(out)
    existed = out.exists()
    locks = []
    distributed.main_only(lambda: locks.append(claim_run_dir(out, new)))
    try:
        yield
    finally:
        for lock in locks:
            lock.release()
        if new and not existed and locks and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # bad input stopped a new run before it wrote anything: leave no trace


def load_run_config(out: Path) -> Config:
    """The resolved config a run dir was started with."""
    import tomllib

    path = Path(out) / "config.toml"
    if not path.is_file():
        raise UserError(f"{out} is not a run dir (no config.toml): pass the --out of an earlier train")
    return config_from_dict(tomllib.loads(path.read_text()))


def _tensorboard_writer(cfg: Config, out: Path):
    """A SummaryWriter on RUN_DIR/tensorboard when run.tensorboard is on, else None.

    Created lazily (when the first row is logged) so a run refused before its first epoch leaves
    no event file; on resume, events from epochs after the checkpoint are purged.
    """
    if not cfg.run.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "run.tensorboard needs the tensorboard package: pip install 'cifar-transfer[tensorboard]'"
            " (or pip install tensorboard), or drop --tensorboard"
        ) from None
    return _LazyWriter(SummaryWriter, out / "tensorboard")


class _LazyWriter:
    def __init__(self, factory, log_dir: Path) -> None:
        self.factory, self.log_dir, self.writer = factory, log_dir, None

    def get(self, first_step: int):
        if self.writer is None:
            self.writer = self.factory(log_dir=str(self.log_dir), purge_step=first_step)
        return self.writer


def _tensorboard_row(lazy: _LazyWriter, row: dict) -> None:
    """One metrics row as scalars at step = the run's epoch: loss/acc (train, val), lr, speed."""
    step = row["epoch"]
    w = lazy.get(step)
    for key, tag in (
        ("train_loss", "loss/train"), ("val_loss", "loss/val"), ("train_acc", "accuracy/train"),
        ("val_acc", "accuracy/val"), ("lr", "lr"), ("img_per_s", "speed/img_per_s"),
        ("resolution", "resolution"), ("l2", "probe/l2"),
    ):  # fmt: skip
        if row.get(key) is not None:
            w.add_scalar(tag, row[key], step)
    w.add_text("phase", f"{row['phase_name']} (phase {row['phase']})", step)
    w.flush()


def train(
    cfg: Config, out: Path, progress: bool = True, on_start: Callable[[Path], None] | None = None
) -> dict:
    """Start a new run in `out` and train it to the end (under torchrun: on every rank).

    `on_start(out)` runs on rank 0 once data and model are loaded, just before the first epoch.
    """
    out = Path(out)
    with distributed.process_group(hardware.pick_device(cfg.run.device)), _holding(out, new=True):
        # Data and model are checked before the first file is written, so bad input leaves no run dir.
        trainer = Trainer(cfg, out, resume=False, progress=progress)
        if trainer.main:
            atomic_write_text(out / "config.toml", to_toml(cfg))
            if on_start is not None:
                on_start(out)
        summary = trainer.fit()
        del trainer  # its DDP wrapper must go before the process group (see process_group)
        return summary


def resume(out: Path, progress: bool = True) -> dict:
    """Continue the run in `out` from its last checkpoint, to the same result as an unbroken run.

    The checkpoint holds no per-rank state, so a run may resume under another number of processes.
    """
    out = Path(out)
    cfg = load_run_config(out)
    with distributed.process_group(hardware.pick_device(cfg.run.device)), _holding(out, new=False):
        # A run killed before its first checkpoint starts over in its own dir.
        trainer = Trainer(cfg, out, resume=(out / LAST).is_file(), progress=progress)
        summary = trainer.fit()
        del trainer  # its DDP wrapper must go before the process group (see process_group)
        return summary
