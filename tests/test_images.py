"""clipqwen.images: every kind of bad file is rejected with a message naming it; every odd but valid one loads.

Huge images are written as 1-bit PNGs streamed through zlib, so no test allocates their pixels.
"""

import copy
import io
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipqwen import images
from clipqwen.images import ImageLoadError, load_image
from processing_clipqwen import bound_aspect_ratio, to_rgb

from conftest import PHOTOS


def write_png(path, width, height):
    """A valid white 1-bit PNG of any size, without a pixel buffer (10000×10000 is ~40 kB)."""

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    row, compressor = b"\x00" + b"\xff" * ((width + 7) // 8), zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def saved(path, image, format=None, **params):
    image.save(path, format, **params)
    return path


def noisy_jpeg(path, size=64):
    rng = random.Random(0)  # noise keeps the scan data large, so cutting it really cuts pixels
    return saved(path, Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)), "JPEG", quality=95)


def truncated_jpeg(path):
    data = noisy_jpeg(path).read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    return path


def pcx_named_png(path):
    return saved(path, Image.new("RGB", (8, 8), "red"), "PCX")


def html_page(path):
    path.write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>")
    return path


def assert_rejected(source, *fragments, name=None):
    """load_image raises ImageLoadError whose message names the file (its path, or `name`) and has `fragments`."""
    with pytest.raises(ImageLoadError) as info:
        load_image(source, name=name)
    message, name = str(info.value), name or str(source)
    assert info.value.name == name and f"Cannot load image {name}: " in message
    for fragment in fragments:
        assert fragment in message
    return message


@pytest.fixture(scope="session")
def huge(tmp_path_factory):
    folder = tmp_path_factory.mktemp("huge")
    return {
        "10000x10000": write_png(folder / "10000x10000.png", 10_000, 10_000),  # 100 MP: Pillow warns
        "bomb": write_png(folder / "bomb.png", 20_000, 20_000),  # 400 MP: Pillow raises
    }


# --- files that must be rejected -------------------------------------------------------------------------


def test_truncated_jpeg_is_rejected_at_load_time(tmp_path):
    path = truncated_jpeg(tmp_path / "cut.jpg")
    assert Image.open(path).size == (64, 64)  # the header is intact: only decoding finds the damage
    assert_rejected(path, "truncated", "Re-download")


def test_zero_byte_file_is_rejected(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert_rejected(path, "empty (0 bytes)")


def test_random_bytes_are_rejected(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(random.Random(0).randbytes(4096))
    assert_rejected(path, "does not recognise it as an image")


def test_html_page_saved_as_jpg_is_rejected(tmp_path):
    path = html_page(tmp_path / "photo.jpg")
    assert_rejected(path, "HTML", "failed download")


@pytest.mark.parametrize("format", ["PCX", "ICO", "PPM"])
def test_format_outside_allow_list_is_rejected_whatever_the_extension(tmp_path, format):
    path = saved(tmp_path / "looks-fine.png", Image.new("RGB", (16, 16), "red"), format)
    assert Image.open(path).format == format  # Pillow itself would open it
    assert_rejected(path, f"its content is {format}", "Convert it to PNG or JPEG")


def test_missing_file_is_rejected(tmp_path):
    path = tmp_path / "gone.jpg"
    assert_rejected(path, "cannot be read (No such file or directory)", "Check the path")


@pytest.mark.parametrize(
    "head",
    [
        b'<svg xmlns="http://www.w3.org/2000/svg"/>',
        b'<?xml version="1.0"?>\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN">\n<svg/>',
    ],
    ids=["bare", "xml-declaration"],
)
def test_an_svg_is_called_an_svg_not_an_error_page(tmp_path, head):
    path = tmp_path / "logo.jpg"
    path.write_bytes(head)
    message = assert_rejected(path, "an SVG (a vector image), which is not supported", "Convert it to PNG or JPEG")
    assert "HTML" not in message and "failed download" not in message


def test_a_file_name_too_long_for_the_file_system_says_so(tmp_path):
    path = tmp_path / ("x" * 296 + ".jpg")  # 300 characters: over the 255 bytes a name may have on most file systems
    message = assert_rejected(path, "the file name is too long for the file system (300 characters")
    assert "truncated or corrupt" not in message


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_fifo_directory_or_device_named_jpg_is_not_a_regular_file(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "pipe.jpg"
        os.mkfifo(path)  # opening it would block until a writer comes: the check must not open it
        expected = "a FIFO (named pipe)"
    elif kind == "directory":
        path = tmp_path / "folder.jpg"
        path.mkdir()
        expected = "a directory"
    else:
        path, expected = Path("/dev/null"), "a device"
    message = assert_rejected(path, f"it is {expected}, not a regular file", "Give the path of an image file")
    assert "empty" not in message and "cannot be read" not in message


@pytest.mark.parametrize("target", ["/dev/zero", "/etc/hostname"], ids=["a device", "a text file"])
def test_a_link_named_jpg_says_where_it_leads(tmp_path, target):
    """The shared guard (load_image, hence load_or_reason): 'zero.jpg' is a device only as the link it is."""
    from clipqwen.data.cleaning import load_or_reason

    if not os.path.exists(target):
        pytest.skip(f"{target} is not on this machine")
    (tmp_path / "link.jpg").symlink_to(target)
    reason = load_or_reason({"path": str(tmp_path / "link.jpg"), "bytes": None}, "row 0")[1]
    assert f"(the name is a symbolic link to {os.path.realpath(target)})" in reason, reason


def test_a_path_through_a_file_cannot_be_read_and_is_not_called_corrupt(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"")
    message = assert_rejected(tmp_path / "photo.jpg" / "x.jpg", "cannot be read (Not a directory)", "Check the path")
    assert "corrupt" not in message


def test_image_over_the_cap_is_rejected_naming_the_cap(tmp_path, monkeypatch):
    path = saved(tmp_path / "big.png", Image.new("RGB", (20, 10)))
    monkeypatch.setattr(images, "MAX_PIXELS", 199)  # read at call time, so raising it is a one-liner
    assert_rejected(path, "20×10 = 200 pixels", "cap of 199", "raise clipqwen.images.MAX_PIXELS")
    monkeypatch.setattr(images, "MAX_PIXELS", 200)
    assert load_image(path).size == (20, 10)


def test_10000x10000_is_rejected_naming_the_cap(huge):
    path = huge["10000x10000"]
    # Pillow's bomb warning (over 89.5 MP) fires before our cap; either way the message names the cap.
    assert_rejected(path, "Downscale it", f"raise clipqwen.images.MAX_PIXELS (now {images.MAX_PIXELS:,}")


def test_pillow_bomb_warning_is_an_error_even_with_the_cap_raised(huge, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 10**9)  # only Pillow's warning (89.5 MP) stands in the way now
    path = huge["10000x10000"]
    assert_rejected(path, "decompression bomb", "PIL.Image.MAX_IMAGE_PIXELS")


def test_decompression_bomb_beyond_pillows_limit_is_rejected(huge):
    path = huge["bomb"]
    assert path.stat().st_size < 200_000  # a small file that would decode to 400 MP
    assert_rejected(path, "decompression bomb", "Downscale it")


def test_bytes_are_named_in_the_message():
    assert_rejected(b"", "empty", name="upload from alice")
    assert "<image bytes>" in str(pytest.raises(ImageLoadError, load_image, b"GIF89a").value)


# --- odd files that must load ------------------------------------------------------------------------------


def test_corrupt_exif_still_loads(tmp_path):
    data = saved(io.BytesIO(), Image.new("RGB", (16, 8), (200, 10, 10)), "JPEG").getvalue()
    payload = b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff" + b"\x00" * 10  # IFD claims 65535 entries
    path = tmp_path / "bad-exif.jpg"
    path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:])
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (16, 8)
    assert list(image.getpixel((8, 4))) == pytest.approx([200, 10, 10], abs=8)


def rgb_pixels(path):
    """The first row of load_image(path), flattened (pytest.approx does not look inside nested tuples)."""
    image = load_image(path)
    assert image.mode == "RGB"
    return [channel for x in range(image.width) for channel in image.getpixel((x, 0))]


def flat(pixels):
    return [channel for pixel in pixels for channel in pixel]


def one_row(mode, values):
    image = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    return image


@pytest.mark.parametrize(
    ("mode", "format", "values", "expected"),
    [
        ("L", "PNG", [0, 100], [(0, 0, 0), (100, 100, 100)]),
        ("LA", "PNG", [(0, 0), (100, 255)], [(255, 255, 255), (100, 100, 100)]),  # transparent → white
        ("RGBA", "PNG", [(0, 0, 0, 0), (255, 0, 0, 255)], [(255, 255, 255), (255, 0, 0)]),
        ("CMYK", "JPEG", [(0, 255, 255, 0), (0, 255, 255, 0)], [(255, 0, 0), (255, 0, 0)]),
        ("I;16", "PNG", [32768, 65535], [(128, 128, 128), (255, 255, 255)]),  # mid-grey stays grey, not white
        ("I", "TIFF", [0, 65535], [(0, 0, 0), (255, 255, 255)]),
        ("F", "TIFF", [0.0, 0.5], [(0, 0, 0), (128, 128, 128)]),
        ("1", "PNG", [0, 1], [(0, 0, 0), (255, 255, 255)]),
    ],
    ids=["L", "LA", "RGBA", "CMYK", "I;16", "I", "F", "1"],
)
def test_mode_loads_as_rgb(tmp_path, mode, format, values, expected):
    path = saved(tmp_path / f"image.{format.lower()}", one_row(mode, values), format)
    assert Image.open(path).mode == mode  # the file really holds this mode
    assert rgb_pixels(path) == pytest.approx(flat(expected), abs=3)


def test_palette_with_transparency_loads_on_white(tmp_path):
    image = one_row("P", [0, 1])
    image.putpalette([0, 0, 0, 255, 0, 0])
    path = saved(tmp_path / "palette.png", image, transparency=0)
    assert Image.open(path).mode == "P"
    assert rgb_pixels(path) == flat([(255, 255, 255), (255, 0, 0)])


def test_dark_16bit_png_stays_dark(tmp_path):
    # 0 and 200 out of 65535 are black; to_rgb scales 16-bit pixels only when one is over 255, so shows 200/255.
    path = saved(tmp_path / "dark16.png", one_row("I;16", [0, 200]), "PNG")
    assert Image.open(path).mode == "I;16"
    assert rgb_pixels(path) == pytest.approx(flat([(0, 0, 0), (1, 1, 1)]), abs=1)


def test_rgb_png_with_transparent_colour_key_loads_on_white(tmp_path):
    # PNG tRNS on a truecolour image: pixels of that colour are transparent, like a palette's transparent index.
    path = saved(tmp_path / "keyed.png", one_row("RGB", [(0, 0, 0), (255, 0, 0)]), "PNG", transparency=(0, 0, 0))
    assert Image.open(path).info["transparency"] == (0, 0, 0)
    assert rgb_pixels(path) == flat([(255, 255, 255), (255, 0, 0)])


@pytest.mark.parametrize("size", [(1, 1), (1, 10_000), (10_000, 1)], ids=["1x1", "1x10000", "10000x1"])
def test_degenerate_size_loads(tmp_path, size):
    path = saved(tmp_path / "thin.png", Image.new("L", size, 50))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == size


@pytest.mark.parametrize("format", ["JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_allowed_format_loads_whatever_the_extension(tmp_path, format):
    frames = [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")]
    animated = {"save_all": True, "append_images": frames[1:]} if format in Image.SAVE_ALL else {}
    path = saved(tmp_path / "image.dat", frames[0], format, **animated)
    assert Image.open(path).format == format
    image = load_image(path)
    assert image.mode == "RGB" and list(image.getpixel((4, 4))) == pytest.approx([255, 0, 0], abs=6)  # first frame


def test_load_image_accepts_bytes_and_datasets_entries(tmp_path):
    path = saved(tmp_path / "red.png", Image.new("RGB", (4, 4), "red"))
    for source in (
        path,
        str(path),
        path.read_bytes(),
        {"path": str(path), "bytes": None},
        {"path": "elsewhere.png", "bytes": path.read_bytes()},
    ):
        assert load_image(source).getpixel((0, 0)) == (255, 0, 0)


def test_load_image_accepts_pil_images_and_checks_them_like_files(tmp_path, monkeypatch):
    path = saved(tmp_path / "photo.jpg", Image.new("RGB", (40, 30), (0, 0, 255)), "JPEG")
    lazy = Image.open(path)  # opened, not decoded: load_image decodes it
    image = load_image(lazy)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert list(image.getpixel((5, 5))) == pytest.approx([0, 0, 255], abs=4)
    made = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # in memory (no format): converted once, transparent → white
    assert load_image(made).getpixel((0, 0)) == (255, 255, 255)
    cut = truncated_jpeg(tmp_path / "cut.jpg")
    assert_rejected(Image.open(cut), "truncated or corrupt", name=str(cut))
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    assert_rejected(Image.new("RGB", (20, 20)), "400 pixels, over the cap of 100", name="<PIL image>")


def test_an_upright_rgb_image_is_not_converted_again_and_a_rotated_one_is_turned(tmp_path):
    upright = Image.new("RGB", (6, 4), "green")
    assert load_image(upright) is upright  # nothing to convert: no copy
    assert load_image(load_image(saved(tmp_path / "up.png", upright))).size == (6, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    rotated = saved(tmp_path / "phone.jpg", Image.new("RGB", (6, 4), "green"), "JPEG", exif=exif)
    assert load_image(rotated).size == (4, 6) and load_image(load_image(rotated)).size == (4, 6)  # turned once


def test_an_image_is_converted_once_from_file_to_pixel_values(tmp_path, monkeypatch, processor):
    palette_file = saved(tmp_path / "palette.png", Image.new("RGB", (40, 30), "red").convert("P"))
    conversions = []
    convert = Image.Image.convert
    monkeypatch.setattr(
        Image.Image, "convert", lambda image, *a, **k: conversions.append(image.mode) or convert(image, *a, **k)
    )
    photo = load_image(sorted(PHOTOS.glob("*.jpg"))[0])  # an RGB JPEG: nothing to convert at all
    palette = load_image(palette_file)
    assert conversions == ["P"] and photo.mode == palette.mode == "RGB"
    processor(images=[photo, palette])  # the one path to pixel values (CLI, demo, pipeline, training) converts nothing
    assert conversions == ["P"]


def test_a_file_opened_in_text_mode_or_a_wrong_type_says_what_to_pass(tmp_path):
    path = saved(tmp_path / "red.png", Image.new("RGB", (4, 4), "red"))
    with open(path, encoding="latin-1") as file:
        assert_rejected(file, "opened in text mode", 'open(path, "rb")', name=str(path))
    assert_rejected(12, "int is not an image source", "Pass a path, the file's bytes", name="<int>")


# --- pixel values: the processor's CLIP recipe, faster ------------------------------------------------------------
def parity_images():
    """The real photos and Flickr30K-like sizes (odd, portrait, square, smaller than the crop, long strips), in the
    modes to_rgb handles."""
    rng = np.random.default_rng(0)
    photos = [load_image(path) for path in sorted(PHOTOS.glob("*.jpg"))]
    sizes = [
        (500, 375),
        (375, 500),
        (333, 500),
        (500, 281),
        (225, 300),
        (224, 224),
        (100, 50),
        (8, 8),
        (231, 999),
        (1001, 223),
        (12, 600),
    ]
    made = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    modes = [made[0].convert("L"), made[1].convert("RGBA"), made[2].convert("P")]
    return photos + made + modes


def pixel_values(images: list, processor) -> torch.Tensor:
    """The processor's pixel values: the one path (CLI, demo, pipeline, training from pixels, the feature cache)."""
    return processor(images=images)["pixel_values"]


def image_processors_own(images: list, processor) -> torch.Tensor:
    """The image processor's own call on the same RGB, aspect-bounded images: the reference CLIP's recipe keeps to."""
    images = [bound_aspect_ratio(to_rgb(image)) if isinstance(image, Image.Image) else image for image in images]
    return processor.image_processor(images, return_tensors="pt", do_convert_rgb=False)["pixel_values"]


def test_pixel_values_match_the_image_processor_within_one_level_of_255(processor):
    batch = parity_images()
    ours, theirs = pixel_values(batch, processor), image_processors_own(batch, processor)
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape == (len(batch), 3, 224, 224)
    step = 1 / 255 / min(processor.image_processor.image_std)  # one level of an 8-bit pixel, normalised
    difference = (ours - theirs).abs()
    # torch's resize rounds its filter sums other than PIL's fixed point: one level at most, except an 8×8 image of
    # random noise blown up 28 times (two levels on one value in 75,000)
    tiny_noise = [index for index, image in enumerate(batch) if min(image.size) < 16]
    others = [index for index in range(len(batch)) if index not in tiny_noise]
    assert difference[others].max() <= step * 1.0001
    assert difference[tiny_noise].max() <= 2 * step * 1.0001
    assert (difference > 0).float().mean() < 1e-2  # measured 0.3-0.9 % of the values, each off by one level


@pytest.mark.parametrize("resample", [Image.Resampling.BILINEAR, Image.Resampling.LANCZOS])
def test_pixel_values_follow_the_processors_resampling_filter(processor, resample):
    """Bilinear is torch's resize like bicubic; a filter torch does not have (Lanczos) is PIL's, on the crop's box."""
    other = copy.deepcopy(processor)
    other.image_processor.resample = resample
    batch = [image for image in parity_images() if min(image.size) >= 16]
    step = 1 / 255 / min(processor.image_processor.image_std)
    assert (pixel_values(batch, other) - image_processors_own(batch, other)).abs().max() <= step * 1.0001


def test_pixel_values_normalise_exactly_as_the_processor_does(processor):
    fast = processor.clip_pixels
    levels = np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(16, 16, 3)  # every 8-bit value in every channel
    expected = processor.image_processor(levels, do_resize=False, do_center_crop=False, return_tensors="pt")
    crops = torch.from_numpy(levels).permute(2, 0, 1)[None].contiguous()
    assert torch.equal(fast.normalise(crops), expected["pixel_values"])
    if torch.cuda.is_available():  # where the feature cache normalises when the vision tower is on a GPU
        assert torch.equal(fast.normalise(crops.cuda()).cpu(), expected["pixel_values"])


def test_pixel_values_use_the_processor_itself_for_other_recipes(processor):
    other = copy.deepcopy(processor)
    other.image_processor.size = {"height": 224, "width": 224}  # squashed, not CLIP's recipe: no guessing
    assert other.clip_pixels is None and processor.clip_pixels is not None
    batch = parity_images()[:3]
    assert torch.equal(pixel_values(batch, other), image_processors_own(batch, other))
    arrays = [np.asarray(image) for image in batch]  # not PIL images: the image processor's own call too
    assert torch.equal(pixel_values(arrays, processor), image_processors_own(arrays, processor))
    assert torch.equal(pixel_values(batch, processor), processor.clip_pixels(batch))  # PIL images: CLIP's recipe


def test_clips_recipe_runs_whichever_image_processor_backend_is_installed(processor):
    """The PIL backend here; with torchvision installed, CLIPImageProcessor is the torchvision one: the same settings,
    so the same recipe and the same pixel values, not a slower path chosen by what else happens to import."""
    other = copy.deepcopy(processor)
    pil_class = type(other.image_processor)
    other.image_processor.__class__ = type("AsTorchvision", (pil_class,), {"backend": "torchvision"})
    batch = parity_images()[:3]
    assert other.clip_pixels is not None and torch.equal(pixel_values(batch, other), pixel_values(batch, processor))


# --- pre-flight scan ---------------------------------------------------------------------------------------


def refusals(entries) -> list[tuple[str, str]]:
    """(name, reason) for each entry load_image refuses, in order."""
    found = []
    for entry in entries:
        try:
            load_image(entry)
        except ImageLoadError as error:
            found.append((error.name, error.reason))
    return found


def test_load_image_refuses_exactly_the_bad_files(tmp_path):
    good = [saved(tmp_path / "a.jpg", Image.new("RGB", (8, 8))), saved(tmp_path / "b.png", Image.new("LA", (8, 8)))]
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "noise.jpg").write_bytes(random.Random(1).randbytes(1000))
    bad = {
        "cut.jpg": "truncated",
        "empty.jpg": "empty",
        "page.jpg": "HTML",
        "noise.jpg": "does not recognise",
        "logo.png": "content is PCX",
    }
    truncated_jpeg(tmp_path / "cut.jpg")
    html_page(tmp_path / "page.jpg")
    pcx_named_png(tmp_path / "logo.png")
    paths = sorted(tmp_path.iterdir())
    assert len(paths) == len(bad) + len(good)

    found = refusals(paths)
    assert [name for name, _ in found] == [str(path) for path in paths if path.name in bad]
    for name, reason in found:
        assert bad[Path(name).name] in reason


def test_load_image_on_datasets_entries(tmp_path):
    import datasets

    good, cut = saved(tmp_path / "good.png", Image.new("RGB", (8, 8))), truncated_jpeg(tmp_path / "cut.jpg")
    rows = [
        {"path": str(good), "bytes": None},
        {"path": str(cut), "bytes": None},
        {"path": "page.jpg", "bytes": html_page(tmp_path / "page.jpg").read_bytes()},
        {"path": None, "bytes": b""},
        {"path": None, "bytes": good.read_bytes()},
    ]
    column = datasets.Dataset.from_list([{"image": row} for row in rows]).cast_column(
        "image", datasets.Image(decode=False)
    )["image"]

    found = refusals(column)
    assert [name for name, _ in found] == [str(cut), "page.jpg", "<image bytes>"]
    assert ["truncated" in found[0][1], "HTML" in found[1][1], "empty" in found[2][1]] == [True] * 3
