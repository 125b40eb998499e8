"""`ddp-mnist predict MODEL IMAGE...`: the digit in each image, seen the way the model was trained to see it.

MNIST digits are white on a black background, 28x28 grayscale. Each image (any format Pillow reads; its size
checked before it is decoded) is read as grayscale, inverted with `--invert` (for a dark digit on a light background),
padded with black to a square (so the digit keeps its shape) and resized to 28x28, then scaled as the
model's training scaled its inputs (its config's `normalize`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from ddp_mnist.artifacts.trained import TrainedModel, load_trained
from ddp_mnist.commands.arguments import examples
from ddp_mnist.errors import DataError
from ddp_mnist.model import INPUT_SHAPE

MAX_PIXELS = 40_000_000
"""The largest image read (e.g. 6,000 x 6,000, a 40-megapixel photo): checked in the header, before decoding,
so that a small file claiming 30,000 x 30,000 pixels never costs gigabytes."""


def read_digit(path: Path, invert: bool = False) -> torch.Tensor:
    """An image file as an MNIST-like uint8 [28, 28] tensor: grayscale, white digit on black. Any image Pillow
    reads (PNG, JPEG, GIF, BMP, TIFF, WebP, ...); an animation gives its first frame; 16-bit images are scaled
    to 8 bits; in an image with transparency, the opaque parts are the ink (a digit drawn on a transparent
    canvas, in any colour)."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    from torchvision.transforms.v2.functional import resize  # ~1 s to import: only predict needs it

    shown = printable(path)
    if not path.is_file():
        raise DataError(f"image {shown} does not exist (or is not a file)")
    try:
        with Image.open(path) as image:  # reads the header only
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise DataError(
                    f"image {shown} is {width:,} x {height:,} pixels, more than the {MAX_PIXELS:,} read; "
                    f"crop or shrink it around the digit first"
                )
            image.seek(0)  # an animation: its first frame
            gray = _grayscale(ImageOps.exif_transpose(image))  # a phone photo is stored sideways and tagged so
    except UnidentifiedImageError:
        raise DataError(f"image {shown} cannot be decoded: it is not an image file, or it is damaged") from None
    except Image.DecompressionBombError:  # Pillow's own header check, for far larger claims than MAX_PIXELS
        raise DataError(
            f"image {shown} claims more than {MAX_PIXELS:,} pixels; crop or shrink it around the digit first"
        ) from None
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        raise DataError(f"image {shown} cannot be decoded ({e})") from None
    if invert:
        gray = 255 - gray
    height, width = gray.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    padded = torch.nn.functional.pad(gray[None], (left, side - width - left, top, side - height - top))  # black
    return resize(padded, list(INPUT_SHAPE[1:]), antialias=True)[0]  # what the networks take: 28x28


def _grayscale(image) -> torch.Tensor:  # a PIL.Image.Image
    """uint8 [H, W]: luminance; for an image with transparency, its opacity (the ink); 16 bits scaled to 8."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        alpha = np.asarray(image.getchannel("A"), dtype=np.uint8)
        if alpha.min() < alpha.max():  # real transparency: the ink is what is opaque
            return torch.from_numpy(alpha.copy())
        image = image.convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":  # 16- or 32-bit integer, or float, grayscale
        values = np.asarray(image, dtype=np.float64)
        peak = 255.0 if values.max() <= 255 else 65535.0
        return torch.from_numpy(np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8))
    return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.uint8).copy())


def printable(path: Path) -> str:
    """A file name as one line: control characters (a newline, a tab, an escape) written as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(path))


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
        help="image files (PNG, JPEG, GIF, BMP, TIFF, WebP, ...) of one digit each, white on a black background "
        "like MNIST (any size up to 40 megapixels: padded to a square and resized to 28x28)",
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
                f"ddp-mnist: warning: {printable(path)} looks like a dark digit on a light background; MNIST digits "
                f"are white on black: {hint}",
                file=sys.stderr,
            )
    for path, (label, probability) in zip(paths, predict(trained, torch.stack(digits))):
        print(f"{printable(path)}\t{label}\t{probability:.4f}", flush=True)
    return 0
