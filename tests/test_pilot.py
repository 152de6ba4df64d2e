"""A fine-tune's data-dependent settings (issue 31): the LR range test (`lr = "find"`) and the
BatchNorm pilot (`batchnorm = "auto"`), with the switch taken when the pilot validates below the
probe; what they chose lands in config.toml and pilot.json, and a resumed run keeps it."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import interrupted_run
from safetensors.torch import load_file

from cifar_transfer.artifacts import rundir
from cifar_transfer.cli import main
from cifar_transfer.config import PhaseConfig
from cifar_transfer.recipes import apply_overrides, load_recipe
from cifar_transfer.training import lr_find, phases, pilot
from cifar_transfer.training import run as train_mod
from cifar_transfer.training.loop import PhaseInputs


def separable(n: int = 256, d: int = 16, classes: int = 3, seed: int = 0) -> PhaseInputs:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, d, generator=g) + 3 * torch.nn.functional.one_hot(y, d).float()
    return PhaseInputs(x, y, x[:64], y[:64], cached=True, resolution=0, mean=(0,), std=(1,))


def test_the_lr_range_test_finds_a_finite_lr_in_its_range_seeded_and_leaves_the_weights():
    inputs, phase = separable(), PhaseConfig(optimizer="sgd", batch_size=32, weight_decay=0.0)
    torch.manual_seed(0)
    net = torch.nn.Linear(16, 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    a = lr_find.lr_range_test(net, net, inputs, phase, "fp32", seed=3)
    b = lr_find.lr_range_test(net, net, inputs, phase, "fp32", seed=3)
    assert a.lrs == b.lrs and a.losses == b.losses and a.valley == b.valley  # seeded
    assert lr_find.LR_MIN <= a.pick <= lr_find.LR_MAX and math.isfinite(a.pick)
    assert 1e-4 < a.pick < 1.0  # a linear model on separable data learns at ordinary rates
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # put back
    assert torch.equal(rng, torch.get_rng_state())  # the run's random stream is untouched
    # Inputs 30x larger (a curvature ~900x higher) want a far smaller LR, and get it.
    big = separable()
    big.train_x = big.train_x * 30
    c = lr_find.lr_range_test(net, net, big, phase, "fp32", seed=3)
    assert c.pick < a.pick / 5


def test_the_valley_is_halfway_down_the_longest_fall():
    lrs = [10 ** (-6 + i / 10) for i in range(50)]
    losses = [2.0] * 10 + [2.0 - 0.05 * i for i in range(1, 31)] + [0.5 + i for i in range(10)]
    got = lr_find.suggest(lrs, losses)
    # the fall runs from step 9 (the last 2.0) to step 39 (its bottom, 0.5): halfway is step 24
    assert got.valley == pytest.approx(lrs[24])
    assert got.minimum_tenth == pytest.approx(lrs[39] / 10)
    assert (got.rule, got.pick) == ("valley", got.valley)  # a real fall (75%): the valley is the pick
    assert got.edge == pytest.approx(lrs[41] / 10)  # 1.5 > 1.1 x 0.5: where it turned up


def test_a_flat_curve_from_a_fitted_head_takes_the_edge_not_the_noise():
    """Flowers, BatchNorm frozen: flat at ~0.53 with noise, then up: no valley to read."""
    lrs = [10 ** (-6 + i / 10) for i in range(50)]
    noise = [0.01 * ((i * 7) % 5 - 2) for i in range(40)]
    losses = [0.53 + e for e in noise] + [0.53 * 1.3**k for k in range(1, 11)]
    got = lr_find.suggest(lrs, losses)
    assert got.rule == "edge" and got.pick == got.edge == pytest.approx(lrs[40] / 10)
    assert got.valley < got.pick  # the valley would have read the noise


def tiny_cfg(data_dir, *extra: str):
    return apply_overrides(load_recipe("fast-cpu"), [
        f"data.data_dir={data_dir}", "data.val_size=60", "data.train_limit=120",
        "model.backbone=resnet18", "model.weights=none", "model.resolution=32",
        "phases.0.precision=fp32", "phases.1.precision=fp32", "phases.1.freeze=until:layer3",
        "phases.1.cache_frozen=true", "phases.1.epochs=2", "phases.1.batch_size=20",
        "phases.1.augment=flip", "run.threads=1", "run.compile_features=off", *extra,
    ])  # fmt: skip


# Stubbed pilots: above any probe (2.0, 1.5) or below every one (-1).
@pytest.mark.parametrize("scores,chosen,switched", [
    ({"eval": 2.0, "train": 1.5}, "eval", False),
    ({"eval": 1.5, "train": 2.0}, "train", False),
    ({"eval": -1.0, "train": -1.0}, "eval", True),  # both below the probe: the switch
])  # fmt: skip
def test_the_pilot_keeps_the_better_mode_and_switches_when_both_fall_below_the_probe(
    cifar_dir, tmp_path, monkeypatch, capsys, scores, chosen, switched
):
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    seen = []

    def stub(net, forward, inputs, phase, plan, eval_batch, seed):
        seen.append((phase.batchnorm, phase.lr))
        return scores[phase.batchnorm]

    monkeypatch.setattr(pilot, "pilot_accuracy", stub)
    out = tmp_path / "run"
    train_mod.train(tiny_cfg(cifar_dir, "phases.1.batchnorm=auto", "phases.1.lr=0.002"), out)
    assert seen == [("eval", 0.002), ("train", 0.002)]
    doc = json.loads((out / pilot.PILOT_FILE).read_text())
    assert doc["batchnorm"] == chosen and doc["switched"] is switched
    assert doc["lr"] == pytest.approx(0.0002 if switched else 0.002)
    assert 0 <= doc["probe_val_acc"] <= 1
    saved = load_recipe(str(out / rundir.CONFIG)).phases[1]  # resolved: a resume does not pilot
    assert (saved.batchnorm, saved.lr) == (chosen, pytest.approx(doc["lr"]))
    printed = capsys.readouterr().out
    assert ("validated below the probe" in printed) is switched
    assert f"BatchNorm {chosen}:" in printed or switched


def test_a_run_that_finds_its_lr_and_batchnorm_resumes_bit_exactly(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    cfg = tiny_cfg(cifar_dir, "phases.1.batchnorm=auto", "phases.1.lr=find", "phases.1.epochs=3")
    train_mod.train(cfg, tmp_path / "whole", progress=False)
    doc = json.loads((tmp_path / "whole" / pilot.PILOT_FILE).read_text())
    assert all(t["lr_find"] and len(t["lr_find"]["lrs"]) >= 2 for t in doc["trials"][-2:])
    assert doc["lr"] > 0 and doc["batchnorm"] in ("eval", "train")
    assert (cfg.phases[1].lr, cfg.phases[1].batchnorm) == ("find", "auto")  # the caller's config: as given
    interrupted_run(monkeypatch, cfg, tmp_path / "run", 2)  # the probe's checkpoint, then the first fine-tuning epoch's
    shutil.rmtree(tmp_path / "cache")
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    a, b = (load_file(tmp_path / d / rundir.WEIGHTS) for d in ("whole", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ... and it is the same as a run told the chosen settings from the start: the pilot
    # draws from its own generator, never from the run's.
    told = tiny_cfg(cifar_dir, f"phases.1.batchnorm={doc['batchnorm']}", f"phases.1.lr={doc['lr']!r}",
                    "phases.1.epochs=3")
    train_mod.train(told, tmp_path / "told", progress=False)
    c = load_file(tmp_path / "told" / rundir.WEIGHTS)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_bad_lr_is_one_line(cifar_dir, tmp_path, capsys):
    code = main(["train", "--recipe", "fast-cpu", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "r"),
                 "--set", "phases.1.lr=fast"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1].startswith("error: bad value for phases.1.lr") and "find" in err[-1]


def first_step_drop(cifar_dir, tmp_path, monkeypatch, *sets: str) -> float:
    """The probe's val_acc minus the model's after the photo template's first fine-tuning step."""
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    real = phases.train_one_epoch

    def one_step(*a, **k):  # `stop` (the pacer's place) asked after the first step: yes
        return real(*a[:12], lambda: True, *a[13:], **k)

    monkeypatch.setattr(phases, "train_one_epoch", one_step)
    photo = load_recipe("small-folder").phases[1]
    cfg = tiny_cfg(cifar_dir, "phases.1.epochs=1", f"phases.1.lr={photo.lr}", f"phases.1.batchnorm={photo.batchnorm}",
                   f"phases.1.layer_decay={photo.layer_decay}", f"phases.1.label_smoothing={photo.label_smoothing}",
                   "data.val_size=200", "data.train_limit=300", *sets)  # fmt: skip
    out = tmp_path / "run"
    train_mod.train(cfg, out, progress=False)
    rows = rundir.read_metrics(out)
    probe = max(r["val_acc"] for r in rows if r["phase"] == 0)
    return probe - next(r["val_acc"] for r in rows if r["phase"] == 1)


def test_the_photo_templates_first_step_keeps_the_probes_predictions(cifar_dir, tmp_path, monkeypatch):
    """The guard against issue 31's drop: at the LR and BatchNorm the photo template chooses, one
    step moves the probe's validation accuracy by at most 2 points (4 of 200 images)."""
    assert first_step_drop(cifar_dir, tmp_path, monkeypatch) <= 0.02


def test_the_report_shows_the_pilot_and_skips_a_malformed_file(tmp_path):
    from cifar_transfer.results.report_pilot import pilot_section

    def img(png: bytes, alt: str, caption: str = "") -> str:
        assert png.startswith(b"\x89PNG")
        return f"<img alt='{alt}'>"

    curve = {"lrs": [1e-5, 1e-4, 1e-3], "losses": [1.0, 0.8, 2.0], "valley": 1e-4,
             "minimum_tenth": 1e-5, "steepest": 1e-4, "edge": 1e-4, "pick": 1e-4, "rule": "valley"}
    (tmp_path / rundir.PILOT).write_text(json.dumps({
        "phase": 1, "batchnorm": "eval", "lr": 1e-4, "switched": False, "probe_val_acc": 0.93,
        "pilot_steps": 20, "trials": [{"batchnorm": "eval", "lr": 1e-4, "val_acc": 0.931, "lr_find": curve},
                                      {"batchnorm": "train", "lr": 1e-3, "val_acc": 0.88, "lr_find": curve}]}))
    html = pilot_section(tmp_path, img, str)
    assert "Fine-tuning pilot" in html and "LR range test" in html
    assert "BatchNorm <b>eval</b>" in html and "val_acc 0.8800" in html and "the probe: 0.9300" in html
    for bad in ("{", json.dumps({"trials": [{"lr_find": {"lrs": [1], "losses": []}}]}),
                json.dumps({"trials": "x"}), json.dumps({"trials": [{"lr_find": {"lrs": [1e400], "losses": [1]}}]})):
        (tmp_path / rundir.PILOT).write_text(bad)
        assert pilot_section(tmp_path, img, str) == ""
    (tmp_path / rundir.PILOT).unlink()
    assert pilot_section(tmp_path, img, str) == ""


def test_batchnorm_auto_without_a_validation_split_is_one_line(cifar_dir, tmp_path, capsys):
    code = main(["train", "--recipe", "fast-cpu", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "r"),
                 "--quiet", *[a for s in ("data.val_size=0", "data.train_limit=60", "model.backbone=resnet18",
                                          "model.weights=none", "model.resolution=32", "phases.1.freeze=until:layer3",
                                          "phases.1.batchnorm=auto", "run.threads=1",
                                          "phases.0.precision=fp32", "phases.1.precision=fp32")
                              for a in ("--set", s)]])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and err[-1].startswith("error: phases.1.batchnorm = \"auto\" chooses on the validation split")
