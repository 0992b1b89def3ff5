"""Safe loading of untrusted image files: training data, the caption CLI and the demo.

`load_image` either returns an 8-bit RGB image that is fully decoded, or raises `ImageLoadError`, whose
message names the file, says what is wrong and what to do. Decoding happens here, inside the checks, so a
truncated or corrupt file fails before training starts, not in a dataloader worker mid-epoch.
`find_unreadable_images` runs the same checks over a whole dataset up front.
"""

import io
import os
import warnings

from PIL import Image, UnidentifiedImageError

from processing_clipqwen import to_rgb

# Checked against the format Pillow detects from the file's content; the extension is not trusted. Pillow can
# open ~40 more formats (EPS runs Ghostscript, PSD, ICO, PCX, ...) whose decoders we have no reason to expose
# to untrusted files. MPO is how Pillow reports the JPEGs many cameras and phones write (JPEG + extra frames).
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})

# Images over this many pixels are rejected, not downscaled (only JPEG could be downscaled while decoding).
# 64 MP = 8000×8000: above every common camera (61 MP full frame, 50 MP phone modes), and the model sees 224×224
# anyway; MAX_DECODE_BYTES below bounds the memory a decode takes. It is kept below Pillow's
# decompression-bomb warning (PIL.Image.MAX_IMAGE_PIXELS, 89,478,485) so this check is the one that applies.
# Read at call time: set `clipqwen.images.MAX_PIXELS = ...` to raise it.
MAX_PIXELS = 64_000_000

# Memory one image may take while `load_image` decodes it and converts it to 8-bit RGB, checked from the header
# before decoding: pixels × LOAD_BYTES_PER_PIXEL[mode]. The pixel count alone misses what the mode costs: a 121 kB
# 16-bit PNG of 8000×7999 pixels is under MAX_PIXELS and takes 1.8 GB. 768 MB is what the largest photo
# MAX_PIXELS admits (64 MP of 8-bit RGB) takes, so no ordinary photo is refused; modes that cost more per pixel get
# fewer pixels. Read at call time, like MAX_PIXELS.
MAX_DECODE_BYTES = 768_000_000

# Peak bytes per pixel through Pillow's decoder and `processing_clipqwen.to_rgb`, measured (ru_maxrss, 4000×4000
# images, Pillow 12.3) and rounded up: Pillow keeps 3- and 4-band pixels in 4 bytes; to_rgb copies the image
# (exif_transpose, convert), composites transparent ones on white through RGBA, and turns 16-bit and float pixels
# into float64 arrays. Images with a transparent colour key ("transparency") go through RGBA; unknown modes count
# as the worst.
LOAD_BYTES_PER_PIXEL = {"1": 6, "L": 6, "P": 9, "RGB": 12, "RGBX": 12, "CMYK": 12, "YCbCr": 12, "LAB": 12, "HSV": 12,
                        "RGBA": 32, "RGBa": 32, "LA": 32, "La": 32, "PA": 32,
                        "I;16": 28, "I;16B": 28, "I;16L": 28, "I;16N": 28, "I": 32, "F": 32}

_REDO = "Re-download or re-export it, or leave it out of the data."


class ImageLoadError(ValueError):
    """An image file that cannot be used. `name` is the file, `reason` what is wrong with it."""

    def __init__(self, name: str, reason: str, advice: str = _REDO):
        self.name, self.reason = name, reason
        super().__init__(f"Cannot load image {name}: {reason}. {advice}")


def load_image(source, name: str | None = None) -> Image.Image:
    """Open, check and fully decode one image; return it as 8-bit RGB (see `processing_clipqwen.to_rgb`).

    `source` is a path, the file's bytes, a binary file object (read whole), or a `datasets` `Image(decode=False)`
    entry ({"path", "bytes"}). `name` is what error messages call it (default: the path, or the file object's name).
    Raises `ImageLoadError`.
    """
    return _load(source, name, decode=True)


def find_unreadable_images(entries, full_decode: bool = True) -> list[tuple[str, str]]:
    """(name, reason) for every entry `load_image` would reject, in input order, to skip and log before training.

    `entries`: paths, bytes, or `datasets` `Image(decode=False)` entries ({"path", "bytes"}), e.g.
    `dataset.cast_column("image", Image(decode=False))["image"]`. Paths are named as given, dict entries by
    their "path", anything else "item <index>". `full_decode=False` only reads headers (empty, not an image,
    wrong format, too large): much faster, but it misses truncated and corrupt pixel data.
    """
    bad = []
    for index, entry in enumerate(entries):
        try:
            _load(entry, f"item {index}" if _path_of(entry) is None else None, decode=full_decode)
        except ImageLoadError as error:
            bad.append((error.name, error.reason))
    return bad


def _path_of(source):
    if isinstance(source, dict):
        return source.get("path")
    return None if isinstance(source, (bytes, bytearray, memoryview)) or hasattr(source, "read") else source


def _load(source, name, decode):
    path = _path_of(source)
    if hasattr(source, "read"):  # an open file (an upload, a stream): its bytes, named after it if it has a name
        file_name = getattr(source, "name", None)
        name = name or (os.fspath(file_name) if isinstance(file_name, (str, os.PathLike)) else "<image file>")
        data = source.read()
    elif isinstance(source, dict):
        data = source.get("bytes")  # datasets keeps "path" as well; when "bytes" is set, it is the content
    else:
        data = None if path is not None else source
    name = name or (os.fspath(path) if path is not None else "<image bytes>")
    try:
        if data is None and path is None:
            raise ImageLoadError(name, "the entry has neither a path nor bytes", "Fix the dataset entry.")
        if (len(data) if data is not None else os.path.getsize(path)) == 0:
            raise ImageLoadError(name, "the file is empty (0 bytes)")
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; make it an error like the rest. (catch_warnings
        # is not thread-safe, but a lost filter changes nothing while MAX_PIXELS is below Pillow's limit.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if data is not None else path) as image:  # reads the header only
                _check_header(image, name)
                if not decode:
                    return None
                # Decode every pixel now: truncation and corrupt data raise here (unless something has set
                # PIL.ImageFile.LOAD_TRUNCATED_IMAGES, which makes Pillow pad truncated files with grey).
                image.load()
                return to_rgb(image)  # a new image, independent of the file closed on leaving `with`
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        reason = f"Pillow flags it as a decompression bomb ({str(error).rstrip('.')})"
        raise ImageLoadError(name, reason, _too_large_advice()) from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(name, _not_an_image(data, path)) from error
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        raise ImageLoadError(name, f"the file cannot be read ({error.strerror})", "Check the path.") from error
    except Exception as error:  # noqa: BLE001 - untrusted input: any decoder failure means "unusable file"
        raise ImageLoadError(name, f"it is truncated or corrupt ({type(error).__name__}: {error})") from error


def _check_header(image, name):
    if image.format not in ALLOWED_FORMATS:
        raise ImageLoadError(
            name,
            f"its content is {image.format} (whatever its name says), not one of {', '.join(sorted(ALLOWED_FORMATS))}",
            "Convert it to PNG or JPEG.",
        )
    width, height = image.size
    if width * height > MAX_PIXELS:
        reason = f"it is {width}×{height} = {width * height:,} pixels, over the cap of {MAX_PIXELS:,}"
        raise ImageLoadError(name, reason, _too_large_advice())
    per_pixel = LOAD_BYTES_PER_PIXEL.get(image.mode, max(LOAD_BYTES_PER_PIXEL.values()))
    if "transparency" in image.info:
        per_pixel = max(per_pixel, LOAD_BYTES_PER_PIXEL["RGBA"])
    if width * height * per_pixel > MAX_DECODE_BYTES:
        reason = (f"decoding it takes about {width * height * per_pixel / 1e6:,.0f} MB ({width}×{height} pixels × "
                  f"{per_pixel} bytes for mode {image.mode}), over the budget of {MAX_DECODE_BYTES / 1e6:,.0f} MB")
        raise ImageLoadError(name, reason, _too_large_advice())


def _too_large_advice():
    return (
        f"Downscale it, or if you trust the file raise clipqwen.images.MAX_PIXELS (now {MAX_PIXELS:,}; above "
        f"{Image.MAX_IMAGE_PIXELS:,} also raise PIL.Image.MAX_IMAGE_PIXELS) or clipqwen.images.MAX_DECODE_BYTES "
        f"(now {MAX_DECODE_BYTES:,})."
    )


def _not_an_image(data, path):
    if data is None:
        with open(path, "rb") as file:
            data = file.read(512)
    head = bytes(data[:512]).lstrip(b"\xef\xbb\xbf \t\r\n")  # a UTF-8 byte-order mark, whitespace
    if head.startswith(b"<"):  # a web page or error page saved under an image name: a failed download
        return "it is HTML/XML text, not an image (often an error page from a failed download)"
    return "Pillow does not recognise it as an image (unknown format or random bytes)"
