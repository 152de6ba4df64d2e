"""The command line as a user meets it: listings, one-line errors, predict and evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_transfer.cli import main

COMMON = ["--set", "data.val_size=100", "--set", "run.threads=2", "--set", "run.compile_features=off"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.fixture(scope="module")
def trained_run(cifar_dir, tmp_path_factory):
    """A finished one-epoch cnn-baseline run dir."""
    out = tmp_path_factory.mktemp("cli") / "run"
    rc = main([
        "train", "--recipe", "cnn-baseline", "--data-dir", str(cifar_dir), "--out", str(out),
        "--set", "phases.0.epochs=1", "--quiet", *COMMON,
    ])  # fmt: skip
    assert rc == 0
    return out


def test_recipes_lists_every_recipe_one_line_each(capsys):
    assert main(["recipes", "--no-times"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = {line.split()[0] for line in lines}
    assert {"default", "seed-frozen-224", "seed-top-finetune", "seed-from-layer-100",
            "seed-native-32", "cnn-baseline"} <= names


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--recipe", "no-such-recipe"], "unknown recipe"),
        (["train", "--recipe", "cnn-baseline", "--set", "model.size=3"], "valid keys are"),
        (["train", "--recipe", "cnn-baseline", "--set", "phases.0.lr=-1"], "phases.0.lr"),
        (["train", "--recipe", "cnn-baseline", "--data-dir", "/no/such/dir"], "--data-dir"),
        (["evaluate", "/no/such/run"], "not a run dir"),
        (["predict", "/no/such/run", "x.png"], "model.json"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(argv, fragment, capsys, tmp_path):
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    if argv[0] == "train":
        argv += ["--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert fragment in error_line(capsys)
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "override", ["model.size=3", "phases.0.lr=fast", "data.data_dir=/no/such/dir"]
)
def test_a_refused_train_prints_only_its_error_and_no_run_dir(
    override, cifar_dir, tmp_path, capsys
):
    argv = ["train", "--recipe", "cnn-baseline", "--data-dir", str(cifar_dir), "--set", override,
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "run dir:" not in captured.out + captured.err
    assert not (tmp_path / "run").exists()


def test_quiet_train_shows_no_progress_bars(cifar_dir, tmp_path, monkeypatch, capsys):
    # A frozen backbone without augmentation extracts features: the path that drew a tqdm bar.
    argv = ["train", "--recipe", "cnn-baseline", "--data-dir", str(cifar_dir), *COMMON,
            "--set", "phases.0.epochs=1", "--set", "phases.0.freeze=all",
            "--set", "data.train_limit=100"]  # fmt: skip
    for quiet in (False, True):
        monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / f"cache-{quiet}"))  # extract anew
        out = tmp_path / f"run-{quiet}"
        assert main([*argv, "--out", str(out), *(["--quiet"] if quiet else [])]) == 0
        captured = capsys.readouterr()
        assert captured.out.count(f"run dir: {out}") == 1
        if not quiet:  # the control: the same run without --quiet does draw the bars
            assert "train features" in captured.err and "img" in captured.err
    assert captured.err == "", captured.err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_transfer", "train", "--recipe", "nope", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown recipe") and "Traceback" not in proc.stderr


def test_evaluate_val_and_missing_test_split(trained_run, cifar_dir, capsys):
    assert main(["evaluate", str(trained_run), "--tta"]) == 0
    assert "val accuracy" in capsys.readouterr().out
    saved = json.loads((trained_run / "eval-val.json").read_text())
    assert saved["tta"] is True and len(saved["confusion_matrix"]) == 10
    assert main(["evaluate", str(trained_run), "--split", "test"]) == 0  # fixture has test_batch
    assert json.loads((trained_run / "eval-test.json").read_text())["n"] == 100


def test_predict_reports_bad_files_and_still_predicts_the_rest(trained_run, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((64, 48, 3), 200, np.uint8)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    rc = main(["predict", str(trained_run), str(good), str(bad), "--top", "2"])
    captured = capsys.readouterr()
    assert rc == 1
    (line,) = captured.out.strip().splitlines()
    assert line.startswith(f"{good}:") and line.count(",") == 1  # two classes shown
    assert f"error: {bad}: not an image PIL can read" in captured.err


def test_resume_of_a_finished_run_keeps_its_result(trained_run, capsys):
    before = (trained_run / "model.safetensors").read_bytes()
    assert main(["train", "--resume", str(trained_run), "--quiet"]) == 0
    assert (trained_run / "model.safetensors").read_bytes() == before


def test_bench_writes_one_row_per_cell(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main([
        "bench", "--backbones", "cnn", "--resolutions", "32,48", "--precisions", "fp32",
        "--modes", "train,infer", "--batch-size", "4", "--seconds", "0.05", "--json", str(out),
    ])  # fmt: skip
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [(r["resolution"], r["mode"]) for r in rows] == [
        (32, "train"), (32, "infer"), (48, "train"), (48, "infer")
    ]
    assert all(r["img_per_s"] > 0 and r["steps"] >= 2 for r in rows)
    assert len(capsys.readouterr().out.strip().splitlines()) == 5  # 4 rows + "wrote"


def test_bench_times_the_model_alone_and_with_its_input_pipeline(tmp_path):
    out = tmp_path / "bench.json"
    rc = main([
        "bench", "--backbones", "cnn", "--resolutions", "48", "--precisions", "fp32",
        "--modes", "train", "--inputs", "pipeline,model", "--batch-size", "4", "--seconds", "0.05",
        "--json", str(out),
    ])  # fmt: skip
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["input"] for r in rows] == ["pipeline", "model"]
    assert all(r["img_per_s"] > 0 for r in rows)


def test_bench_names_a_bad_axis_value_in_one_line(capsys):
    assert main(["bench", "--backbones", "cnn", "--inputs", "model,disk"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: bad value for --inputs: disk: use a comma list of pipeline,model"]


TINY = ["--set", "phases.0.epochs=1", "--set", "data.val_size=20", "--set", "data.train_limit=20",
        "--set", "run.threads=1", "--quiet"]  # fmt: skip


@pytest.mark.parametrize("how", ["--data-dir", "--set"])
def test_a_relative_data_dir_is_saved_absolute(how, cifar_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(cifar_dir.parent)
    given = ["--data-dir", cifar_dir.name] if how == "--data-dir" else [
        "--set", f"data.data_dir={cifar_dir.name}"]  # fmt: skip
    out = tmp_path / "run"
    assert main(["train", "--recipe", "cnn-baseline", "--out", str(out), *given, *TINY]) == 0
    saved = Path(tomllib.loads((out / "config.toml").read_text())["data"]["data_dir"])
    assert saved.is_absolute() and saved.resolve() == cifar_dir.resolve()
    monkeypatch.chdir(tmp_path)  # a tool run from elsewhere still finds the run's data
    assert main(["evaluate", str(out)]) == 0


def test_an_interrupt_names_resume_only_for_train_and_with_the_run_dir(
    tmp_path, monkeypatch, capsys
):
    import cifar_transfer.results.predict
    import cifar_transfer.training.run

    def stopped_after_start(cfg, out, **kwargs):
        out.mkdir(parents=True)
        (out / "config.toml").write_text("")
        raise KeyboardInterrupt

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(cifar_transfer.training.run, "train", stopped_after_start)
    assert main(["train", "--recipe", "cnn-baseline", "--out", str(out), "--quiet"]) == 130
    assert capsys.readouterr().err == (
        f"interrupted: continue with `cifar-transfer train --resume {out}`\n"
    )
    monkeypatch.setattr(cifar_transfer.training.run, "train", stopped)  # before the run dir existed
    assert main(["train", "--recipe", "cnn-baseline", "--out", str(tmp_path / "r2")]) == 130
    assert capsys.readouterr().err == "interrupted\n"
    monkeypatch.setattr(cifar_transfer.results.predict, "load_predictor", stopped)
    assert main(["predict", str(out), "x.png"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
