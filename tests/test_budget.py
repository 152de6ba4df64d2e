"""Training to a time budget: the planner (a pure function of throughputs), the schedule that
ends at the deadline, and a tiny budgeted run that stops cleanly with a usable model."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from cifar_transfer.artifacts.bundle import load_model
from cifar_transfer.artifacts.rundir import read_metrics
from cifar_transfer.cli import main
from cifar_transfer.recipes import apply_overrides, load_recipe
from cifar_transfer.system import hardware
from cifar_transfer.system.errors import UserError
from cifar_transfer.system.hardware import others_cpu_use  # the real one (conftest stubs it)
from cifar_transfer.training import budget, measure, phases, recipe_price
from cifar_transfer.training import run as train_mod
from cifar_transfer.training.budget import Candidate, Cell, plan_budget
from cifar_transfer.training.optim import StepSchedule
from cifar_transfer.training.pacing import Deadline, Pacer

LITE = Candidate("efficientnet_lite0", (128, 160), train_batch=32, infer_batch=64)


def speeds(train: dict[str, float], infer: dict[str, float], partial: float = 3.0) -> dict:
    """Made-up throughputs for LITE: `train`/`infer` img/s at 128 px by precision; 160 px is
    (128/160)^2 of that, a partly frozen train step `partial` times a full one."""
    out = {}
    for r in LITE.resolutions:
        scale = (128 / r) ** 2
        for p in LITE.precisions:
            out[Cell(LITE.backbone, r, p, "infer", 64)] = infer[p] * scale
            out[Cell(LITE.backbone, r, p, "train", 32, "none")] = train[p] * scale
            out[Cell(LITE.backbone, r, p, "train", 32, "from-layer:100")] = train[p] * scale * partial
    return out


AMX = speeds(train={"fp32": 55.0, "bf16": 34.0}, infer={"fp32": 227.0, "bf16": 343.0})
PLAIN = speeds(train={"fp32": 60.0, "bf16": 12.0}, infer={"fp32": 300.0, "bf16": 60.0})


def plan(tput: dict, minutes: float, candidates=(LITE,)) -> budget.BudgetPlan:
    return plan_budget(tput, minutes * 60, 45_000, 5_000, list(candidates), overhead_s=20)


def test_more_time_never_gives_a_worse_plan():
    accs = [plan(AMX, m).predicted_val_acc for m in range(4, 300, 4)]
    assert all(b >= a for a, b in itertools.pairwise(accs)), accs
    assert accs[-1] > accs[0] + 3  # and a lot more time buys a clearly better plan
    full_only = [Candidate(LITE.backbone, (128,), kinds=("full",))]
    epochs = [plan(AMX, m, full_only).epochs for m in range(4, 300, 4)]
    assert all(b >= a for a, b in itertools.pairwise(epochs)), epochs
    long = plan(AMX, 120)
    assert long.kind != "probe" and long.predicted_seconds <= 120 * 60


def test_a_too_small_budget_gives_the_probe_alone_and_below_the_probe_one_error_line():
    probe_s = 50_000 / (343.0 * (128 / 160) ** 2)  # nothing else than the probe fits in 1.1x it
    short = plan(AMX, 1.1 * (20 + probe_s) / 60 / (1 - budget.MARGIN))
    assert short.kind == "probe" and short.epochs == 0
    cfg = budget.apply_plan(load_recipe("fast-cpu"), short, load_recipe("fast-cpu").phases)
    assert [p.optimizer for p in cfg.phases] == ["lbfgs"]
    with pytest.raises(UserError) as e:
        plan(AMX, 1)
    assert "below the probe's own cost" in str(e.value) and "\n" not in str(e.value)


def test_precision_is_chosen_per_phase_by_measurement_and_differs_between_machines():
    amx, plain = plan(AMX, 30), plan(PLAIN, 30)
    # AMX-like CPU: bf16 extraction (faster), fp32 training (bf16 trains slower there)
    assert (amx.probe_precision, amx.finetune_precision) == ("bf16", "fp32")
    assert (plain.probe_precision, plain.finetune_precision) == ("fp32", "fp32")
    assert amx.throughputs and all(v > 0 for v in amx.throughputs.values())
    cfg = budget.apply_plan(load_recipe("fast-cpu"), amx, load_recipe("fast-cpu").phases)
    assert [(p.optimizer, p.precision) for p in cfg.phases] == [("lbfgs", "bf16"), ("sgd", "fp32")]
    assert cfg.phases[1].schedule_epochs == amx.epochs  # the cosine's planned length
    assert cfg.phases[1].epochs == math.ceil(amx.epochs * budget.STRETCH)  # how far it may stretch
    # Each epoch is priced with its validation pass, at the precision fine-tuning validates in;
    # nothing after the last epoch (the temperature fit reuses the kept epoch's logits).
    val_s = 5_000 / AMX[Cell(LITE.backbone, amx.resolution, "fp32", "infer", 64)]
    train_s = 45_000 / AMX[Cell(LITE.backbone, amx.resolution, "fp32", "train", 32, budget.FREEZE[amx.kind])]
    assert amx.epoch_seconds == pytest.approx(train_s + val_s)
    assert amx.predicted_seconds == pytest.approx(20 + amx.probe_seconds + amx.epochs * amx.epoch_seconds)


def test_flip_tta_gets_one_validation_pass_after_fine_tuning_and_the_plan_says_so():
    off = plan(AMX, 30)
    on = plan_budget(AMX, 30 * 60, 45_000, 5_000, [LITE], overhead_s=20, tta=True)
    val_s = 5_000 / AMX[Cell(LITE.backbone, on.resolution, "fp32", "infer", 64)]
    assert (on.resolution, on.kind) == (off.resolution, off.kind)
    assert on.tta_seconds == pytest.approx(val_s) and off.tta_seconds == 0
    assert on.epochs == pytest.approx(off.epochs - val_s / off.epoch_seconds)
    assert on.predicted_seconds == pytest.approx(off.predicted_seconds)  # the same deadline
    assert any("flip TTA" in line for line in on.lines())
    assert not any("TTA" in line for line in off.lines())


def test_a_recorded_compiled_extraction_prices_the_probe_and_leaves_the_rest_to_fine_tuning():
    cold = plan(AMX, 30)
    fast = Cell(LITE.backbone, cold.resolution, cold.probe_precision, "extract", 256)
    warm = plan({**AMX, fast: 3 * AMX[Cell(LITE.backbone, cold.resolution, cold.probe_precision,
                                                 "infer", 64)]}, 30)
    # 45,000 training images at 3x the eager speed; validation stays eager (as runs extract it).
    assert warm.probe_seconds == pytest.approx(cold.probe_seconds - 45_000 / warm.throughputs[
        fast.text()] * 2)
    assert warm.epochs > cold.epochs and fast.text() in warm.throughputs


def cached_speeds(infer: dict[str, float], maps: dict[str, float], train: dict[str, float]) -> dict:
    """Made-up throughputs for Lite0's cached kind at 160 px, by precision."""
    out = {}
    for p, speed in infer.items():
        out[Cell("efficientnet_lite0", 160, p, "infer", 64)] = speed
        out[Cell("efficientnet_lite0", 160, p, "infer-maps", 64, "until:blocks4")] = maps[p]
        out[Cell("efficientnet_lite0", 160, p, "train-maps", 32, "until:blocks4")] = train[p]
    return out


def test_a_cached_plans_probe_on_the_stored_maps_is_priced_as_the_rest_of_the_backbone():
    cached = Candidate("efficientnet_lite0", (160,), kinds=("cached",), precisions=("fp32",))
    tput = cached_speeds({"fp32": 300.0}, {"fp32": 400.0}, {"fp32": 250.0})
    got = plan_budget(tput, 3600, 45_000, 5_000, [cached], overhead_s=20)
    top_s = 1 / 300 - 1 / 400  # the whole backbone's seconds per image less the frozen part's
    fit_s = budget.PROBE_FIT_S * 45_000
    assert got.kind == "cached" and got.probe_from_maps and got.probe_precision == "fp32"
    assert got.probe_seconds == pytest.approx(top_s * 50_000 + fit_s)
    assert got.predicted_seconds == pytest.approx(
        20 + got.probe_seconds + got.maps_seconds + got.epochs * got.epoch_seconds)
    lines = got.lines()
    maps_at = next(i for i, line in enumerate(lines) if "store the frozen part's output" in line)
    assert "probe: features from those maps" in lines[maps_at + 1]  # the maps first, then the probe
    # a probe with cached_flips takes the mirror maps too
    flips = plan_budget(tput, 3600, 45_000, 5_000, [cached], overhead_s=20, probe_flips=True)
    assert flips.probe_seconds == pytest.approx(top_s * 95_000 + fit_s)
    # a whole-backbone cell measured no faster than the frozen part's (noise): the floor
    noisy = plan_budget({**tput, Cell("efficientnet_lite0", 160, "fp32", "infer", 64): 390.0}, 3600,
                        45_000, 5_000, [cached], overhead_s=20)  # fmt: skip
    assert noisy.probe_seconds == pytest.approx(0.1 / 390 * 50_000 + fit_s)
    # the run does what was priced: the probe at the phase's precision, inference at the cell's batch
    fast_cpu = load_recipe("fast-cpu")
    cfg = budget.apply_plan(fast_cpu, got, fast_cpu.phases)
    assert [p.precision for p in cfg.phases] == ["fp32", "fp32"] and cfg.phases[1].cache_frozen
    assert cfg.run.eval_batch_size == 64 and fast_cpu.run.eval_batch_size == 256


@pytest.mark.parametrize("fp32_infer,from_maps", [(150.0, False), (220.0, True)])
def test_a_cached_plan_keeps_the_cheaper_of_the_probe_on_the_maps_and_its_own_extraction(
    fp32_infer, from_maps
):
    """bf16 extracts fastest but trains the top slowest: the probe alone would run in bf16, the
    cached phase in fp32; on the maps the probe runs in fp32. The plan keeps the one that leaves
    more epochs, and weighs the other."""
    cached = Candidate("efficientnet_lite0", (160,), kinds=("cached",))
    tput = cached_speeds({"fp32": fp32_infer, "bf16": 1000.0}, {"fp32": 250.0, "bf16": 1200.0},
                         {"fp32": 250.0, "bf16": 50.0})  # fmt: skip
    got = plan_budget(tput, 3600, 45_000, 5_000, [cached], overhead_s=20)
    assert (got.kind, got.finetune_precision, got.probe_from_maps) == ("cached", "fp32", from_maps)
    assert got.probe_precision == ("fp32" if from_maps else "bf16")
    own = 45_000 / 1000 + 5_000 / 1000 + budget.PROBE_FIT_S * 45_000
    on_maps = (1 / fp32_infer - 1 / 250) * 50_000 + budget.PROBE_FIT_S * 45_000
    assert got.probe_seconds == pytest.approx(min(own, on_maps))
    assert sum(a["kind"] == "cached" for a in got.alternatives) >= 1  # the other way was weighed


def test_a_run_keeps_its_compiled_extraction_speed_for_the_next_plan(monkeypatch, tmp_path):
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path))
    cfg = apply_overrides(load_recipe("cnn-baseline"), ["data.data_dir=/nonexistent"])
    cell = Cell("cnn", 32, "bf16", "extract", cfg.run.eval_batch_size)
    extract = phases._recording(lambda x: x[:, :1].float(), torch.device("cpu"), cell)
    assert extract(torch.zeros(8, 3, 2, 2)).shape == (8, 1, 2, 2)
    again = measure.Throughputs(torch.device("cpu"))
    assert again.cells[cell.text()] > 0
    seen = {}
    monkeypatch.setattr(measure, "split_counts", lambda cfg: (45_000, 5_000))
    monkeypatch.setattr(measure, "plan_budget", lambda speeds, *a, **k: seen.update(speeds) or "plan")
    for c in budget.cells_needed(measure.candidates_for(cfg, torch.device("cpu"), True)):
        again.cells[c.text()] = 100.0
    again._save()
    measure.plan_this_machine(cfg, 600, torch.device("cpu"), True)
    assert seen[cell] == again.cells[cell.text()]


def test_a_precision_far_slower_at_one_size_is_not_measured_at_larger_sizes():
    four = Candidate(LITE.backbone, (224, 128, 160, 192))
    avx2 = {cell: (20.0 if cell.precision == "bf16" else 300.0) for cell in budget.cells_needed([four])}
    timed = []
    got = budget.measure_cells([four], lambda cell: timed.append(cell) or avx2[cell])
    # bf16 ran at 0.07x fp32 in every step at 128 px: timed there only, then dropped.
    assert {c.precision for c in timed if c.resolution > 128} == {"fp32"}
    assert len(timed) == len(got) == 3 * 2 + 3 * 3
    assert plan(got, 60, [four]).finetune_precision == "fp32"
    # Faster at one step (AMX: bf16 infers faster, trains slower) keeps it everywhere.
    amx = {**avx2, **{c: 400.0 for c in avx2 if c.precision == "bf16" and c.mode == "infer"}}
    assert budget.measure_cells([four], amx.__getitem__) == amx


def test_budget_durations():  # and the head a budget needs
    assert [budget.parse_duration(t) for t in ("20m", "90s", "1h30m", "1.5h", "45")] == [
        1200, 90, 5400, 5400, 45]
    for bad in ("", "abc", "20x", "0m", "1h30"):
        with pytest.raises(UserError, match="--budget"):
            budget.parse_duration(bad)
    cfg = load_recipe("fast-cpu")
    cfg.model.head = "mlp"
    with pytest.raises(UserError, match="model.head=linear"):
        budget.apply_plan(cfg, plan(AMX, 30), load_recipe("fast-cpu").phases)


def test_a_shortened_cosine_stays_continuous_and_ends_at_its_new_end():
    plain, cut = StepSchedule(100, 10, True), StepSchedule(100, 10, True)
    assert [plain(s) for s in range(100)] == [cut(s) for s in range(100)]
    before = cut(40)
    cut.refit(40, 60)
    assert cut(40) == pytest.approx(before) and cut(59) < 0.01 and cut.done(60)
    assert all(cut(s) >= cut(s + 1) for s in range(40, 60))


def test_the_pacer_fits_the_schedule_to_the_deadline_when_the_pace_drifts():
    clock = [0.0]
    deadline = Deadline(100.0, clock=lambda: clock[0])
    schedule = StepSchedule(1000, 0, True)  # planned at 10 steps/s; it runs at 2
    pacer = Pacer(deadline, schedule, steps_per_epoch=500, val_images=0, batch_size=32)
    stopped_at = None
    for _ in range(1000):
        clock[0] += 0.5
        if pacer():
            stopped_at = clock[0]
            break
    assert stopped_at is not None and 95 <= stopped_at <= 100
    assert pacer.refits >= 1 and schedule(pacer.step - 1) < 0.05  # the cosine came to its end


def test_the_pacer_stretches_the_schedule_when_it_runs_ahead_but_never_past_the_phase():
    clock = [0.0]
    deadline = Deadline(100.0, clock=lambda: clock[0])
    schedule = StepSchedule(100, 0, True, ceiling=300)  # planned at 1 step/s; it runs at 2
    pacer = Pacer(deadline, schedule, steps_per_epoch=100, val_images=0, batch_size=32)
    lrs, stopped_at = [], None
    for _ in range(1000):
        clock[0] += 0.5
        lrs.append(schedule(pacer.step))
        if pacer():
            stopped_at = clock[0]
            break
    assert stopped_at is not None and 95 <= stopped_at <= 100  # used the time, not 50 s of it
    assert 180 <= pacer.step <= 200 and pacer.refits >= 1
    assert max(abs(a - b) for a, b in itertools.pairwise(lrs)) < 0.05  # continuous: no jump on a refit
    assert schedule(pacer.step - 1) < 0.05  # and it still came to its end
    fast = StepSchedule(100, 0, True, ceiling=150)
    fast.refit(10, 1000)
    assert fast.total == 150  # never past the phase's own epochs


@pytest.fixture
def seeded_speeds(isolated_cache):
    """This machine's cnn throughputs as made-up cache entries: 50x faster than it can run, so
    the plan asks for far too many epochs and the run must re-plan and stop at the deadline."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the run asks for (run.threads=1): part of the machine key
    seed_speeds("cnn", 32, (64, 50_000.0), (64, 20_000.0))  # inference capped at batch 64 on a CPU
    yield
    torch.set_num_threads(threads)


def seed_speeds(backbone: str, resolution: int, infer: tuple[int, float], train: tuple[int, float]):
    """Made-up cache entries (batch, img/s) for this machine at its current thread count."""
    tput = measure.Throughputs(torch.device("cpu"))
    for p in ("fp32", "bf16"):
        tput.cells[Cell(backbone, resolution, p, "infer", infer[0]).text()] = infer[1]
        for freeze in ("none", "from-layer:100"):
            tput.cells[Cell(backbone, resolution, p, "train", train[0], freeze).text()] = train[1]
    tput._save()


def test_a_budgeted_run_plans_writes_its_plan_and_ends_near_its_deadline(
    seeded_speeds, cifar_dir, tmp_path, capsys
):
    out, seconds = tmp_path / "run", 6.0
    t0 = time.monotonic()
    rc = main(["train", "--recipe", "cnn-baseline", "--budget", f"{seconds:g}s", "--quiet",
               "--data-dir", str(cifar_dir), "--out", str(out), "--set", "data.val_size=100",
               "--set", "run.eval_batch_size=100", "--set", "run.threads=1"])
    wall = time.monotonic() - t0
    printed = capsys.readouterr()
    assert rc == 0 and "predicted finish" in printed.out, printed
    doc = json.loads((out / "plan.json").read_text())
    assert doc["plan"]["kind"] in ("full", "partial") and doc["plan"]["epochs"] > 100
    assert doc["measured_img_per_s"] and doc["predicted_finish"]
    rows = read_metrics(out)
    assert rows[0]["phase_name"] == "probe"
    # The plan asks for hundreds of epochs (the seeded speeds): only the deadline ends this run.
    # Generous, as the test CPU is shared; and the probe cannot be cut: on a loaded CPU it may
    # spend the whole budget, and then the fine-tuning phase is skipped.
    tune = [r for r in rows if r["phase_name"] == "finetune"]
    assert len(tune) < doc["plan"]["epochs"]
    assert wall <= 2 * seconds or not tune, wall
    model, meta = load_model(out)
    assert meta["val_acc"] == max(r["val_acc"] for r in rows)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_plan_only_prints_the_plan_and_what_it_was_weighed_against_and_trains_nothing(
    seeded_speeds, cifar_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    rc = main(["train", "--recipe", "cnn-baseline", "--budget", "1h", "--plan-only",
               "--data-dir", str(cifar_dir), "--out", str(out), "--set", "data.val_size=100",
               "--set", "run.threads=1"])
    printed = capsys.readouterr().out
    assert rc == 0 and not out.exists(), printed
    assert printed.startswith("plan for a 1h00m budget: cnn at 32 px") and "nothing trained" in printed
    # The plans weighed: the probe alone and the other fine-tuning kind, best predicted first.
    weighed = [line for line in printed.splitlines() if line.startswith("  instead of:")]
    assert any("the probe alone" in line for line in weighed) and len(weighed) == 2, printed
    assert "predicted finish" not in printed
    rc = main(["train", "--plan-only", "--data-dir", str(cifar_dir)])
    assert rc != 0 and "add --budget" in capsys.readouterr().err


def test_the_machine_cache_tells_apart_kernels_lowered_by_environment(monkeypatch):
    cpu = torch.device("cpu")
    native, words = measure.machine_key(cpu), measure.describe_machine(cpu)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert measure.machine_key(cpu) != native and "oneDNN AVX2" in measure.describe_machine(cpu)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "NO AVX")
    assert measure.machine_key(cpu) != native and measure.describe_machine(cpu) != words


def test_a_budget_on_a_folder_plans_with_the_folders_own_image_counts(seeded_speeds, tmp_path):
    from PIL import Image

    for k, name in enumerate(("ant", "bee")):  # 12 images a class, a quarter of them for val
        for i in range(12):
            (tmp_path / "photos" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), (200 * k, 90, 20 * i)).save(tmp_path / "photos" / name / f"{i}.png")
    out = tmp_path / "run"
    rc = main(["train", "--recipe", "cnn-baseline", "--budget", "3s", "--quiet",
               "--data-dir", str(tmp_path / "photos"), "--out", str(out),
               "--set", "data.val_size=0.25", "--set", "data.storage_size=32",
               "--set", "run.eval_batch_size=100", "--set", "run.threads=1"])
    plan = json.loads((out / "plan.json").read_text())["plan"]
    assert rc == 0
    # 18 training and 6 validation images at the seeded speeds, not CIFAR-10's 45,000 + 5,000.
    assert plan["epoch_seconds"] == pytest.approx(18 / 20_000 + 6 / 50_000)
    assert load_model(out)[1]["classes"] == ["ant", "bee"]


def test_a_deadline_cuts_a_phase_cleanly_with_the_best_bundled_and_a_resumable_checkpoint(
    cifar_dir, tmp_path
):
    cfg = apply_overrides(load_recipe("cnn-baseline"), [
        f"data.data_dir={cifar_dir}", "data.val_size=100", "run.eval_batch_size=100",
        "run.threads=1", "run.precision=fp32", "phases.0.epochs=1000", "phases.0.early_stop_patience=0", "phases.0.schedule=cosine",
    ])  # fmt: skip
    out, seconds = tmp_path / "run", 3.0
    deadline, started = Deadline(math.inf), []

    def start_clock(_):  # the deadline counts from the first step (data and model are loaded)
        started.append(time.monotonic())
        deadline.end = started[0] + seconds

    summary = train_mod.train(cfg, out, progress=False, on_start=start_clock, deadline=deadline)
    wall = time.monotonic() - started[0]
    rows = read_metrics(out)
    # Past the deadline: at most the step under way, the cut epoch's validation and the bundle.
    assert wall < seconds + 5 and 0 < len(rows) < 1000, (wall, len(rows))
    _model, meta = load_model(out)
    assert meta["val_acc"] == summary["val_acc"] == max(r["val_acc"] for r in rows)
    # The cut epoch was checkpointed as the phase's end: resuming finds nothing left to train
    # and bundles the same model.
    again = train_mod.resume(out, progress=False)
    assert len(read_metrics(out)) == len(rows) and again["val_acc"] == summary["val_acc"]


def test_recipe_time_is_the_sum_of_its_phases():
    cfg = load_recipe("fast-cpu")
    seconds = recipe_price.recipe_seconds(cfg, lambda cell: 100.0 if cell.mode == "train" else 500.0, 224)
    extract, fit = 50_000 / 500, budget.PROBE_FIT_S * 45_000
    tune = 4 * (45_000 / 100 + 5_000 / 500)
    assert seconds == pytest.approx(extract + fit + tune)


def test_a_budget_on_a_folder_fine_tunes_with_the_folder_recipes_photo_settings(
    isolated_cache, tmp_path, capsys, monkeypatch
):
    """No recipe named, class folders: the plan's fine-tuning phase is small-folder's own
    (random-resized crops, flips, TrivialAugment, layer decay), not CIFAR's pad-and-crop, and the
    plan says so. Throughputs seeded: nothing is measured or trained (--plan-only)."""
    from PIL import Image

    for k, name in enumerate(("ant", "bee")):
        for i in range(12):
            (tmp_path / "photos" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), (200 * k, 90, 20 * i)).save(tmp_path / "photos" / name / f"{i}.png")
    planned = {}
    real = budget.apply_plan

    def spy(cfg, plan, template):
        planned["cfg"] = real(cfg, plan, template)
        return planned["cfg"]

    monkeypatch.setattr(budget, "apply_plan", spy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the run asks for (run.threads=1): part of the machine key
    try:
        seed_speeds("efficientnet_lite2", 260, (32, 5_000.0), (32, 2_000.0))
        rc = main(["train", "--budget", "10m", "--plan-only", "--data-dir", str(tmp_path / "photos"),
                   "--set", "run.threads=1"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert rc == 0
    tune = planned["cfg"].phases[1]
    assert tune.augment == ["rrc:0.35-1", "flip", "trivial"] and tune.layer_decay == 0.7
    assert "fine-tuning for photos (small-folder's 'finetune' phase)" in printed, printed
    assert "rrc:0.35-1,flip,trivial" in printed, printed
    # photos: the figure is relative to the probe (CIFAR-10's curves over-predicted folders)
    assert "predicted val_acc = the probe's with ~14% of its errors fixed" in printed, printed
    assert "pilot: BatchNorm mode and/or learning rate measured" in printed, printed
    assert (tune.lr, tune.batchnorm) == ("find", "auto")
    assert load_recipe("fast-cpu").phases[1].augment == ["crop", "flip"]  # CIFAR keeps pad-and-crop


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_a_process_spinning_beside_this_one_shows_as_others_cpu_use():
    quiet = others_cpu_use(0.3)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started and spinning
        busy = others_cpu_use(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.0 <= quiet <= (os.cpu_count() or 1)
    assert busy > 0.7  # one core's worth, give or take the scheduler's tick


def test_speeds_measured_on_a_busy_machine_plan_this_run_but_are_never_cached(
    monkeypatch, capsys, tmp_path
):
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path))  # no cell of earlier tests
    fake = SimpleNamespace(img_per_s=10.0, seconds=0.01)
    monkeypatch.setattr(measure, "measure", lambda *a, **k: fake)
    cell, other = Cell("cnn", 32, "fp32", "train", 32), Cell("cnn", 32, "bf16", "train", 32)
    monkeypatch.setattr(hardware, "others_cpu_use", lambda seconds=0.3: 1.6)
    busy = measure.Throughputs(torch.device("cpu"))
    assert busy.get(cell) == 10.0  # the run plans with what it measured
    assert "other processes are using 1.6" in capsys.readouterr().err
    assert cell.text() not in measure.Throughputs(torch.device("cpu")).cells  # nothing cached
    monkeypatch.setattr(hardware, "others_cpu_use", lambda seconds=0.3: 0.1)
    quiet = measure.Throughputs(torch.device("cpu"))
    quiet.get(other)
    assert "other processes" not in capsys.readouterr().err
    assert measure.Throughputs(torch.device("cpu")).cells[other.text()] == 10.0  # cached
