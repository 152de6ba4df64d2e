"""Probabilities a user can trust: temperature scaling, calibration metrics, honest intervals,
abstention and suspected label errors, on synthetic data where the truth is known."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from cifar_transfer.models import temperature as temp
from cifar_transfer.results import calibration as cal
from cifar_transfer.system.errors import UserError


def calibrated_set(n: int = 5000, classes: int = 10, seed: int = 0):
    """Logits and labels drawn from softmax(logits): perfectly calibrated by construction."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=gen) * 2.0
    labels = torch.multinomial(logits.softmax(1), 1, generator=gen).flatten()
    return logits, labels


def test_temperature_scaling_keeps_the_argmax_and_lowers_nll_of_an_overconfident_model():
    logits, labels = calibrated_set()
    over = logits * 3.0  # the same predictions, three times too sure
    temp.fit_temperature(over[:10], labels[:10])  # torch.optim's one-time set-up, not the fit
    t0 = time.perf_counter()
    t = temp.fit_temperature(over, labels)
    seconds = time.perf_counter() - t0
    assert 2.6 < t < 3.4  # recovers the over-confidence factor
    assert seconds < 1.0  # 5,000 images: well under a second
    fixed = temp.scaled(over, t)
    assert torch.equal(fixed.argmax(1), over.argmax(1))
    assert temp.nll(fixed, labels) < temp.nll(over, labels) - 0.1
    before, after = (temp.ece(x.softmax(1), labels) for x in (over, fixed))
    assert after < 0.02 < before
    assert temp.fit_temperature(over, labels) == t  # deterministic


def test_ece_of_a_perfectly_calibrated_set_is_near_zero_and_bins_count_every_image():
    logits, labels = calibrated_set()
    probs = logits.softmax(1)
    assert temp.ece(probs, labels) < 0.02
    bins = temp.reliability_bins(probs, labels)
    assert len(bins) == temp.BINS and sum(b["n"] for b in bins) == len(labels)
    assert abs(temp.fit_temperature(logits, labels) - 1.0) < 0.1
    # A confident, always-wrong model is as badly calibrated as it gets.
    wrong = torch.nn.functional.one_hot((labels + 1) % 10, 10).float() * 20
    assert temp.ece(wrong.softmax(1), labels) > 0.99
    assert temp.brier(wrong.softmax(1), labels) > 1.99


def test_wilson_interval_covers_the_true_accuracy_at_about_95_percent():
    rng = np.random.default_rng(0)
    for p, n in ((0.9, 200), (0.6, 1000), (0.98, 500)):
        hits = rng.binomial(n, p, size=2000)
        covered = np.mean([lo <= p <= hi for lo, hi in (cal.wilson_interval(int(k), n) for k in hits)])
        assert 0.93 <= covered <= 0.97, (p, n, covered)
    lo, hi = cal.wilson_interval(5000, 5000)  # 100% still gets an honest lower bound
    assert hi == 1.0 and 0.999 < lo < 1.0
    assert cal.separable_difference(0.9, 5000) == pytest.approx(0.0118, abs=5e-4)


def test_selective_accuracy_answers_nothing_at_1_everything_at_0_and_rises_with_confidence():
    logits, labels = calibrated_set()
    probs = logits.softmax(1)
    assert cal.selective(probs, labels, 1.0)["answered"] == 0
    everything = cal.selective(probs, labels, 0.0)
    assert everything["coverage"] == 1.0
    sure = cal.selective(probs, labels, 0.8)
    assert 0 < sure["coverage"] < 1 and sure["accuracy"] > everything["accuracy"] + 0.2
    curve = cal.coverage_curve(probs, labels)
    assert curve[-1]["coverage"] == 1.0 and curve[0]["accuracy"] > curve[-1]["accuracy"]
    with pytest.raises(UserError, match="not a probability"):
        cal.check_min_confidence(1.5)


def test_suspected_label_errors_find_flipped_labels_first():
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(1000) % 10
    logits = torch.nn.functional.one_hot(labels, 10).float() * 6 + torch.randn(1000, 10, generator=gen)
    given = labels.clone()
    flipped = torch.arange(0, 1000, 50)  # 20 images labelled as the next class
    given[flipped] = (labels[flipped] + 1) % 10
    found = cal.suspected_label_errors(logits.softmax(1), given)
    # Confident learning accuses no clean image here, and misses only flipped images whose
    # other class sits below that class's average confidence.
    assert {e["index"] for e in found} <= set(flipped.tolist()) and len(found) >= 15
    assert all(e["suggested"] == int(labels[e["index"]]) for e in found)
    first = found[0]
    assert first["suggested"] == int(labels[first["index"]]) and first["given"] == int(given[first["index"]])


def test_twofold_check_measures_ece_on_images_the_temperature_never_saw():
    logits, labels = calibrated_set(n=4000)
    f = cal.twofold(logits * 2.5, labels)
    assert f["ece_after"] < 0.03 < f["ece_before"]
    assert all(2.0 < t < 3.0 for t in f["temperatures"])
