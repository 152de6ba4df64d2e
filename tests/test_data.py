"""Data module: what a user notices when loading, splitting, downloading and augmenting CIFAR-10."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifar_transfer.data import cifar10 as data_mod
from cifar_transfer.data.augment import augment
from cifar_transfer.data.cifar10 import (
    CIFAR_MEAN,
    CIFAR_STD,
    CLASSES,
    default_cache_dir,
    download_cifar10,
    load_split,
    resolve_data_dir,
)
from cifar_transfer.data.splits import stratified_split, stratified_subset
from cifar_transfer.data.transforms import batch_indices, to_model_input
from cifar_transfer.system.errors import UserError

PER_BATCH = 50
REAL_DIR = Path(__file__).resolve().parents[1].parent / "shared/cifar10/cifar-10-batches-py"


def write_batch(path: Path, data: object, labels: object) -> None:
    """Write one batch as the originals are: protocol-2 pickle of data/labels/batch_label."""
    with path.open("wb") as f:
        pickle.dump(
            {"batch_label": f"batch {path.name}", "data": data, "labels": labels}, f, protocol=2
        )


def make_batches_dir(root: Path, with_test: bool = False) -> tuple[Path, np.ndarray, np.ndarray]:
    """A tiny cifar-10-batches-py (5 x 50 random images) under root; returns (dir, data, labels)."""
    out = root / "cifar-10-batches-py"
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(5 * PER_BATCH, 3072), dtype=np.uint8)
    labels = (np.arange(5 * PER_BATCH) * 7) % 10  # all classes, in a known non-sorted order
    for i in range(5):
        rows = slice(i * PER_BATCH, (i + 1) * PER_BATCH)
        write_batch(out / f"data_batch_{i + 1}", data[rows], labels[rows].tolist())
    if with_test:
        write_batch(out / "test_batch", data[:PER_BATCH], labels[:PER_BATCH].tolist())
    with (out / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": list(CLASSES), "num_vis": 3072}, f, protocol=2)
    return out, data, labels


# ---------------------------------------------------------------- loading


def test_load_split_reads_pixels_in_cifar_order(tmp_path: Path) -> None:
    batches, data, labels = make_batches_dir(tmp_path)
    images, targets = load_split(batches, "train")
    assert images.shape == (250, 3, 32, 32) and images.dtype == torch.uint8
    assert targets.shape == (250,) and targets.dtype == torch.int64
    assert targets.tolist() == labels.tolist()
    # First 1024 values = red plane, row-major; then green, then blue.
    row = data[0]
    assert images[0, 0].flatten().tolist() == row[:1024].tolist()
    assert images[0, 0, 0, 1] == row[1] and images[0, 0, 1, 0] == row[32]
    assert images[0, 1, 0, 0] == row[1024] and images[0, 2, 31, 31] == row[3071]
    # Batch order is kept: image 60 is row 10 of data_batch_2.
    assert images[60].flatten().tolist() == data[60].tolist()


def test_load_split_test_batch_when_present(tmp_path: Path) -> None:
    batches, _, labels = make_batches_dir(tmp_path, with_test=True)
    images, targets = load_split(batches, "test")
    assert images.shape == (PER_BATCH, 3, 32, 32)
    assert targets.tolist() == labels[:PER_BATCH].tolist()


def test_load_split_accepts_bytes_keys(tmp_path: Path) -> None:
    batches, data, labels = make_batches_dir(tmp_path)
    with (batches / "data_batch_1").open("wb") as f:  # as re-pickled by encoding="bytes" users
        pickle.dump(
            {b"data": data[:PER_BATCH], b"labels": labels[:PER_BATCH].tolist()}, f, protocol=2
        )
    images, _ = load_split(batches, "train")
    assert images[0].flatten().tolist() == data[0].tolist()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_batches_pickled_with_any_protocol_load(protocol: int, tmp_path: Path) -> None:
    batches, data, labels = make_batches_dir(tmp_path)
    with (batches / "data_batch_1").open("wb") as f:  # numpy scalars too, as re-saved lists hold
        pickle.dump({"data": data[:PER_BATCH], "labels": list(labels[:PER_BATCH])}, f, protocol)
    images, targets = load_split(batches, "train")
    assert images[0].flatten().tolist() == data[0].tolist()
    assert targets.tolist() == labels.tolist()


def test_resolve_data_dir_accepts_dir_and_parent(tmp_path: Path) -> None:
    batches, _, _ = make_batches_dir(tmp_path)
    assert resolve_data_dir(batches) == batches
    assert resolve_data_dir(str(tmp_path)) == batches


def test_resolve_data_dir_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="does not exist") as err:
        resolve_data_dir(missing)
    assert str(missing) in str(err.value) and "--data-dir" in str(err.value)


def test_resolve_data_dir_without_batches(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no CIFAR-10 batches in") as err:
        resolve_data_dir(tmp_path / "empty")
    assert "data_batch_1..5" in str(err.value) and "--data-dir" in str(err.value)


def test_resolve_data_dir_none_uses_cache_without_network(tmp_path: Path) -> None:
    batches, _, _ = make_batches_dir(tmp_path / "cache")
    assert resolve_data_dir(None, cache_dir=tmp_path / "cache") == batches


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CIFAR_TRANSFER_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CIFAR_TRANSFER_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "cifar-transfer"


def test_default_cache_dir_without_a_home_is_absolute_and_unwritable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CIFAR_TRANSFER_CACHE")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda p: p)  # no HOME and no passwd entry
    monkeypatch.chdir(tmp_path)
    cache = default_cache_dir()  # never a "~" folder in the current directory
    assert cache.is_absolute()
    with pytest.raises(UserError, match="CIFAR_TRANSFER_CACHE") as err:
        resolve_data_dir(None)
    assert "--data-dir" in str(err.value) and list(tmp_path.iterdir()) == []


def test_truncated_batch_is_reported(tmp_path: Path) -> None:
    batches, _, _ = make_batches_dir(tmp_path)
    path = batches / "data_batch_3"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match="truncated or corrupt") as err:
        load_split(batches, "train")
    assert "data_batch_3" in str(err.value)


def test_wrong_data_shape_is_reported(tmp_path: Path) -> None:
    batches, _, _ = make_batches_dir(tmp_path)
    write_batch(batches / "data_batch_2", np.zeros((PER_BATCH, 1024), np.uint8), [0] * PER_BATCH)
    with pytest.raises(UserError, match=r"expected uint8 \(N, 3072\)") as err:
        load_split(batches, "train")
    assert "data_batch_2" in str(err.value) and "(50, 1024)" in str(err.value)


def test_wrong_data_dtype_is_reported(tmp_path: Path) -> None:
    batches, _, _ = make_batches_dir(tmp_path)
    write_batch(batches / "data_batch_2", np.zeros((PER_BATCH, 3072), np.float32), [0] * PER_BATCH)
    with pytest.raises(UserError, match="float32"):
        load_split(batches, "train")


def test_labels_out_of_range_are_reported(tmp_path: Path) -> None:
    batches, _, _ = make_batches_dir(tmp_path)
    write_batch(batches / "data_batch_4", np.zeros((PER_BATCH, 3072), np.uint8), [10] * PER_BATCH)
    with pytest.raises(UserError, match=r"labels outside 0\.\.9") as err:
        load_split(batches, "train")
    assert "data_batch_4" in str(err.value)


def test_label_count_mismatch_is_reported(tmp_path: Path) -> None:
    batches, _, _ = make_batches_dir(tmp_path)
    write_batch(batches / "data_batch_1", np.zeros((PER_BATCH, 3072), np.uint8), [1] * 3)
    with pytest.raises(UserError, match="3 labels for 50 images"):
        load_split(batches, "train")


def test_missing_batches_are_reported(tmp_path: Path) -> None:
    batches, _, _ = make_batches_dir(tmp_path)
    with pytest.raises(UserError) as err:
        load_split(batches, "test")
    assert str(err.value).startswith(f"test_batch not found in {batches}")
    assert "--split val" in str(err.value)
    (batches / "data_batch_5").unlink()
    with pytest.raises(UserError, match="data_batch_5 not found"):
        load_split(batches, "train")
    with pytest.raises(UserError, match="unknown CIFAR-10 split 'val'"):
        load_split(batches, "val")


# ---------------------------------------------------------------- download


def make_archive(tmp_path: Path, members: dict[str, bytes] | None = None) -> tuple[str, str]:
    """A tar.gz in the official layout (or with the given members); returns (file:// URL, MD5)."""
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        if members is None:
            src, _, _ = make_batches_dir(tmp_path / "src")
            tar.add(src, arcname="cifar-10-batches-py")
        else:
            for name, payload in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return archive.as_uri(), hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_verifies_md5_and_extracts(tmp_path: Path) -> None:
    url, md5 = make_archive(tmp_path)
    cache = tmp_path / "cache"
    got = download_cifar10(cache, url=url, md5=md5)
    assert got == cache / "cifar-10-batches-py"
    images, _ = load_split(got, "train")
    assert images.shape == (250, 3, 32, 32)
    assert sorted(p.name for p in cache.iterdir()) == ["cifar-10-batches-py"]  # no temp leftovers
    # Already there: returned without touching the (now unreachable) network.
    assert download_cifar10(cache, url="http://127.0.0.1:9/x.tar.gz", md5=md5) == got


def test_download_wrong_md5_leaves_nothing(tmp_path: Path) -> None:
    url, md5 = make_archive(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="MD5") as err:
        download_cifar10(cache, url=url, md5="0" * 32)
    assert md5 in str(err.value) and "0" * 32 in str(err.value) and "--data-dir" in str(err.value)
    assert list(cache.iterdir()) == []


def test_download_offline_points_to_data_dir(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="cannot download CIFAR-10 from http://127.0.0.1:9") as err:
        download_cifar10(cache, url="http://127.0.0.1:9/x.tar.gz")
    assert "--data-dir" in str(err.value)
    assert list(cache.iterdir()) == []


class EndlessResponse:
    """A server that streams bytes forever (no Content-Length) and counts what was read."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.read_bytes = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def read(self, n: int) -> bytes:
        self.read_bytes += n
        assert self.read_bytes < 100 << 20, "the download kept reading past the expected size"
        return b"x" * n


def test_download_stops_once_past_the_expected_size(tmp_path: Path, monkeypatch) -> None:
    server = EndlessResponse()
    monkeypatch.setattr(data_mod.urllib.request, "urlopen", lambda url, timeout: server)
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="more than the 3,000,000 bytes") as err:
        download_cifar10(cache, url="https://example.invalid/c.tar.gz", size=3_000_000)
    assert "--data-dir" in str(err.value) and server.read_bytes <= 3_000_000 + (2 << 20)
    assert list(cache.iterdir()) == []
    assert data_mod.CIFAR10_BYTES == 170498071  # the official cifar-10-python.tar.gz


def test_download_rejects_unsafe_or_foreign_archives(tmp_path: Path) -> None:
    url, md5 = make_archive(tmp_path, {"../escape.txt": b"x"})
    with pytest.raises(UserError, match="cannot extract"):
        download_cifar10(tmp_path / "c1", url=url, md5=md5)
    assert not (tmp_path / "escape.txt").exists() and list((tmp_path / "c1").iterdir()) == []
    (tmp_path / "cifar-10-python.tar.gz").unlink()
    url, md5 = make_archive(tmp_path, {"readme.txt": b"not cifar"})
    with pytest.raises(UserError, match="no cifar-10-batches-py"):
        download_cifar10(tmp_path / "c2", url=url, md5=md5)
    assert list((tmp_path / "c2").iterdir()) == []


# ---------------------------------------------------------------- splits and batches


def balanced_labels(n: int = 50_000, seed: int = 0) -> torch.Tensor:
    labels = torch.arange(n) % 10
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def test_stratified_split_is_exact_balanced_and_seeded() -> None:
    labels = balanced_labels()
    train, val = stratified_split(labels, 5000, seed=0)
    assert len(val) == 5000 and len(train) == 45_000
    assert torch.bincount(labels[val], minlength=10).tolist() == [500] * 10
    assert torch.equal(
        torch.sort(torch.cat([train, val])).values, torch.arange(50_000)
    )  # disjoint + all
    assert torch.equal(train, torch.sort(train).values) and torch.equal(val, torch.sort(val).values)
    again_train, again_val = stratified_split(labels, 5000, seed=0)
    assert torch.equal(again_val, val) and torch.equal(again_train, train)
    _, other_val = stratified_split(labels, 5000, seed=1)
    assert not torch.equal(other_val, val)


def test_stratified_split_remainder_and_edges() -> None:
    labels = balanced_labels(1000)
    _, val = stratified_split(labels, 103, seed=0)
    counts = torch.bincount(labels[val], minlength=10)
    assert len(val) == 103 and counts.max() - counts.min() == 1
    train, val = stratified_split(labels, 0, seed=0)
    assert len(val) == 0 and torch.equal(train, torch.arange(1000))
    for bad in (-1, 1001):
        with pytest.raises(UserError, match="val_size"):
            stratified_split(labels, bad, seed=0)


def test_stratified_split_unbalanced_still_exact() -> None:
    labels = torch.tensor([0] * 3 + [1] * 50 + [2] * 50)
    _, val = stratified_split(labels, 30, seed=0)
    assert torch.bincount(labels[val], minlength=3).tolist() == [3, 14, 13]


def test_stratified_subset_limits_train_set() -> None:
    labels = balanced_labels(2000)
    train, _ = stratified_split(labels, 500, seed=0)
    sub = stratified_subset(train, labels, 300, seed=0)
    assert len(sub) == 300 and torch.bincount(labels[sub], minlength=10).tolist() == [30] * 10
    assert set(sub.tolist()) <= set(train.tolist())
    assert torch.equal(sub, stratified_subset(train, labels, 300, seed=0))
    assert torch.equal(stratified_subset(train, labels, 10_000, seed=0), train)


def test_batch_indices_cover_epoch() -> None:
    plain = batch_indices(10, 4, shuffle=False, generator=None)
    assert [b.tolist() for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(b) for b in batch_indices(10, 4, False, None, drop_last=True)] == [4, 4]
    shuffled = batch_indices(10, 4, True, torch.Generator().manual_seed(3))
    assert sorted(torch.cat(shuffled).tolist()) == list(range(10))
    assert torch.cat(shuffled).tolist() != list(range(10))
    again = batch_indices(10, 4, True, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(shuffled, again, strict=True))


# ---------------------------------------------------------------- augmentation


def random_images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_augment_none_is_identity() -> None:
    x = random_images(8)
    assert torch.equal(augment(x, "none", torch.Generator().manual_seed(0)), x)


def test_augment_flip_only_mirrors() -> None:
    x = random_images(64)
    out = augment(x, "flip", torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 0 < int(mirrored.sum()) < 64  # each image decides on its own


def window_hits(out: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """(B,9,9) bool: does out[b] equal the 32x32 window of source[b] at offset (dy, dx)?"""
    windows = source.unfold(2, 32, 1).unfold(3, 32, 1)  # (B,3,9,9,32,32)
    return (windows == out.float()[:, :, None, None]).all(-1).all(-1).all(1)


def test_augment_crop_flip_is_a_window_of_the_padded_image() -> None:
    x = random_images(64)
    out = augment(x, "crop-flip", torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    padded = F.pad(
        x.float(), (4, 4, 4, 4), mode="reflect"
    )  # reference padding, independent of data.py
    plain, mirrored = window_hits(out, padded), window_hits(out, padded.flip(-1))
    assert bool((plain.flatten(1).any(1) | mirrored.flatten(1).any(1)).all())
    assert 0 < int(mirrored.flatten(1).any(1).sum()) < 64  # flips are per image
    # Shifts are per image too: many distinct offsets, and nearly every image actually moved.
    offsets = {tuple(torch.nonzero(plain[b] | mirrored[b])[0].tolist()) for b in range(64)}
    assert len(offsets) > 10
    assert int((out != x).flatten(1).any(1).sum()) > 50


def test_augment_is_reproducible_and_resumable() -> None:
    x = random_images(32)
    a = augment(x, "crop-flip", torch.Generator().manual_seed(7))
    b = augment(x, "crop-flip", torch.Generator().manual_seed(7))
    c = augment(x, "crop-flip", torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(7)
    augment(x, "crop-flip", g)
    state = g.get_state()  # what a checkpoint saves
    second = augment(x, "crop-flip", g)
    g.set_state(state)
    assert torch.equal(augment(x, "crop-flip", g), second)


def test_augment_batch_of_512_is_fast() -> None:
    x = random_images(512)
    g = torch.Generator().manual_seed(0)
    augment(x, "crop-flip", g)  # warm-up
    start = time.perf_counter()
    for _ in range(5):
        augment(x, "crop-flip", g)
    assert (time.perf_counter() - start) / 5 < 0.25  # measured ~0.03 s on 2 busy cores


def test_augment_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown augmentation 'cutout'"):
        augment(random_images(2), "cutout", torch.Generator())


# ---------------------------------------------------------------- model input


def test_to_model_input_normalizes_and_resizes() -> None:
    x = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    expected = [(128 / 255 - m) / s for m, s in zip(CIFAR_MEAN, CIFAR_STD, strict=True)]
    for resolution in (32, 64, 224):
        out = to_model_input(x, resolution, CIFAR_MEAN, CIFAR_STD)
        assert out.shape == (2, 3, resolution, resolution) and out.dtype == torch.float32
        assert out.is_contiguous(memory_format=torch.channels_last)
        for c in range(3):
            assert torch.allclose(out[:, c], torch.tensor(expected[c]), atol=1e-5)


def test_to_model_input_matches_reference_pipeline() -> None:
    x = random_images(4)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    # Resolution 32: no resize at all, just the normalization.
    assert torch.allclose(
        to_model_input(x, 32, CIFAR_MEAN, CIFAR_STD), (x / 255 - mean) / std, atol=1e-5
    )
    # Upsampling: /255, bilinear (align_corners=False, no antialias), then normalize.
    ref = F.interpolate(x / 255, size=(96, 96), mode="bilinear", align_corners=False)
    out = to_model_input(x, 96, CIFAR_MEAN, CIFAR_STD, channels_last=False)
    assert out.is_contiguous() and torch.allclose(out, (ref - mean) / std, atol=1e-5)


def test_to_model_input_rejects_float_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(torch.zeros(1, 3, 32, 32), 32, CIFAR_MEAN, CIFAR_STD)


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real_train() -> tuple[torch.Tensor, torch.Tensor]:
    if not (REAL_DIR / "data_batch_1").is_file():
        pytest.skip(f"real CIFAR-10 not found at {REAL_DIR}")
    return load_split(resolve_data_dir(REAL_DIR.parent), "train")


def test_real_train_split_matches_published_facts(
    real_train: tuple[torch.Tensor, torch.Tensor],
) -> None:
    images, labels = real_train
    assert images.shape == (50_000, 3, 32, 32)
    assert labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    sums = images.numpy().sum(axis=(0, 2, 3), dtype=np.int64)  # exact integer sums
    means = torch.from_numpy(sums).double() / (50_000 * 32 * 32)
    assert torch.allclose(
        means, torch.tensor([125.307, 122.950, 113.865], dtype=torch.float64), atol=0.01
    )
    # CIFAR_MEAN is these means on the 0..1 scale.
    assert torch.allclose(means / 255, torch.tensor(CIFAR_MEAN, dtype=torch.float64), atol=1e-4)


def test_real_validation_split_is_balanced(real_train: tuple[torch.Tensor, torch.Tensor]) -> None:
    _, labels = real_train
    train, val = stratified_split(labels, 5000, seed=0)
    assert torch.bincount(labels[val], minlength=10).tolist() == [500] * 10
    assert len(train) == 45_000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_per_step_input_path_never_makes_the_host_wait_for_the_gpu():
    # A host sync per step (a blocking copy, a value read back) keeps the GPU idle while Python
    # prepares the next step; CUDA's sync debug mode turns any such sync into an error.
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, device="cuda")
    gen = torch.Generator().manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for idx in batch_indices(len(images), 64, shuffle=True, generator=gen):
            x = augment(images[idx.to("cuda", non_blocking=True)], "crop-flip", gen)
            x = to_model_input(x, 96, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.shape == (64, 3, 96, 96) and x.is_cuda
