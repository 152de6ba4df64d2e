"""Peers side by side on a photo folder: same machine, backbone, split and wall time per peer.

    PYTHONPATH=src .venv/bin/python benchmarks/peers.py --data-dir ROOT --budget 10m \
        [--peers tutorial,tutorial-frozen,fastai,ours] [--threads N] [--size 260] [--limit N]

Each peer (tutorial, tutorial-frozen, fastai, ours: docs/benchmarks.md) starts from Lite2's
ImageNet weights at --size px, trains and selects on the tool's own carved split of ROOT/train
(OUT/split.json) within --budget; its best-validating weights then score ROOT/test (timed apart).
Progress on stderr; the JSON on stdout and in OUT/peers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets
from torchvision import transforms as T

from cifar_transfer.config import val_count
from cifar_transfer.data import folder, folder_scan, neardup
from cifar_transfer.data.cifar10 import default_cache_dir
from cifar_transfer.data.datasets import grouped_split, open_source
from cifar_transfer.models.weights import lite_package_state_dict
from cifar_transfer.recipes import apply_overrides, load_recipe
from cifar_transfer.training.budget import parse_duration

PEERS = ("tutorial", "tutorial-frozen", "fastai", "ours")
FASTAI_PIN = "fastai==2.8.12"
MEAN = STD = (0.5, 0.5, 0.5)
LOG_EVERY = 10  # steps between progress lines
TUTORIAL_EPOCHS = 25  # the tutorial's num_epochs; the budget ends it first


def log(name: str, message: str) -> None:
    """One progress line on stderr."""
    print(f"[{name} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Run:
    """A peer's deadline, last validation time (held in reserve), counters and best weights."""

    def __init__(self, name: str, budget: float) -> None:
        self.name, self.start, self.reserve = name, time.monotonic(), 0.0
        self.deadline = self.start + budget
        self.st = {"epochs": 0.0, "steps": 0, "seen": 0, "train_s": 0.0, "epoch": 0, "t": 0.0}
        self.best = {"acc": -1.0, "epoch": 0, "state": None}

    def over(self) -> bool:
        """True when training must stop for the next validation to end by the deadline."""
        return time.monotonic() + self.reserve >= self.deadline

    def elapsed(self) -> float:
        """Seconds since the peer started."""
        return time.monotonic() - self.start

    def validated(self, acc: float, net: nn.Module) -> None:
        """Log an epoch's validation accuracy; copy the weights when they are the best yet."""
        self.st["epoch"] += 1
        log(self.name, f"epoch {self.st['epoch']}: val {acc:.4f} "
            f"({self.st['epochs']:.2f} epochs, {self.elapsed():.0f}s)")
        if acc > self.best["acc"]:
            state = {k: v.clone() for k, v in net.state_dict().items()}
            self.best = {"acc": acc, "epoch": self.st["epoch"], "state": state}

    def result(self, wall: float, test: tuple[int, int], test_s: float, **extra) -> dict:
        """The peer's figures, the same keys for every peer."""
        (correct, n), st = test, self.st
        return {
            "peer": self.name, "test_acc": round(correct / n, 4), "test_correct": f"{correct}/{n}",
            "val_acc": round(self.best["acc"], 4), "best_epoch": self.best["epoch"],
            "wall_s": round(wall, 1), "epochs": round(st["epochs"], 3), "steps": st["steps"],
            "train_images_seen": st["seen"], "train_s": round(st["train_s"], 1),
            "train_img_per_s": round(st["seen"] / max(st["train_s"], 1e-9), 2),
            "test_s": round(test_s, 1), **extra,
        }  # fmt: skip


def lite2(pretrained: bool = True) -> nn.Module:
    """timm's tf_efficientnet_lite2 with the package's ImageNet weights, as LiteFamily.build."""
    net = timm.create_model("tf_efficientnet_lite2", pretrained=False, drop_rate=0.0)
    if pretrained:
        net.load_state_dict(lite_package_state_dict(2, net))
    return net


def limited_root(root: Path, n: int, seed: int, dest: Path) -> Path:
    """Symlinks to n seeded train images and n//4 test images per class (smoke runs)."""
    shutil.rmtree(dest, ignore_errors=True)
    rng = random.Random(seed)
    dirs = folder_scan.scan(root).dirs  # train/, and val/ (or validation/, ...) and test/ as named
    for split in dirs.keys() & {"train", "val", "test"}:
        cap = n if split == "train" else max(1, n // 4)
        for cls in sorted(d for d in dirs[split].iterdir() if d.is_dir()):
            files = sorted(f for f in cls.iterdir() if f.is_file() and not f.name.startswith("."))
            rng.shuffle(files)
            (dest / split / cls.name).mkdir(parents=True)
            for f in files[:cap]:
                (dest / split / cls.name / f.name).symlink_to(f.resolve())
    return dest


def carve_split(root: Path, args: argparse.Namespace) -> dict:
    """The tool's own split of ROOT/train (small-folder's val_size, near-duplicate groups, seed),
    or the folder's own val/ when it has one, as (path, label) lists, and ROOT/test's files: what
    every peer trains, selects and scores on."""
    cfg = apply_overrides(load_recipe("small-folder"), [f"data.seed={args.seed}",
                          f"data.storage_size={args.size}", f"data.decode_workers={args.threads}"])
    src, d = open_source(cfg, str(root), progress=False), cfg.data
    listed = {k: [(str(f), c) for f, c in v] for k, v in src.scan.splits.items()}
    dirs = {k: str(v) for k, v in ({"val": src.scan.dirs["train"]} | src.scan.dirs).items()}
    if src.has_val:  # the user's own validation folder: nothing carved, as the tool does
        return {"root": str(root), "classes": src.classes, "val_size": "own val/",
                "near_duplicates": None, "dirs": dirs} | listed
    x, y, _ = folder.load_split(src.scan, "train", d.storage_size, None, d.decode_workers,
                                progress=False)  # decoded here, no cache left behind
    files, groups = src.scan.kept("train"), neardup.find_groups(x, d.near_duplicates)
    parts = grouped_split(y, val_count(d.val_size, len(y)), d.seed, groups)
    train, val = ([(str(files[i]), int(y[i])) for i in idx.tolist()] for idx in parts)
    return {"root": str(root), "classes": src.classes, "val_size": d.val_size,
            "near_duplicates": groups.summary(d.near_duplicates), "dirs": dirs, "train": train, "val": val,
            "test": listed["test"]}


def score(net: nn.Module, loader) -> tuple[int, int]:
    """(correct, total) of a classifier over a loader of (images, labels)."""
    net.eval()
    correct = total = 0
    with torch.inference_mode():
        for x, y in loader:
            correct, total = correct + int((net(x).argmax(1) == y).sum()), total + len(y)
    return correct, total


def run_tutorial(split: dict, args: argparse.Namespace, frozen: bool = False) -> dict:
    """PyTorch's transfer-learning tutorial recipe (finetuning, or frozen: fixed features)."""
    run, s = Run("tutorial-frozen" if frozen else "tutorial", args.budget), args.size
    norm = T.Normalize(MEAN, STD)
    train_tf = T.Compose([T.RandomResizedCrop(s), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(round(s * 256 / 224)), T.CenterCrop(s), T.ToTensor(), norm])

    def loader(part: str, tf, entries: list, shuffle: bool) -> DataLoader:
        """ImageFolder(the part's folder), only the split's files, in a DataLoader."""
        ds = datasets.ImageFolder(split["dirs"][part], tf)
        index = {os.path.normpath(p): i for i, (p, _) in enumerate(ds.samples)}
        sub = Subset(ds, [index[os.path.normpath(p)] for p, _ in entries])
        return DataLoader(sub, args.batch_size, shuffle=shuffle, num_workers=args.workers)

    train_dl = loader("train", train_tf, split["train"], True)
    val_dl = loader("val", eval_tf, split["val"], False)
    net = lite2()
    net.reset_classifier(len(split["classes"]))  # the tutorial's new nn.Linear(num_ftrs, classes)
    if frozen:
        net.requires_grad_(False)
        net.get_classifier().requires_grad_(True)
    params = net.get_classifier().parameters() if frozen else net.parameters()
    opt = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    loss_fn, st = nn.CrossEntropyLoss(), run.st
    for epoch in range(1, TUTORIAL_EPOCHS + 1):
        if epoch > 1 and run.over():  # the first epoch has at least one step, then validates
            break
        net.train()  # as the tutorial: BatchNorm statistics update even when frozen
        t, i = time.monotonic(), 0
        for i, (x, y) in enumerate(train_dl, 1):
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            st["steps"], st["seen"] = st["steps"] + 1, st["seen"] + len(y)
            if st["steps"] % LOG_EVERY == 0:
                log(run.name, f"epoch {epoch} step {i}/{len(train_dl)} loss {loss.item():.3f} "
                    f"{run.elapsed():.0f}s of {args.budget:.0f}s")
            if run.over():
                break
        st["train_s"] += time.monotonic() - t
        st["epochs"] += i / len(train_dl)
        sched.step()
        t = time.monotonic()
        correct, n = score(net, val_dl)
        run.reserve = time.monotonic() - t
        run.validated(correct / n, net)
    wall = run.elapsed()
    net.load_state_dict(run.best["state"])
    t = time.monotonic()
    test = score(net, loader("test", eval_tf, split["test"], False))
    return run.result(wall, test, time.monotonic() - t, batch_size=args.batch_size)


def run_fastai(split: dict, args: argparse.Namespace) -> dict:
    """fastai's vision_learner(...).fine_tune(epochs), stopped by a callback at the deadline."""
    try:
        import fastai
        import fastai.vision.all as fv
    except ImportError:
        pip = Path(sys.executable).parent / "pip"
        raise SystemExit(f"error: fastai is not installed: {pip} install {FASTAI_PIN}") from None
    run, s = Run("fastai", args.budget), args.size
    label = {p: split["classes"][c] for part in ("train", "val", "test") for p, c in split[part]}
    val_set = {p for p, _ in split["val"]}
    block = fv.DataBlock(blocks=(fv.ImageBlock, fv.CategoryBlock), get_y=lambda p: label[str(p)],
                         splitter=fv.FuncSplitter(lambda p: str(p) in val_set),
                         item_tfms=fv.Resize(round(s * 460 / 224)),
                         batch_tfms=fv.aug_transforms(size=s, min_scale=0.75))
    items = [Path(p) for p, _ in split["train"] + split["val"]]
    dls = block.dataloaders(items, bs=args.batch_size, num_workers=args.workers,
                            device=torch.device("cpu"))
    fv.model_meta[lite2] = {"cut": -2, "split": fv.default_split, "stats": (list(MEAN), list(STD))}
    learn, st = fv.vision_learner(dls, lite2, metrics=fv.accuracy), run.st

    class Deadline(fv.Callback):
        """Stops fine_tune at the deadline; keeps the best-validating weights in memory."""

        order = fv.Recorder.order + 1  # after Recorder: the epoch's metrics are final

        def before_fit(self):
            """The unfrozen fit does not start after the deadline (the frozen one always does)."""
            if run.over() and run.best["state"] is not None:
                raise fv.CancelFitException

        def before_train(self):
            """Time the training part of the epoch."""
            st["t"] = time.monotonic()

        def after_batch(self):
            """Count the step; end the epoch's training at the deadline."""
            if self.training:
                st["steps"], st["seen"] = st["steps"] + 1, st["seen"] + len(self.yb[0])
                if st["steps"] % LOG_EVERY == 0:
                    log(run.name, f"{'frozen' if st['epoch'] == 0 else 'unfrozen'} step "
                        f"{self.iter + 1}/{self.n_iter} loss {float(self.loss):.3f} "
                        f"{run.elapsed():.0f}s of {args.budget:.0f}s")
                if run.over():
                    raise fv.CancelTrainException

        def after_train(self):
            """Add the epoch's (maybe partial) training; time its validation."""
            st["train_s"] += time.monotonic() - st["t"]
            done, n = getattr(self.learn, "iter", -1) + 1, getattr(self.learn, "n_iter", 0)
            st["epochs"] += done / n if n else 0.0  # no batch at all: a set under one batch
            st["t"] = time.monotonic()

        def after_epoch(self):
            """Keep the best weights; stop the fit at the deadline."""
            run.reserve = time.monotonic() - st["t"]  # the validation pass just done
            run.validated(float(self.learn.metrics[0].value), self.learn.model)
            if run.over():
                raise fv.CancelFitException

    learn.add_cb(deadline := Deadline())
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(args.fastai_epochs)
    learn.remove_cb(deadline)  # get_preds calls before_fit too
    wall = run.elapsed()
    learn.model.load_state_dict(run.best["state"])
    t = time.monotonic()
    test_dl = learn.dls.test_dl([Path(p) for p, _ in split["test"]], with_labels=True)
    with learn.no_bar():
        preds, targs = learn.get_preds(dl=test_dl)
    test = (int((preds.argmax(1) == targs).sum()), len(targs))
    return run.result(wall, test, time.monotonic() - t, batch_size=args.batch_size,
                      fine_tune_epochs=args.fastai_epochs, fastai=fastai.__version__)


def run_ours(split: dict, args: argparse.Namespace) -> dict:
    """`cifar-transfer train --budget`, then `evaluate --split test`; figures from the run dir."""
    run_dir, cache = args.out.resolve() / "ours-run", args.out.resolve() / "ours-cache"
    cmd = [sys.executable, "-m", "cifar_transfer"]
    train = cmd + ["train", "--data-dir", split["root"], "--budget", args.budget_text,
                   "--out", str(run_dir), "--set", f"data.seed={args.seed}"]
    if args.threads:
        train += ["--set", f"run.threads={args.threads}"]
    if args.size != 260:  # small-folder's own resolution; another is passed on
        train += ["--set", f"model.resolution={args.size}", "--set",
                  f"data.storage_size={args.size}"]
    for old in (run_dir, cache):
        shutil.rmtree(old, ignore_errors=True)
    machine = default_cache_dir() / "machine"  # the cold cache keeps the machine measurements
    known = {f.name: f.read_bytes() for f in machine.glob("*.json")}
    (cache / "machine").mkdir(parents=True)
    for name, data in known.items():
        (cache / "machine" / name).write_bytes(data)
    env = dict(os.environ, CIFAR_TRANSFER_CACHE=str(cache))
    log("ours", " ".join(train[1:]))
    t = time.monotonic()
    rc = subprocess.run(train, env=env, stdout=sys.stderr, check=False).returncode
    wall, test_s, error = time.monotonic() - t, 0.0, rc and f"train exited with {rc}"
    if not error:
        t = time.monotonic()
        rc = subprocess.run(cmd + ["evaluate", str(run_dir), "--split", "test"], env=env,
                            stdout=sys.stderr, check=False).returncode
        test_s, error = time.monotonic() - t, rc and f"evaluate exited with {rc}"
    for f in (cache / "machine").glob("*.json"):  # new measurements kept, as a plain run keeps them
        if f.read_bytes() != known.get(f.name):
            machine.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, machine / f.name)
    shutil.rmtree(cache, ignore_errors=True)  # the decoded images: large
    if error:
        return {"peer": "ours", "error": error, "wall_s": round(wall, 1)}
    ev = json.loads((run_dir / "eval-test.json").read_text())
    meta = json.loads((run_dir / "model.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())["plan"]
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines() if r]
    tuned = [r for r in rows if r.get("phase_name") != "probe"]
    run = Run("ours", 0)
    seen = round(sum(r["img_per_s"] * r["seconds"] for r in tuned))  # fine-tuning images
    run.st = {"epochs": seen / meta["train_images"], "steps": round(seen / plan["train_batch"]),
              "seen": seen, "train_s": sum(r["seconds"] for r in tuned)}
    run.best = {"acc": meta["val_acc"], "epoch": meta.get("best_epoch")}
    correct = sum(row[i] for i, row in enumerate(ev["confusion_matrix"]))
    keys = ("kind", "finetune_freeze", "finetune_precision", "train_batch", "epochs")
    same = [meta["train_images"], meta["val_images"]] == [len(split["train"]), len(split["val"])]
    return run.result(wall, (correct, ev["n"]), test_s, run_dir=str(run_dir), same_split=same,
                      extract_s=round(sum(r.get("extract_seconds", 0) for r in rows), 1),
                      plan={k: plan.get(k) for k in keys} | {"tta": meta.get("tta")})


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line (see the module docstring and docs/benchmarks.md)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = ap.add_argument
    add("--data-dir", type=Path, required=True, help="ROOT with train/<class>/ and test/<class>/")
    add("--budget", default="10m", help="wall time per peer: 90s, 10m, 1h")
    add("--peers", default=",".join(PEERS), help="comma-separated, of " + ", ".join(PEERS))
    add("--size", type=int, default=260, help="resolution S (Lite2's native 260)")
    add("--batch-size", type=int, default=32, help="tutorial and fastai (the tutorial's: 4)")
    add("--workers", type=int, default=2, help="DataLoader workers (tutorial, fastai)")
    add("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    add("--fastai-epochs", type=int, default=1, help="fine_tune(N): N unfrozen epochs")
    add("--seed", type=int, default=0, help="the split's seed (data.seed), for every peer")
    add("--limit", type=int, default=0, help="smoke runs: N train, N//4 test images per class")
    add("--out", type=Path, help="results and run dirs (default runs/peers-<time>)")
    add("--child", help=argparse.SUPPRESS)  # run this one peer here, on OUT/split.json
    args = ap.parse_args(argv)
    args.budget_text, args.budget = args.budget, parse_duration(args.budget)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if bad := [p for p in args.peers if p not in PEERS]:
        ap.error(f"unknown peer(s) {bad}: choose from {', '.join(PEERS)}")
    args.out = args.out or Path("runs") / f"peers-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def main(argv: list[str] | None = None) -> int:
    """Carve the split once, run each peer (a child process each), write and print the JSON."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    split_file = args.out / "split.json"
    if args.child:  # tutorial, tutorial-frozen and fastai: each in a fresh process
        split = json.loads(split_file.read_text())
        runner = {"fastai": run_fastai, "tutorial": run_tutorial}.get(args.child)
        result = runner(split, args) if runner else run_tutorial(split, args, frozen=True)
        (args.out / f"{args.child}.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0
    root = args.data_dir.expanduser().resolve()
    if args.limit:
        root = limited_root(root, args.limit, args.seed, args.out.resolve() / "limited")
    t = time.monotonic()
    split = carve_split(root, args)
    split_file.write_text(json.dumps(split) + "\n")
    log("split", f"{len(split['train'])} train, {len(split['val'])} val, {len(split['test'])} "
        f"test ({time.monotonic() - t:.0f}s, not counted): {split_file}")
    results = {}
    for peer in args.peers:
        load = os.getloadavg()[0]
        log(peer, f"start, budget {args.budget_text}, load average {load:.2f}")
        if peer == "ours":
            result = run_ours(split, args)
        else:
            child_json = args.out / f"{peer}.json"
            child_json.unlink(missing_ok=True)
            rc = subprocess.run([sys.executable, __file__, *argv, "--child", peer,
                                 "--out", str(args.out)], check=False).returncode  # fmt: skip
            result = (json.loads(child_json.read_text()) if rc == 0 and child_json.is_file()
                      else {"peer": peer, "error": f"exited with {rc}"})
        results[peer] = result | {"val_n": len(split["val"]), "load_average": round(load, 2)}
        log(peer, json.dumps({k: result.get(k) for k in ("test_correct", "val_acc", "wall_s")}))
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = [ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if "model name" in ln]
    report = {
        "data_dir": str(args.data_dir), "root": str(root), "budget_s": args.budget,
        "size": args.size, "threads": args.threads or torch.get_num_threads(), "seed": args.seed,
        "workers": args.workers, "limit": args.limit or None, "split": {
            k: len(split[k]) for k in ("train", "val", "test")} | {"val_size": split["val_size"],
            "near_duplicates": split["near_duplicates"]}, "torch": torch.__version__,
        "cpu": cpu[0] if cpu else "unknown", "cores": os.cpu_count(), "peers": results,
    }  # fmt: skip
    (args.out / "peers.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
