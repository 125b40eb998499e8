"""predict takes any image a user has, or refuses it in one line (issue "Nothing of the user's lost", rule 8):
memory bounded by the header's size, animations, transparency, 16 bits, file names with control characters.
No process is started: `read_digit` is what `ddp-mnist predict` reads each file with."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from ddp_mnist.commands.predict import MAX_PIXELS, printable, read_digit
from ddp_mnist.errors import DataError


@pytest.fixture
def digit() -> np.ndarray:
    """A 28x28 white-on-black stroke with soft edges, like an MNIST digit."""
    y, x = np.mgrid[0:28, 0:28]
    ring = np.abs(np.hypot(y - 14, x - 14) - 8)
    return np.clip(255 - ring * 120, 0, 255).astype(np.uint8)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with almost no data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_a_huge_image_is_refused_from_its_header(tmp_path):
    """The reported case: an 874 KB PNG of 30000x30000 pixels took 5 GB of memory."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(9_000, 9_000))
    with pytest.raises(DataError, match=r"is 9,000 x 9,000 pixels, more than the 40,000,000 read"):
        read_digit(path)
    path.write_bytes(png_claiming(30_000, 30_000))  # Pillow's own check refuses it first: the same one line
    with pytest.raises(DataError, match=r"claims more than 40,000,000 pixels; crop or shrink it"):
        read_digit(path)
    assert 6_000 * 6_000 <= MAX_PIXELS  # a 36-megapixel photo of a digit is still read


def test_an_animated_gif_gives_its_first_frame(tmp_path, digit):
    """The reported case: an animated GIF raised a traceback."""
    path = tmp_path / "digit.gif"
    frames = [Image.fromarray(digit), Image.fromarray(255 - digit)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert torch.equal(read_digit(path), torch.from_numpy(digit))


@pytest.mark.parametrize("ink", [(0, 0, 0), (200, 30, 30)], ids=["black-ink", "red-ink"])
def test_ink_on_a_transparent_canvas_is_the_digit(tmp_path, digit, ink):
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., :3] = ink
    rgba[..., 3] = digit  # opaque where the ink is
    path = tmp_path / "drawn.png"
    Image.fromarray(rgba, "RGBA").save(path)
    assert torch.equal(read_digit(path), torch.from_numpy(digit))


def test_an_opaque_rgba_image_reads_as_its_colours(tmp_path, digit):
    rgba = np.dstack([digit, digit, digit, np.full_like(digit, 255)])
    path = tmp_path / "opaque.png"
    Image.fromarray(rgba, "RGBA").save(path)
    assert torch.equal(read_digit(path), torch.from_numpy(digit))


def test_a_16_bit_image_is_scaled_to_8_bits(tmp_path, digit):
    path = tmp_path / "deep.png"
    Image.fromarray(digit.astype(np.uint16) * 257).save(path)  # 0..65535
    assert Image.open(path).mode.startswith("I")
    assert torch.equal(read_digit(path), torch.from_numpy(digit))


@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40], ids=str)
def test_a_file_that_is_not_an_image_is_one_line(tmp_path, content):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"image .*x\.png cannot be decoded"):
        read_digit(path)


def test_file_names_with_control_characters_print_on_one_line(tmp_path, digit):
    path = tmp_path / "two\nlines\t\x1b[31m.png"
    Image.fromarray(digit).save(path, format="PNG")
    shown = printable(path)
    assert "\n" not in shown and "\t" not in shown and "\x1b" not in shown
    assert shown.endswith("two\\nlines\\t\\x1b[31m.png")
    assert printable(tmp_path / "chiffre-é.png").endswith("chiffre-é.png")  # printable characters stay
    assert torch.equal(read_digit(path), torch.from_numpy(digit))
    with pytest.raises(DataError) as error:
        read_digit(tmp_path / "gone\n.png")
    assert "\n" not in str(error.value)
