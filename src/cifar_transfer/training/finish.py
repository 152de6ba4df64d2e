"""The end of a run: which weights it keeps, their temperature and test-time views, and the
model bundle (model.safetensors + model.json) written from them."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from cifar_transfer.artifacts import bundle
from cifar_transfer.artifacts.checkpoint import Best
from cifar_transfer.data.cifar10 import default_cache_dir
from cifar_transfer.data.datasets import fingerprint
from cifar_transfer.models import temperature
from cifar_transfer.models.inference import logits_of, predict_logits
from cifar_transfer.system import hardware
from cifar_transfer.training.core import RunCore
from cifar_transfer.training.features import (
    cache_key,
    load_cached,
    weights_fingerprint,
)


def bundle_if_best(run: RunCore) -> None:
    """A budgeted run bundles each phase that ends on its best weights (the probe first), so
    the run dir holds a usable model long before the deadline; weaker phases leave it as is."""
    last, best = run.log.score_of(run.last.epoch), run.log.score_of(run.log.best.epoch)
    if run.main and run.last.epoch > 0 and last >= best:
        summary = run_summary(run, run.last)
        if len(run.data.val_y):
            summary.update(calibrated(run, run.last, tta="off"))  # the last bundle tries TTA
        bundle.save_bundle(run.model, run.cfg, run.out, run.last.resolution, summary)


def run_summary(run: RunCore, final: Best) -> dict:
    """model.json's record of the run, for the weights validated as `final`."""
    return {
        "val_acc": final.acc if final.epoch > 0 else None, "best_epoch": run.log.best.epoch,
        "epochs_run": run.log.epochs,
        "train_images": len(run.data.train_y), "val_images": len(run.data.val_y),
        "classes": list(run.data.classes), "storage_size": run.data.storage_size,
        "data_kind": run.data.kind,
        **({"near_duplicates": run.data.near_duplicates} if run.data.near_duplicates else {}),
        **hardware.describe(run.device, final.precision),
    }  # fmt: skip


def finish(run: RunCore) -> dict:
    """Load the weights the run ends on (the best epoch's, with keep_best) and bundle them."""
    best = run.log.best
    ran = [p for p in run.plans if p.runs] or run.plans[-1:]
    final = Best(-1.0, -1, ran[-1].resolution, ran[-1].precision)  # nothing validated
    if not run.cfg.run.keep_best:
        final = run.last if run.last.epoch > 0 else final
    elif best.epoch > 0:
        final = best
        if run.main and (run.out / best.file).is_file():
            run.model.load_state_dict(load_file(run.out / best.file, device=str(run.device)))
        elif run.main:  # a best file deleted by hand: say what the bundle holds instead
            run.log.warning(f"{best.file} is missing: the bundle holds the last epoch's weights")
            final = run.last
    summary = run_summary(run, final)
    if run.main and len(run.data.val_y):
        summary.update(calibrated(run, final, run.cfg.run.tta))
    if run.main:
        bundle.save_bundle(run.model, run.cfg, run.out, final.resolution, summary)
    run.log.close()
    return summary


def calibrated(run: RunCore, final: Best, tta: str) -> dict:
    """model.json's test-time views and temperature for the kept weights `final`.

    With `tta` (run.tta) "flip", or "auto" and weights that validated on images (not on
    cached features: a probe's bundle stays one pass, and a budget reserves the mirror pass
    after fine-tuning only), the mirror images are scored once more: the bundle averages both
    views when `tta` is "flip" or when that validates better, and its val_acc is then the
    averaged views' (what `evaluate` reproduces). The temperature is fitted to the logits the
    bundle will output, once per (epoch, views): a budgeted run's intermediate and final
    bundles often share them.
    """
    flip = tta == "flip" or (tta == "auto" and validated_on_images(run, final.epoch))
    logits, labels = val_logits(run, final).cpu(), run.data.val_y.cpu()
    out: dict = {"tta": "none"}
    if flip:
        d, model = run.data, run.model
        mirrored = predict_logits(
            model, d.val_x, final.resolution, model.spec.mean, model.spec.std,
            run.cfg.run.eval_batch_size, final.precision, run.cfg.run.channels_last,
            mirrored=True,
        )  # fmt: skip
        both = (logits + mirrored) / 2
        single, flipped = (float((x.argmax(1) == labels).float().mean()) for x in (logits, both))
        keep = tta == "flip" or flipped > single
        run.log.say(f"flip TTA (run.tta={tta}): val_acc {single:.4f} single view, {flipped:.4f} "
                    f"with the mirror image: {'bundled' if keep else 'not bundled'}")  # fmt: skip
        if keep:
            logits = both
            out = {"tta": "flip", "val_acc": flipped, "val_acc_single_view": single}
    key = (final.epoch, out["tta"])
    if run.fitted_temperature is None or run.fitted_temperature[0] != key or final.epoch <= 0:
        t = temperature.fit_temperature(logits, labels)
        before, after = (temperature.ece(temperature.scaled(logits, x).softmax(1), labels)
                         for x in (1.0, t))  # fmt: skip
        run.log.say(f"temperature {t:.3f} fitted on {len(labels)} validation images "
                    f"(ECE {before:.2%} -> {after:.2%})")  # fmt: skip
        run.fitted_temperature = (key, t)
    out["temperature"] = run.fitted_temperature[1]
    return out


def validated_on_images(run: RunCore, epoch: int) -> bool:
    """Whether `epoch` was validated by a pass over the images (not over cached features)."""
    phases = [r["phase"] for r in run.log.rows if r["epoch"] == epoch]
    return bool(phases) and not run.plans[phases[-1]].cached


def val_logits(run: RunCore, final: Best) -> torch.Tensor:
    """The kept weights' validation logits at the resolution and precision they were validated
    at: the ones their epoch's validation computed (fine-tuning), else from the frozen-feature
    cache when a cached phase left their features there (the probe: no second pass of the
    backbone; validation features are extracted eagerly, as `evaluate` runs the bundle), else
    (a resumed run, torchrun) one pass as `evaluate` runs it."""
    if final.epoch in run.kept_logits:
        return run.kept_logits[final.epoch]
    d, cfg, model = run.data, run.cfg, run.model
    key = cache_key(
        cfg.model.backbone, weights_fingerprint(model.backbone), cfg.model.head,
        final.resolution, final.precision, fingerprint(d.val_x, d.val_y),
    )  # fmt: skip
    feats = load_cached(default_cache_dir() / "features" / f"{key}.safetensors", len(d.val_y),
                        run.device)
    if feats is None:
        return predict_logits(
            model, d.val_x, final.resolution, model.spec.mean, model.spec.std,
            cfg.run.eval_batch_size, final.precision, cfg.run.channels_last,
        )  # fmt: skip
    return logits_of(model.head, feats, cfg.run.eval_batch_size, final.precision, lambda x: x)
