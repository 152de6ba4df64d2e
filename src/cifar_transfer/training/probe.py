"""Linear probe: multinomial logistic regression on cached features, fitted by full-batch L-BFGS.

The classic way to read out frozen features (CLIP, SimCLR, BiT evaluations): standardize the
features, fit softmax regression with an L2 penalty by L-BFGS for each penalty in a short sweep
(strongest first, each fit warm-starting the next), and keep the penalty with the best
validation accuracy. On 45,000 x 1,280 features a whole sweep takes seconds on a CPU, and it
needs no learning rate, batch size or epoch count.

The standardization is folded back into the returned weights, so the result is a plain
`nn.Linear` on the raw features, the same head the SGD/Adam phases train.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_ITER = 500  # L-BFGS iterations per penalty; a warm-started fit usually stops well before


@dataclass
class ProbeFit:
    l2: float
    weight: torch.Tensor  # (classes, features), on the raw (unstandardized) features
    bias: torch.Tensor  # (classes,)
    train_loss: float  # cross-entropy without the penalty
    train_acc: float
    iterations: int


def _standardize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    return mean, std


@torch.no_grad()
def _unfold(w: torch.Tensor, b: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
    """Weights on standardized features -> weights on raw features: W z + b with z = (x - m) / s."""
    weight = w / std
    return weight, b - weight @ mean


def sweep(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    l2_values: list[float],
    num_classes: int = 10,
    max_iter: int = MAX_ITER,
    class_weights: torch.Tensor | None = None,
) -> Iterator[ProbeFit]:
    """Fit one probe per L2 penalty, strongest first (warm starts); yield each fit as it lands.

    The loss is mean cross-entropy + l2 / 2 * ||W||^2 on standardized features (the bias is not
    penalized); scikit-learn's `LogisticRegression(C=...)` is the same problem with C = 1 / (n l2).
    """
    x = train_x.float()
    y = train_y.to(x.device)
    mean, std = _standardize(x)
    z = (x - mean) / std
    w = torch.zeros(num_classes, z.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    for l2 in sorted(l2_values, reverse=True):
        opt = torch.optim.LBFGS(
            [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
            tolerance_grad=1e-7, tolerance_change=1e-10,
        )  # fmt: skip

        def closure(opt: torch.optim.LBFGS = opt, l2: float = l2) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z @ w.T + b, y, weight=class_weights) + 0.5 * l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            logits = z @ w.T + b
            ce = float(F.cross_entropy(logits, y))
            acc = float((logits.argmax(1) == y).float().mean())
        weight, bias = _unfold(w.detach(), b.detach(), mean, std)
        iters = int(opt.state[w].get("n_iter", 0))
        yield ProbeFit(l2, weight.clone(), bias.clone(), ce, acc, iters)
