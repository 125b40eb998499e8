"""`ddp-mnist predict MODEL IMAGE...`: the digit in each image, seen the way the model was trained to see it.

MNIST digits are white on a black background, 28x28 grayscale. Each image (PNG or JPEG, decoded by
torchvision.io) is read as grayscale, inverted with `--invert` (for a dark digit on a light background),
padded with black to a square (so the digit keeps its shape) and resized to 28x28, then scaled as the
model's training scaled its inputs (its config's `normalize`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ddp_mnist.artifacts.trained import TrainedModel, load_trained
from ddp_mnist.commands.arguments import examples
from ddp_mnist.errors import DataError
from ddp_mnist.model import INPUT_SHAPE


def read_digit(path: Path, invert: bool = False) -> torch.Tensor:
    """An image file as an MNIST-like uint8 [28, 28] tensor: grayscale, white digit on black."""
    from torchvision.io import ImageReadMode, decode_image  # ~1 s to import: only predict needs it
    from torchvision.transforms.v2.functional import resize, to_dtype

    if not path.is_file():
        raise DataError(f"image {path} does not exist (or is not a file)")
    try:
        data = bytearray(path.read_bytes())
    except OSError as e:
        raise DataError(f"image {path} cannot be read ({e.strerror})") from None
    try:
        # From bytes, which every torchvision decodes; [1, H, W]. The EXIF orientation: a phone photo of a digit
        # is stored sideways and tagged so. (An empty file fails in frombuffer.)
        image = decode_image(
            torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.GRAY, apply_exif_orientation=True
        )
    except (RuntimeError, ValueError):  # torchvision's message names its C++ source file, not the problem
        raise DataError(f"image {path} cannot be decoded: it is not a PNG or JPEG file, or it is damaged") from None
    image = to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs come as uint16
    if invert:
        image = 255 - image
    height, width = image.shape[-2:]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    image = torch.nn.functional.pad(image, (left, side - width - left, top, side - height - top))  # black
    return resize(image, list(INPUT_SHAPE[1:]), antialias=True)[0]  # what the networks take: 28x28


def looks_inverted(digit: torch.Tensor) -> bool:
    """A light background: the border of an MNIST digit is black, so a bright border means black-on-white."""
    border = torch.cat([digit[0], digit[-1], digit[:, 0], digit[:, -1]])
    return border.float().mean().item() > 127


def predict(trained: TrainedModel, digits: torch.Tensor) -> list[tuple[int, float]]:
    """(digit, probability) for each uint8 image [N, 28, 28]."""
    probabilities = torch.softmax(trained.logits(digits), dim=1)
    best = probabilities.max(dim=1)
    return list(zip(best.indices.tolist(), best.values.tolist()))


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Print the digit in each image and the model's probability for it, one tab-separated line per "
        "file. The model sees what MNIST shows: a white digit on a black background, 28x28 grayscale; "
        "each image is read as grayscale, padded with black to a square, resized to 28x28 and scaled "
        "as in training. Pass --invert for a dark digit on a light background."
    )
    p.epilog = examples(
        "ddp-mnist predict runs/latest digit.png",
        "ddp-mnist predict runs/latest/model.safetensors *.png",
        "ddp-mnist predict --invert runs/latest/checkpoints/best.pt photo-of-ink.jpg",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a checkpoint (.pt), a run folder (its newest good checkpoint) or an exported "
        "model.safetensors (with model.json beside it)",
    )
    p.add_argument(
        "images",
        metavar="IMAGE",
        nargs="+",
        help="PNG or JPEG files of one digit each, white on a black background like MNIST (any size: "
        "padded to a square and resized to 28x28)",
    )
    p.add_argument(
        "--invert",
        action="store_true",
        help="the images show a dark digit on a light background (e.g. ink on paper): invert them first",
    )
    p.set_defaults(func=predict_command)


def predict_command(args: argparse.Namespace) -> int:
    """One line per image: the file, its digit and the model's probability for it (tab-separated)."""
    paths = [Path(name) for name in args.images]
    digits = [read_digit(path, args.invert) for path in paths]  # every image is checked before any output
    trained = load_trained(args.model, "cpu")
    for path, digit in zip(paths, digits):
        if looks_inverted(digit):
            hint = "drop --invert" if args.invert else "pass --invert"
            print(
                f"ddp-mnist: warning: {path} looks like a dark digit on a light background; MNIST digits are "
                f"white on black: {hint}",
                file=sys.stderr,
            )
    for path, (label, probability) in zip(paths, predict(trained, torch.stack(digits))):
        print(f"{path}\t{label}\t{probability:.4f}", flush=True)
    return 0
