"""Safe loading of untrusted image files: training data, the caption CLI and the demo.

`load_image` returns a fully decoded 8-bit RGB image or raises `ImageLoadError`, whose message names
the file, what is wrong and what to do; decoding inside the checks makes a corrupt file fail before
training, not mid-epoch. Every caller decodes and converts an image once, here; the processor then
makes the image tower's inputs from it without converting again.
"""

import errno
import io
import os
import re
import stat
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from processing_clipqwen import to_rgb


# Checked against the format Pillow detects from the content, not the extension: Pillow opens ~40
# more (EPS runs Ghostscript) that untrusted files need not reach. MPO: many cameras' JPEGs.
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})

# Larger images are refused, not downscaled: 64 MP (8000×8000) is above every common camera, and
# below Pillow's bomb warning (89,478,485) so that this check is the one that applies.
# Read at call time: set `clipqwen.images.MAX_PIXELS = ...` to raise it.
MAX_PIXELS = 64_000_000

# Memory one decode to 8-bit RGB may take: pixels × LOAD_BYTES_PER_PIXEL[mode], checked from the
# header, since pixels alone miss costly modes (16-bit PNGs, docs/reliability.md). 768 MB is the
# largest RGB photo MAX_PIXELS admits, so no ordinary photo is refused. Read at call time.
MAX_DECODE_BYTES = 768_000_000

# Peak bytes per pixel through Pillow's decoder and `to_rgb`, measured and rounded up (see
# docs/reliability.md): 3-4 bands take 4 bytes, transparency goes through RGBA, 16-bit and float
# through float64. A transparent colour key counts as RGBA; unknown modes as the worst.
LOAD_BYTES_PER_PIXEL = {
    "1": 6,
    "L": 6,
    "P": 9,
    "RGB": 12,
    "RGBX": 12,
    "CMYK": 12,
    "YCbCr": 12,
    "LAB": 12,
    "HSV": 12,
    "RGBA": 32,
    "RGBa": 32,
    "LA": 32,
    "La": 32,
    "PA": 32,
    "I;16": 28,
    "I;16B": 28,
    "I;16L": 28,
    "I;16N": 28,
    "I": 32,
    "F": 32,
}

_REDO = "Re-download or re-export it, or leave it out of the data."


class ImageLoadError(ValueError):
    """An image file that cannot be used. `name` is the file, `reason` what is wrong with it."""

    def __init__(self, name: str, reason: str, advice: str = _REDO):
        self.name, self.reason, self.advice = name, reason, advice
        super().__init__(f"Cannot load image {name}: {reason}. {advice}")


def load_image(source, name: str | None = None) -> Image.Image:
    """Open, check and fully decode one image; return it as 8-bit RGB or raise `ImageLoadError`.

    `source`: a path, bytes, a binary file object, a `datasets` `Image(decode=False)` entry or a PIL
    image (same checks). `name` names it in errors (default: its path). Upright RGB is not copied.
    """
    return _load(source, name)


def _path_of(source):
    if isinstance(source, dict):
        return source.get("path")
    if isinstance(source, (bytes, bytearray, memoryview, Image.Image)) or hasattr(source, "read"):
        return None
    return source


def _load(source, name):
    if isinstance(source, Image.Image):
        return _load_pil(source, name or getattr(source, "filename", None) or "<PIL image>")
    path = _path_of(source)
    if hasattr(source, "read"):  # an open file (an upload, a stream): its bytes, named after it if it has a name
        file_name = getattr(source, "name", None)
        name = name or (os.fspath(file_name) if isinstance(file_name, (str, os.PathLike)) else "<image file>")
        data = source.read()
        if isinstance(data, str):
            raise ImageLoadError(
                name,
                "the file was opened in text mode, so it reads as text, not bytes",
                'Open it in binary mode: open(path, "rb").',
            )
    elif path is not None and not isinstance(path, (str, os.PathLike)):
        raise ImageLoadError(
            name or f"<{type(source).__name__}>",
            f"a {type(path).__name__} is not an image source",
            "Pass a path, the file's bytes, a binary file object or a PIL image.",
        )
    elif isinstance(source, dict):
        data = source.get("bytes")  # datasets keeps "path" as well; when "bytes" is set, it is the content
    else:
        data = None if path is not None else source
    name = name or (os.fspath(path) if path is not None else "<image bytes>")
    try:
        if data is None and path is None:
            raise ImageLoadError(name, "the entry has neither a path nor bytes", "Fix the dataset entry.")
        if (len(data) if data is not None else regular_file_size(path, name)) == 0:
            raise ImageLoadError(name, "the file is empty (0 bytes)")
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that: an error here. (Not
        # thread-safe, but a lost filter changes nothing while MAX_PIXELS is below Pillow's limit.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if data is not None else path) as image:  # reads the header only
                _check_header(image, name)
                # Decode now: corrupt data raise here (unless LOAD_TRUNCATED_IMAGES pads with grey).
                image.load()
                # Copy a memory-mapped file's pixels: a later write to it would change them.
                rgb = to_rgb(image)
                return rgb.copy() if rgb is image and getattr(image, "map", None) is not None else rgb
    except ImageLoadError as error:
        raise _through_link(error, path if data is None else None) from None
    except Exception as error:  # noqa: BLE001 - the same reasons as for a PIL image given directly
        raise _through_link(_load_error(error, name, data, path), path if data is None else None) from error


def _through_link(error: ImageLoadError, path) -> ImageLoadError:
    """`error`, saying where `path` leads when it is a symbolic link: "zero.jpg" is a device only as /dev/zero."""
    if path is None or not os.path.islink(path):
        return error
    reason = f"{error.reason} (the name is a symbolic link to {os.path.realpath(path)})"
    return ImageLoadError(error.name, reason, error.advice)


def _load_pil(image, name):
    """`load_image` for a PIL image: the same header checks (format only for one from a file), then
    its pixels decoded and converted once."""
    try:
        _check_header(image, name, allow_unknown_format=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
        return to_rgb(image)
    except ImageLoadError:
        raise
    except Exception as error:  # noqa: BLE001 - untrusted input: any decoder failure means "unusable file"
        raise _load_error(error, name, None, None) from error


def _load_error(error, name, data, path):
    if isinstance(error, ImageLoadError):
        return error
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        reason = f"Pillow flags it as a decompression bomb ({str(error).rstrip('.')})"
        return ImageLoadError(name, reason, _too_large_advice())
    if isinstance(error, UnidentifiedImageError):
        return ImageLoadError(name, *_not_an_image(data, path))
    if isinstance(error, OSError) and error.errno is not None:  # the system's word; Pillow's own have no errno
        return ImageLoadError(name, f"the file cannot be read ({error.strerror})", "Check the path.")
    return ImageLoadError(name, f"it is truncated or corrupt ({type(error).__name__}: {error})")


def _check_header(image, name, allow_unknown_format=False):
    if image.format is None and allow_unknown_format:
        pass  # an image made in memory (Image.new, Image.fromarray): no file, no decoder to guard
    elif image.format not in ALLOWED_FORMATS:
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
        reason = (
            f"decoding it takes about {width * height * per_pixel / 1e6:,.0f} MB ({width}×{height} pixels × "
            f"{per_pixel} bytes for mode {image.mode}), over the budget of {MAX_DECODE_BYTES / 1e6:,.0f} MB"
        )
        raise ImageLoadError(name, reason, _too_large_advice())


def _too_large_advice():
    return (
        f"Downscale it, or if you trust the file raise clipqwen.images.MAX_PIXELS (now {MAX_PIXELS:,}; above "
        f"{Image.MAX_IMAGE_PIXELS:,} also raise PIL.Image.MAX_IMAGE_PIXELS) or clipqwen.images.MAX_DECODE_BYTES "
        f"(now {MAX_DECODE_BYTES:,})."
    )


def regular_file_size(path, name) -> int:
    """The size of the file at `path`, refused unless it is a regular file. os.stat opens nothing:
    opening a FIFO named `*.jpg` would block, and a device could be read forever."""
    try:
        status = os.stat(path)
    except UnicodeEncodeError:
        raise ImageLoadError(
            printable(name),  # a lone surrogate cannot be logged
            "its name is not valid UTF-8, so it cannot name a file",
            "Rename the file, or fix its name where it is listed.",
        ) from None
    except OSError as error:
        if error.errno != errno.ENAMETOOLONG:
            raise  # a missing or forbidden file: _load_error names it
        raise ImageLoadError(name, too_long(path), "Rename the file, or fix its name where it is listed.") from None
    if not stat.S_ISREG(status.st_mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(status.st_mode)
            else "a FIFO (named pipe)"
            if stat.S_ISFIFO(status.st_mode)
            else "a socket"
            if stat.S_ISSOCK(status.st_mode)
            else "a device"
        )
        raise ImageLoadError(name, f"it is {kind}, not a regular file", "Give the path of an image file.")
    return status.st_size


def too_long(path) -> str:
    """Why the system refuses `path` as too long (ENAMETOOLONG): one name over 255 bytes, or the whole path."""
    longest = max(Path(path).parts, key=lambda part: len(os.fsencode(part)))
    size = len(os.fsencode(longest))
    if size <= 255:
        return f"the path is too long for the file system ({len(os.fsencode(path)):,} bytes)"
    if size == len(longest):
        return f"the file name is too long for the file system ({size} characters; most allow 255 bytes)"
    return (
        f"the file name is too long for the file system ({len(longest)} characters, {size} bytes; "
        "most allow 255 bytes)"
    )


def printable(name: str) -> str:
    """A file name for a terminal, a log, JSON or tab-separated output: bytes that are not UTF-8 as \\xNN (a lone
    surrogate, which names no file, as \\udNNN), control characters (a newline, a tab) escaped, so that it stays
    on one line."""
    try:
        name = os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        name = name.encode("utf-8", "backslashreplace").decode()
    return re.sub(r"[\x00-\x1f\x7f]", lambda match: repr(match.group())[1:-1], name)


def name_problem(path) -> str | None:
    """Why `path` cannot name a file at all (too long for the file system), or None: checked before anything asks
    whether it is a folder, which raises for such a name."""
    try:
        os.stat(path)
    except OSError as error:
        return too_long(path) if error.errno == errno.ENAMETOOLONG else None
    except ValueError:  # a NUL byte, a name that is not valid UTF-8: the loaders say so
        return None
    return None


# ---- folder scans ---------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def image_files_in(folder) -> tuple[list[Path], list[str]]:
    """(every entry of `folder` named as an image, sorted; the names of the others). What an entry named `*.jpg` is
    (a FIFO, a folder, a device, a link to one or to a text file) is not checked here: `load_image` refuses it,
    saying why, rather than the scan dropping it unsaid. The others are listed for the caller to report."""
    entries = sorted(Path(folder).iterdir())
    images = [path for path in entries if path.suffix.lower() in IMAGE_SUFFIXES]
    passed = [path.name + ("/" if path.is_dir() else "") for path in entries if path not in images]
    return images, passed


def _not_an_image(data, path) -> tuple[str, str]:
    """(reason, advice) for a file Pillow cannot identify."""
    if data is None:
        with open(path, "rb") as file:
            data = file.read(4096)
    head = bytes(data[:4096]).lstrip(b"\xef\xbb\xbf \t\r\n")  # a UTF-8 byte-order mark, whitespace
    if head.startswith(b"<") and re.search(rb"<svg[\s>/]", head, re.IGNORECASE):  # after any <?xml?>, <!DOCTYPE>
        return "it is an SVG (a vector image), which is not supported", "Convert it to PNG or JPEG."
    if head.startswith(b"<"):  # a web page or error page saved under an image name: a failed download
        return "it is HTML/XML text, not an image (often an error page from a failed download)", _REDO
    return "Pillow does not recognise it as an image (unknown format or random bytes)", _REDO
