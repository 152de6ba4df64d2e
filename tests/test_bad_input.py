"""The bad-input catalogue (README, Troubleshooting): one test per row. Each ends with exit code
!= 0, one `error:` line naming the problem and the fix (a traceback only with --debug), and no
file lost or changed."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_transfer.artifacts import bundle, rundir
from cifar_transfer.artifacts.checkpoint import load_checkpoint
from cifar_transfer.cli import main
from cifar_transfer.data import cifar10 as data
from cifar_transfer.models.transfer import create_model
from cifar_transfer.recipes import apply_overrides, load_recipe, to_toml
from cifar_transfer.system.atomic import is_temp_file
from cifar_transfer.system.errors import UserError

SMALL = ["--set", "phases.0.epochs=1", "--set", "data.val_size=20", "--set", "data.train_limit=20",
         "--set", "run.threads=1", "--set", "run.compile_features=off", "--quiet"]  # fmt: skip


def files(*roots: Path) -> dict[str, str]:
    """Every file under the roots with the hash of its bytes."""
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for root in roots if root.exists() for p in sorted(root.rglob("*")) if p.is_file()
    }  # fmt: skip


def error_line(capsys, *fragments: str) -> str:
    """The one stderr line, `error: ...` with every fragment in it and no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]


def refused(argv: list[str], capsys, *fragments: str, roots: tuple[Path, ...] = (), rc: int = 2):
    """Run the CLI, expect the exit code and one error line, and no file added, lost or changed."""
    before = files(*roots)
    assert main(argv) == rc
    line = error_line(capsys, *fragments)
    assert files(*roots) == before, "a refused command changed files"
    return line


def train_argv(out: Path, *extra: str) -> list[str]:
    return ["train", "--recipe", "cnn-baseline", "--out", str(out), *SMALL, *extra]


class Evil:
    """Unpickling this runs os.mkdir(marker): what a hostile .pth could do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A finished model bundle (random cnn), as train writes it."""
    out = tmp_path_factory.mktemp("bundle")
    bundle.save_bundle(create_model("cnn", "none", "linear"), load_recipe("cnn-baseline"), out, 32, {})
    return out


# -- data -----------------------------------------------------------------------------------------
def test_missing_data_dir(tmp_path, capsys):
    refused(train_argv(tmp_path / "run", "--data-dir", str(tmp_path / "nope")), capsys,
            "does not exist", "pass --data-dir", roots=(tmp_path,))  # fmt: skip
    assert not (tmp_path / "run").exists(), "a failed start left a run dir behind"


def copy_of(cifar_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cifar_dir, tmp_path / "data" / cifar_dir.name))


def test_truncated_batch_file(cifar_dir, tmp_path, capsys):
    folder = copy_of(cifar_dir, tmp_path)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])
    refused(train_argv(tmp_path / "run", "--data-dir", str(folder)), capsys,
            f"{batch} is truncated or corrupt", "re-download CIFAR-10", roots=(tmp_path,))  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "entry, problem",
    [
        ({"data": np.zeros((10, 1000), np.uint8), "labels": [0] * 10}, "expected uint8 (N, 3072)"),
        ({"data": np.zeros((10, 3072), np.uint8), "labels": [0] * 9 + [10]}, "labels outside 0..9"),
        ({"data": np.zeros((10, 3072), np.uint8), "labels": [-1] + [0] * 9}, "labels outside 0..9"),
    ],
    ids=["shape", "label-10", "label-negative"],
)
def test_batch_with_wrong_shape_or_labels_out_of_range(entry, problem, cifar_dir, tmp_path, capsys):
    folder = copy_of(cifar_dir, tmp_path)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(entry, f, protocol=2)
    refused(train_argv(tmp_path / "run", "--data-dir", str(folder)), capsys,
            "data_batch_2", problem, "--data-dir", roots=(tmp_path,))  # fmt: skip


def test_downloaded_archive_with_a_wrong_md5(tmp_path, capsys, monkeypatch):
    """The 'download' is served from a local file:// URL: no network."""
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"junk"))
    real_urlopen = data.urllib.request.urlopen
    monkeypatch.setattr(data.urllib.request, "urlopen",
                        lambda url, timeout: real_urlopen(archive.as_uri(), timeout=timeout))
    cache = tmp_path / "cache"
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(cache))
    refused(train_argv(tmp_path / "run"), capsys, "has MD5", f"expected {data.CIFAR10_MD5}",
            "retry, or pass --data-dir", roots=(tmp_path,))  # fmt: skip
    assert files(cache) == {}, "a damaged download left files in the cache"


def test_no_network(tmp_path, capsys, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError(OSError(errno.ENETUNREACH, "Network is unreachable"))

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "cache"))
    refused(train_argv(tmp_path / "run"), capsys, "you seem to be offline", "pass --data-dir",
            roots=(tmp_path,))
    assert files(tmp_path / "cache") == {}


# -- recipe and config -----------------------------------------------------------------------------
def test_unknown_recipe(tmp_path, capsys):
    refused(["train", "--recipe", "resnet-9000", "--out", str(tmp_path / "run")], capsys,
            "unknown recipe 'resnet-9000'", "cifar-transfer recipes lists them", roots=(tmp_path,))


def test_unknown_config_key(tmp_path, capsys):
    refused(train_argv(tmp_path / "run", "--set", "phases.0.learning_rate=0.1"), capsys,
            "unknown config key 'phases.0.learning_rate'", "valid keys are", "phases.N.lr",
            roots=(tmp_path,))  # fmt: skip


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("phases.0.epochs=-1", ("bad value for phases.0.epochs: -1", "must be >= 0")),
        ("phases.0.epochs=two", ("bad value for phases.0.epochs: 'two'", "is not a")),
        ("phases.0.lr=0", ("bad value for phases.0.lr: 0.0", "must be > 0")),
        ("phases.0.lr=-0.1", ("bad value for phases.0.lr: -0.1", "must be > 0")),
        ("phases.0.optimizer=rmsprop", ("bad value for phases.0.optimizer: 'rmsprop'",
                                        "choose one of sgd, adam, adamw")),
    ],
    ids=["negative-epochs", "epochs-type", "zero-lr", "negative-lr", "unknown-optimizer"],
)
def test_bad_value_type_or_range(override, fragments, tmp_path, capsys):
    refused(train_argv(tmp_path / "run", "--set", override), capsys, *fragments, roots=(tmp_path,))


# -- weights and model files -----------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing", "corrupt", "other-architecture"])
def test_weights_file_missing_corrupt_or_for_another_architecture(case, cifar_dir, tmp_path, capsys):
    weights = tmp_path / "w" / "weights.pth"
    weights.parent.mkdir()
    if case == "corrupt":
        weights.write_bytes(b"PK\x03\x04 this is not a torch file" * 10)
    elif case == "other-architecture":
        torch.save(create_model("cnn", "none", "linear").state_dict(), weights)
    fragments = {
        "missing": ("weights file", "not found", "pass an existing .pth/.pt/.safetensors file"),
        "corrupt": ("is not a readable state dict", "save it with torch.save(model.state_dict()"),
        "other-architecture": ("does not fit resnet18", "is it for another architecture?"),
    }[case]
    argv = train_argv(tmp_path / "run", "--data-dir", str(cifar_dir), "--weights", str(weights),
                      "--set", "model.backbone=resnet18")  # fmt: skip
    refused(argv, capsys, *fragments, roots=(tmp_path,))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["weights", "bundle", "checkpoint"])
def test_a_model_file_holding_an_arbitrary_pickle_is_refused_never_executed(
    where, model_dir, cifar_dir, tmp_path, capsys
):
    pickle.loads(pickle.dumps(Evil(tmp_path / "control")))
    assert (tmp_path / "control").is_dir(), "the control: plain unpickling runs the payload"
    marker = tmp_path / "pwned"
    evil = Evil(marker)
    if where == "weights":
        path = tmp_path / "evil.pth"
        torch.save({"state_dict": evil}, path)
        argv = train_argv(tmp_path / "run", "--data-dir", str(cifar_dir), "--weights", str(path),
                          "--set", "model.backbone=resnet18")  # fmt: skip
        fragments = ("is not a readable state dict", "save it with torch.save")
    elif where == "bundle":
        run = Path(shutil.copytree(model_dir, tmp_path / "bundle"))
        (run / "model.safetensors").write_bytes(pickle.dumps(evil))
        argv = ["predict", str(run), str(tmp_path / "any.png")]
        fragments = ("is not a readable safetensors file", "re-run train")
    else:
        run = tmp_path / "run"
        cfg = apply_overrides(load_recipe("cnn-baseline"), [f"data.data_dir={cifar_dir}"])
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.toml").write_text(to_toml(cfg))
        torch.save({"model": evil}, run / rundir.LAST)
        argv = ["train", "--resume", str(run), "--quiet"]
        fragments = ("is unreadable or unsafe", "delete it to restart the run")
    refused(argv, capsys, *fragments, roots=(tmp_path,))
    assert not marker.exists(), "the pickle was executed"


# -- predict ---------------------------------------------------------------------------------------
def test_predict_on_a_non_image_file(model_dir, tmp_path, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is text, not a JPEG")
    refused(["predict", str(model_dir), str(bad)], capsys, f"error: {bad}: not an image PIL can read",
            "pass PNG/JPEG/", roots=(tmp_path, model_dir), rc=1)  # fmt: skip


def test_predict_on_an_empty_folder(model_dir, tmp_path, capsys):
    empty = tmp_path / "photos"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    refused(["predict", str(model_dir), str(empty)], capsys, f"error: {empty}: folder holds no images",
            "pass a folder of images or a glob such as 'photos/*.jpg'", roots=(tmp_path, model_dir),
            rc=1)  # fmt: skip


def test_predict_still_answers_for_the_good_images_beside_a_bad_one(model_dir, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(good)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    assert main(["predict", str(model_dir), str(good), str(tmp_path / "bad.png")]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{good}: ") and captured.err.count("error: ") == 1


# -- disk ------------------------------------------------------------------------------------------
def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(
    cifar_dir, tmp_path, capsys, monkeypatch
):
    """ENOSPC from fsync (where a full disk shows up with delayed allocation) on the 2nd last.pt."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell which file an fsync is for")
    real_fsync, writes = os.fsync, []

    def fsync(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".last.pt."):
            writes.append(fd)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run = tmp_path / "run"
    argv = ["train", "--recipe", "cnn-baseline", "--out", str(run), "--data-dir", str(cifar_dir),
            "--set", "phases.0.epochs=3", "--set", "data.val_size=20", "--set",
            "data.train_limit=40", "--set", "run.threads=1", "--quiet"]  # fmt: skip
    assert main(argv) == 2
    error_line(capsys, "no space left on the device while writing", str(run / rundir.LAST),
               "previous version of the file is intact", "free some space", "--resume")
    assert load_checkpoint(run / rundir.LAST)["global_epoch"] == 1
    assert not [p for p in run.rglob("*") if is_temp_file(p)], "a temp file was left on the disk"
    assert not (run / "model.safetensors").exists()

    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed: the run goes on
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert load_checkpoint(run / rundir.LAST)["global_epoch"] == 3


# -- --debug -----------------------------------------------------------------------------------------
def test_debug_shows_the_traceback_instead_of_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        main(["--debug", *train_argv(tmp_path / "run", "--data-dir", str(tmp_path / "nope"))])


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        ({"classes": None}, "'classes'"),
        ({"resolution": 0}, "resolution 0"),
        ({"mean": [0.5, 0.5, 0.5, 0.5]}, "expected 3 numbers"),
        ({"std": [0.5, 0.0, 0.5]}, "positive"),
        ({"backbone": ""}, "'backbone'"),
    ],
    ids=["no-classes", "resolution-0", "four-means", "zero-std", "no-backbone"],
)
def test_a_hand_edited_model_json_is_one_line(edit, fragment, tiny_run, tmp_path, capsys):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    meta = json.loads((run / "model.json").read_text())
    meta.update(edit)
    (run / "model.json").write_text(json.dumps(meta))
    for argv in (["evaluate", str(run)], ["predict", str(run), str(run / "x.png")]):
        assert main(argv) == 2
        error_line(capsys, "model.json", fragment, "restore the file")
