"""Temperature scaling: the one scalar T that minimizes the NLL of softmax(logits / T) (Guo et al.
2017, "On Calibration of Modern Neural Networks"), and the calibration metrics it is judged by.
T > 0 never changes the argmax. Pure functions of logits and labels, used by training (a run fits
its bundle's T) and by the tools for finished runs (evaluate, calibrate, report).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BINS = 15  # equal-width confidence bins of the ECE and the reliability diagram (Guo et al.)
T_RANGE = (0.05, 20.0)  # a fitted temperature outside this means the logits are broken


def _f64(logits: torch.Tensor) -> torch.Tensor:
    return logits.detach().to(torch.float64).cpu()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimizing the mean NLL of softmax(logits / T) on (logits, labels), by L-BFGS.

    Fitted on log T (so T stays positive) in float64 on one CPU thread (deterministic, and on
    tensors this small threads only contend); 1.0 for no images or non-finite logits. 5,000 x 10
    logits take milliseconds (about 6 NLL evaluations).
    """
    if len(labels) == 0 or not torch.isfinite(logits).all():
        return 1.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(False), torch.enable_grad():  # callers may be in inference mode
            t = _lbfgs_temperature(_f64(logits).clone(), labels.cpu().long().clone())
    finally:
        torch.set_num_threads(threads)
    if not math.isfinite(t):
        return 1.0
    return min(max(t, T_RANGE[0]), T_RANGE[1])


def _lbfgs_temperature(x: torch.Tensor, y: torch.Tensor) -> float:
    x_true = x.gather(1, y[:, None])[:, 0]
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        inv_t = (-log_t).exp()
        loss = (torch.logsumexp(x * inv_t, 1) - x_true * inv_t).mean()  # NLL of softmax(x / T)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits divided by T (float32), the calibrated logits."""
    return logits.float() if temperature == 1.0 else logits.float() / temperature


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels (natural log)."""
    return float(F.cross_entropy(_f64(logits), labels.cpu().long())) if len(labels) else math.nan


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: mean over images of sum_k (p_k - [k = label])^2 (0 is perfect, 2 worst)."""
    if not len(labels):
        return math.nan
    p = probs.detach().to(torch.float64).cpu()
    onehot = F.one_hot(labels.cpu().long(), p.shape[1]).to(torch.float64)
    return float(((p - onehot) ** 2).sum(1).mean())


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> list[dict]:
    """Per equal-width confidence bin ((k/bins, (k+1)/bins]): count, mean confidence, accuracy."""
    conf, pred = probs.detach().to(torch.float64).cpu().max(1)
    hit = (pred == labels.cpu()).to(torch.float64)
    index = (conf * bins).ceil().long().clamp(1, bins) - 1
    out = []
    for k in range(bins):
        m = index == k
        n = int(m.sum())
        out.append({
            "lo": k / bins, "hi": (k + 1) / bins, "n": n,
            "confidence": float(conf[m].mean()) if n else None,
            "accuracy": float(hit[m].mean()) if n else None,
        })  # fmt: skip
    return out


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """Expected calibration error: sum over bins of (share of images) x |accuracy - confidence|."""
    total = len(labels)
    if not total:
        return math.nan
    return sum(
        b["n"] / total * abs(b["accuracy"] - b["confidence"])
        for b in reliability_bins(probs, labels, bins) if b["n"]
    )
