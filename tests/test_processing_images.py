"""The one image decoder (data, processor and serving decode through it) and the image transform."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from flamingo_vlm.data.images import decode_image as data_decode_image
from flamingo_vlm.data.images import open_image as data_open_image
from flamingo_vlm.data.samples import SkipSample
from flamingo_vlm.processing import ImageDecodeError, ImageTooLarge, ImageTransform, decode_image, load_image, open_image

from helpers import BLUE, RED, image


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height (what a decompression bomb looks like to Image.open)."""
    raw = bytearray(_encode(Image.new("RGB", (1, 1))))
    ihdr = bytearray(raw[12:29])  # b"IHDR" + 13 data bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(raw)


# ---- the decoder ------------------------------------------------------------------------------------
def test_decode_image_gives_rgb_from_greyscale_rgba_palette_and_jpeg():
    grey = Image.new("L", (6, 4), 90)
    rgba = Image.new("RGBA", (6, 4), (10, 20, 30, 0))  # fully transparent: the alpha is dropped, the colour kept
    palette = Image.new("RGB", (6, 4), RED).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = 0
    cases = {"grey": (grey, (90, 90, 90)), "rgba": (rgba, (10, 20, 30)), "palette": (palette, RED)}
    for name, (img, rgb) in cases.items():
        out = decode_image(_encode(img))
        assert out.mode == "RGB" and out.size == (6, 4), name
        assert out.getpixel((2, 2)) == rgb, name
    jpeg = decode_image(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    assert jpeg.mode == "RGB" and jpeg.getpixel((4, 4))[0] > 200  # CMYK red -> RGB red


def test_decode_image_refuses_bombs_from_the_header_alone():
    bomb = _bomb_png(12_000, 12_000)  # 144M pixels claimed by a file of a few bytes
    with pytest.raises(ImageTooLarge, match="12000x12000 = 144,000,000 pixels, over the limit of 10,000"):
        open_image(bomb, max_pixels=10_000)
    with pytest.raises(ImageTooLarge, match="12000x12000"):
        decode_image(bomb, max_pixels=10_000)
    with pytest.raises(ImageTooLarge, match="over the limit of 10,000 pixels"):  # past PIL's own guard too
        decode_image(_bomb_png(100_000, 100_000), max_pixels=10_000)
    with pytest.raises(ImageTooLarge, match="PIL's pixel limit"):  # no limit given: PIL's guard still holds
        decode_image(_bomb_png(100_000, 100_000))
    # an opened image is checked again before its pixels are decoded
    with pytest.raises(ImageTooLarge, match="200x200"):
        decode_image(open_image(_encode(image(RED, size=(200, 200)))), max_pixels=10_000)
    assert decode_image(_encode(image(RED, size=(100, 100))), max_pixels=10_000).size == (100, 100)
    assert issubclass(ImageTooLarge, ImageDecodeError) and issubclass(ImageDecodeError, ValueError)


def test_decode_image_refuses_non_images_truncated_files_and_other_formats():
    with pytest.raises(ImageDecodeError, match="not an image file PIL can read"):
        decode_image(b"hello world")
    with pytest.raises(ImageDecodeError, match="not a PNG/JPEG file"):
        decode_image(_encode(image(RED), "GIF"), formats=("PNG", "JPEG"))
    opened = open_image(_encode(image(RED, size=(64, 64)))[:60])  # the header parses, the pixels are cut off
    with pytest.raises(ImageDecodeError, match="cannot decode the image"):
        decode_image(opened)
    truncated_jpeg = _encode(image(RED, size=(64, 64)), "JPEG")[:200]
    with pytest.raises(ImageDecodeError, match="cannot decode the image"):
        decode_image(truncated_jpeg)
    with pytest.raises(TypeError, match="bytes or a PIL image"):
        decode_image("red.png")


def test_data_and_processor_decode_the_same_pixels():
    """Training data (counted skips) and the processor (ValueErrors) wrap the same decoder."""
    for img in (Image.new("L", (9, 7), 40), image(BLUE), Image.new("RGBA", (5, 5), (1, 2, 3, 4))):
        raw = _encode(img)
        ours = decode_image(raw)
        assert np.array_equal(np.asarray(data_decode_image(data_open_image(raw))), np.asarray(ours))
        assert np.array_equal(np.asarray(load_image(raw)), np.asarray(ours))
        assert torch.equal(ImageTransform(size=8)(raw), ImageTransform(size=8)(ours))
    with pytest.raises(SkipSample, match="corrupt_image"):
        data_open_image(b"not an image")
    with pytest.raises(SkipSample, match="corrupt_image"):
        data_decode_image(data_open_image(_encode(image(RED, size=(64, 64)))[:60]))
    with pytest.raises(SkipSample, match="corrupt_image"):  # a bomb no longer escapes as an uncaught error
        data_open_image(_bomb_png(100_000, 100_000))


# ---- ImageTransform -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(40, 36), (20, 70), (16, 16)])
def test_image_transform_shape(size):
    t = ImageTransform(size=24)
    x = t(image(RED, size=size))
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32


def test_image_transform_normalises_a_flat_colour():
    color = (255, 0, 128)
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.2, 0.1)
    x = ImageTransform(size=16, mean=mean, std=std)(Image.new("RGB", (30, 20), color))
    for c in range(3):
        expected = (color[c] / 255.0 - mean[c]) / std[c]
        torch.testing.assert_close(x[c], torch.full((16, 16), expected), atol=1e-5, rtol=0)
    # grayscale and RGBA inputs become 3 channels
    assert ImageTransform(size=8)(Image.new("L", (10, 10), 7)).shape == (3, 8, 8)
    assert ImageTransform(size=8)(Image.new("RGBA", (10, 10), (1, 2, 3, 4))).shape == (3, 8, 8)


def test_image_transform_centre_crops():
    """A wide image: the left and right margins are cropped away, the centre is kept."""
    img = Image.new("RGB", (30, 10), BLUE)
    for x in range(10, 20):
        for y in range(10):
            img.putpixel((x, y), RED)
    out = ImageTransform(size=10, mean=(0, 0, 0), std=(1, 1, 1))(img)
    torch.testing.assert_close(out[:, 5, 5], torch.tensor(RED) / 255.0, atol=1e-6, rtol=0)
    assert out[0].amin() > 0.5  # no blue margin left


def test_image_transform_save_load_round_trip(tmp_path):
    t = ImageTransform(size=48, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    t.save(tmp_path)
    loaded = ImageTransform.load(tmp_path)
    assert loaded == t
    assert isinstance(loaded.mean, tuple) and isinstance(loaded.std, tuple)
    assert torch.equal(loaded(image(RED)), t(image(RED)))


# ---- load_image -----------------------------------------------------------------------------------
def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_sources(tmp_path):
    img = image(RED, size=(12, 9))
    ref = np.asarray(img)
    assert load_image(img) is img  # already RGB: nothing to convert
    path = tmp_path / "a.png"
    img.save(path)
    for source in (path, str(path), _png_bytes(img), bytearray(_png_bytes(img)), ref.copy()):
        loaded = load_image(source)
        assert isinstance(loaded, Image.Image), type(source)
        assert np.array_equal(np.asarray(loaded.convert("RGB")), ref), type(source)
    gray = load_image(np.full((5, 6, 1), 9, dtype=np.uint8))
    assert gray.size == (6, 5) and gray.getpixel((0, 0)) == (9, 9, 9)  # one channel -> RGB
    # every source gives the same transformed tensor
    t = ImageTransform(size=8)
    assert torch.equal(t(path), t(img)) and torch.equal(t(_png_bytes(img)), t(ref))


def test_load_image_rejects_bad_arrays_and_types():
    with pytest.raises(ValueError, match="H x W x C uint8"):
        load_image(np.zeros((5, 5, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="H x W x C uint8"):
        load_image(np.zeros((5, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match="cannot read an image from a int"):
        load_image(3)


def test_corrupt_bytes_fail_to_decode():
    with pytest.raises(ValueError, match="failed to decode image bytes"):
        load_image(b"definitely not an image")
    truncated = _png_bytes(image(RED, size=(64, 64)))[:60]
    with pytest.raises(ValueError, match="failed to decode"):
        load_image(truncated)


def test_corrupt_file_fails_to_decode(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 garbage garbage")
    with pytest.raises(ValueError, match="failed to decode image file .*broken.jpg"):
        load_image(bad)
    with pytest.raises(ValueError, match="failed to decode"):
        ImageTransform(size=8)(str(bad))
    with pytest.raises(ImageDecodeError, match="failed to decode image file .*missing.png"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize(
    "mode,value,grey",
    [("I;16", 30000, round(30000 / 257)), ("I;16", 65535, 255), ("I", 1000, round(1000 / 257)), ("I", 200, 200),
     ("F", 0.5, 128), ("F", 1.0, 255), ("F", 100.0, 100)],
)
def test_high_depth_greyscale_is_scaled_not_clipped(mode, value, grey):
    """16-bit PNG scans and float TIFFs: convert("RGB") alone turns them white or black."""
    array = np.full((6, 5), value, dtype={"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
    image = Image.fromarray(array, mode=mode) if mode != "I;16" else Image.frombytes("I;16", (5, 6), array.tobytes())
    rgb = decode_image(image)
    assert rgb.mode == "RGB" and rgb.getpixel((2, 3)) == (grey, grey, grey)


def test_a_16_bit_png_file_decodes_to_its_grey(tmp_path):
    array = np.full((4, 4), 20000, dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "scan.png")
    rgb = decode_image((tmp_path / "scan.png").read_bytes())
    assert rgb.getpixel((0, 0)) == (round(20000 / 257),) * 3
