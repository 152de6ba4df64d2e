"""The one batched forward path: validation during training, `evaluate`, `predict`, exports'
parity checks and `serve` all score images through `logits_of`, so the bundle's val_acc is what
`evaluate` prints, to the bit. Flip TTA (the mirror image's logits averaged in) lives here too."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from cifar_transfer.data.transforms import to_model_input
from cifar_transfer.system import hardware


def batched_logits(
    forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int,
    precision: str, to_input: Callable[[torch.Tensor], torch.Tensor], tta: bool = False,
    mirrored: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, float32 logits) for each batch of `images`, under autocast.
    `tta` averages with the mirror image (the cheapest TTA that pays on CIFAR); `mirrored` scores
    the mirror images alone (a run that has the plain logits already: their mean is the TTA's)."""
    for start in range(0, len(images), batch_size):
        x = to_input(images[start : start + batch_size])
        with hardware.autocast(images.device, precision):
            y = forward(torch.flip(x, dims=[3]) if mirrored else x).float()
            if tta:
                y = (y + forward(torch.flip(x, dims=[3])).float()) / 2
        yield start, y


@torch.inference_mode()
def logits_of(
    net: torch.nn.Module, images: torch.Tensor, batch_size: int, precision: str,
    to_input: Callable[[torch.Tensor], torch.Tensor], tta: bool = False, mirrored: bool = False,
) -> torch.Tensor:
    """float32 logits of every image (or cached feature row), in order, on the images' device:
    `net` in eval mode (its mode restored after), batch by batch as `batched_logits` runs them."""
    was_training = net.training
    net.eval()
    try:
        out = [y for _, y in batched_logits(net, images, batch_size, precision, to_input, tta,
                                            mirrored)]  # fmt: skip
    finally:
        net.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0, device=images.device)


def predict_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    precision: str,
    channels_last: bool = True,
    tta: bool = False,
    mirrored: bool = False,
) -> torch.Tensor:
    """A model's float32 logits on CPU for uint8 images already on its device: resized to
    `resolution` and normalized by `mean`/`std` (of the mirror images with `mirrored`)."""
    return logits_of(
        model, images, batch_size, precision,
        lambda x: to_model_input(x, resolution, mean, std, channels_last), tta, mirrored,
    ).cpu()  # fmt: skip
