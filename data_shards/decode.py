"""Decoding of single shard members: images, labels and 2-D points.

Every function here turns bytes into a plain numpy value or raises :class:`BadSample`
with a short machine-readable reason (one of the skip reasons of :mod:`data_shards.errors`).
The stream counts those reasons instead of crashing, so nothing in this module may let
another exception type escape for bad data.

PIL is the reference decoder and the fallback that decodes anything. Two faster decoders
take the common cases first, each only where its output is bit-identical to PIL's (checked
by tests/test_decode.py); everything else, and anything they fail on, goes to PIL, so the
skip reasons stay PIL's:

* JPEGs that need no DCT scaling and no EXIF handling: simplejpeg (libjpeg-turbo without
  PIL's per-image Python overhead: 2.5-6x faster, see ``bench/``; same ISLOW IDCT and fancy
  upsampling as PIL).
* 8-bit PNGs: pyspng (libspng: 2-3x faster than PIL's zlib + unfilter here).

:func:`decode_image_fast` is the stream's entry point: the fast decoders only, optionally
into a caller's reusable buffer, or None for :func:`decode_image` to decide.
"""

from __future__ import annotations

import io
import re
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps

from data_shards.errors import BAD_LABEL, DECODE_ERROR, TOO_LARGE, BadSample

try:  # optional: the fast JPEG path; PIL alone decodes everything without it
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

try:  # optional: the fast PNG path (libspng); PIL alone decodes everything without it
    import pyspng as _pyspng
except ImportError:  # pragma: no cover - depends on the environment
    _pyspng = None

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IHDR = struct.Struct(">4sIIBBBBB")  # at offset 12: b"IHDR", width, height, depth, colour type, ...

# 8192 x 8192: larger than any sane training image, small enough that one decode cannot
# exhaust a worker's memory (a 64k x 64k PNG header costs 12 GiB once decoded).
DEFAULT_MAX_PIXELS = 8192 * 8192

IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "gif", "ppm", "pgm", "tif", "tiff"})

_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_LABEL_RE = re.compile(rb"\s*(\d{1,18})\s*")  # 18 digits always fits in int64


def decode_label(data: bytes) -> int:
    """Parse a ``.cls`` payload (ASCII non-negative integer, surrounding whitespace allowed)."""
    if type(data) is bytes and len(data) <= 18 and data.isdigit():  # the usual b"7": ASCII digits only
        return int(data)
    match = _LABEL_RE.fullmatch(data) if isinstance(data, (bytes, bytearray)) else None
    if match is None:
        raise BadSample(BAD_LABEL, repr(bytes(data[:20]) if isinstance(data, (bytes, bytearray)) else data))
    return int(match.group(1))


_NPY_LAYOUTS: dict[bytes, tuple[np.dtype, int]] = {}  # .npy header -> (dtype, values), for headers seen


def decode_points(data: bytes, dim: int | None = None) -> np.ndarray:
    """Decode a ``.npy`` payload into a finite float32 vector (of length ``dim`` if given).

    A shard's points all carry the same header, and ``np.load`` parses it with
    ``ast.literal_eval`` every time (measured: ~150 us of a 2-D point's ~190 us, which made
    the loader the bottleneck of the ring8/grid25 runs). A header ``np.load`` has accepted
    once is remembered, and later payloads with those exact bytes are read in place.
    """
    header_len = _npy_header_length(data)
    layout = _NPY_LAYOUTS.get(bytes(data[:header_len])) if header_len else None
    if layout is not None and len(data) == header_len + layout[0].itemsize * layout[1]:
        vector = np.frombuffer(data, dtype=layout[0], count=layout[1], offset=header_len).astype(np.float32)
    else:
        try:
            value = np.load(io.BytesIO(data), allow_pickle=False)
            vector = np.asarray(value, dtype=np.float32).reshape(-1)
        except Exception as exn:  # np.load raises ValueError, OSError, EOFError, ... on garbage
            raise BadSample(DECODE_ERROR, f"npy: {exn}") from None
        if header_len and isinstance(value, np.ndarray) and value.dtype.kind in "fiu" \
                and not value.dtype.hasobject and len(data) == header_len + value.nbytes \
                and (value.ndim <= 1 or value.flags.c_contiguous) and len(_NPY_LAYOUTS) < 64:
            _NPY_LAYOUTS[bytes(data[:header_len])] = (value.dtype, value.size)
    if vector.size == 0 or (dim is not None and vector.size != dim) or not np.isfinite(vector).all():
        raise BadSample(DECODE_ERROR, f"npy vector of shape {vector.shape}, expected ({dim},)")
    return vector


def _npy_header_length(data: bytes) -> int:
    """Bytes before the array data of a .npy payload (format 1.0 or 2.0/3.0), or 0 if it is not one."""
    if len(data) < 10 or data[:6] != b"\x93NUMPY":
        return 0
    if data[6] == 1:
        return 10 + struct.unpack_from("<H", data, 8)[0]
    if len(data) >= 12 and data[6] in (2, 3):
        return 12 + struct.unpack_from("<I", data, 8)[0]
    return 0


def decode_image(
    data: bytes,
    ext: str,
    channels: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = False,
) -> np.ndarray:
    """Decode image bytes into an HWC uint8 array.

    Args:
        data: the encoded image.
        ext: the member's extension (a hint only; PIL sniffs the real format).
        channels: 1 (grey) or 3 (RGB); ``None`` keeps 1 channel for grey images, 3 otherwise.
        image_size: square side or ``(height, width)``; the image is scaled to cover it and
            centre-cropped. ``None`` keeps the decoded size.
        max_pixels: images whose header announces more pixels are rejected before decoding.
        exif_transpose: apply the EXIF orientation (camera photos), used by the shard builder.

    Raises:
        BadSample: ``too_large`` or ``decode_error``.
    """
    del ext  # the format is detected from the bytes; a wrong extension must not matter
    if not exif_transpose and _simplejpeg is not None and data[:3] == _JPEG_MAGIC:
        array = _decode_jpeg_fast(data, channels, image_size, max_pixels)
        if array is not None:
            return array
    if not exif_transpose and _pyspng is not None and data[:8] == _PNG_MAGIC:
        array = _decode_png_fast(data, channels, _target_hw(image_size), max_pixels)
        if array is not None:
            return array
    img = _open_checked(data, max_pixels)
    target = _target_hw(image_size)
    mode = _target_mode(img.mode, channels)
    try:
        if target is not None and img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: far cheaper than a full decode
            # followed by a downscale. draft never goes below the requested size.
            img.draft(mode, (target[1], target[0]))
        img.load()
        if exif_transpose:
            img = ImageOps.exif_transpose(img)
        img = _convert_mode(img, mode)
        if target is not None:
            img = fit_image(img, target)
        array = np.asarray(img, dtype=np.uint8)
    except BadSample:
        raise
    except Exception as exn:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        raise BadSample(DECODE_ERROR, str(exn)) from None
    return array[:, :, None] if array.ndim == 2 else array


def _decode_jpeg_fast(data, channels, image_size, max_pixels, buffer=None) -> np.ndarray | None:
    """simplejpeg's decode of a JPEG, or None where PIL must decide (or would differ).

    Accepted: greyscale and YCbCr JPEGs whose size is already the target, or less than twice
    it (where PIL's ``draft`` would not scale the DCT either; the resize then is PIL's own
    :func:`fit_image`). To grey from colour only with a target size, where PIL's draft also
    takes libjpeg's luma channel. CMYK/YCCK, Adobe RGB, DCT-scaled drafts, corrupt or
    recoverable-warning data: None (PIL).
    """
    try:
        height, width, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
    except Exception:
        return None
    if height <= 0 or width <= 0 or height * width > max_pixels:
        return None  # PIL reports the right reason
    target = _target_hw(image_size)
    if colorspace == "Gray":
        out_space = "GRAY" if channels in (None, 1) else "RGB"
    elif colorspace == "YCbCr":
        if channels in (None, 3):
            out_space = "RGB"
        elif target is not None:
            out_space = "GRAY"  # what PIL's draft("L") decodes: libjpeg's Y channel
        else:
            return None  # PIL converts RGB -> L with its own weights
    else:
        return None
    if target is not None and (width // target[1] >= 2 and height // target[0] >= 2):
        return None  # PIL's draft picks a DCT scale (1/2, 1/4, 1/8); keep its exact choice
    if buffer is not None and (target is None or (height, width) != target or out_space != "RGB"):
        buffer = None  # the buffer only takes images that need no resize
    try:
        array = _simplejpeg.decode_jpeg(data, out_space, fastdct=False, fastupsample=False, strict=True,
                                        buffer=buffer)
    except Exception:
        return None
    if array.shape[0] != height or array.shape[1] != width:
        return None
    if target is not None and (height, width) != target:
        img = Image.fromarray(array[:, :, 0] if out_space == "GRAY" else array)
        array = np.asarray(fit_image(img, target), dtype=np.uint8)
        return array[:, :, None] if array.ndim == 2 else array
    return array


def decode_image_fast(
    data: bytes,
    channels: int | None,
    target_hw: tuple[int, int] | None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    buffer: np.ndarray | None = None,
) -> np.ndarray | None:
    """What ``decode_image(data, ext, channels, target_hw, max_pixels)`` returns, through the
    fast decoders only; None where they do not apply and :func:`decode_image` must decide.

    Covers 3-channel output of JPEGs (simplejpeg, as :func:`decode_image` does) and 8-bit
    PNGs (pyspng), and 1-channel output of 8-bit grey PNGs. ``buffer``, an HWC uint8 array of
    ``target_hw`` and ``channels``, may receive the JPEG pixels: the result can then be a view
    of it, valid until the next call with the same buffer. Never raises for bad data.
    """
    head = data[:8]
    if head[:3] == _JPEG_MAGIC:
        if channels != 3 or _simplejpeg is None:
            return None
        return _decode_jpeg_fast(data, channels, target_hw, max_pixels, buffer)
    if head == _PNG_MAGIC and _pyspng is not None:
        return _decode_png_fast(data, channels, target_hw, max_pixels)
    return None


# ---------------------------------------------------------------------------- JPEG layouts
# What lets the stream skip simplejpeg's header call (a fresh libjpeg decompressor per image,
# ~10% of a 64x64 decode): whether an image is "plain" is settled per shard, in bulk, from its
# markers; the pixels then go straight into the batch. Plain: SOI, then only APPn (not the
# Adobe APP14), DQT, DHT, DRI and COM segments around one 8-bit Huffman frame (SOF0/1/2) with
# 1 or 3 components not labelled R, G, B, up to the scan. libjpeg decodes exactly those as
# grey or YCbCr, the two colour spaces simplejpeg and PIL agree on (CMYK/YCCK and RGB-coded
# ones stay on the header-checked path).

_SKIPPED, _FRAME, _SCAN = 1, 2, 3
_SEGMENT_KIND = [0] * 256
for _code in (*range(0xE0, 0xF0), 0xDB, 0xC4, 0xDD, 0xFE):
    _SEGMENT_KIND[_code] = _SKIPPED
_SEGMENT_KIND[0xEE] = 0  # Adobe: its transform flag can make the image RGB or YCCK
for _code in (0xC0, 0xC1, 0xC2):
    _SEGMENT_KIND[_code] = _FRAME
_SEGMENT_KIND[0xDA] = _SCAN
_MAX_SEGMENTS = 64
_MAX_LAYOUTS = 4  # header layouts tried against a whole shard before walking images one by one


def _jpeg_layout(data: bytes, start: int, end: int) -> tuple[list[int], list[int], int] | None:
    """(offsets, byte values, length) that pin ``data[start:end]``'s markers up to its scan, if
    it is a plain JPEG: any image with those bytes at those offsets, at least that long, has the
    same segments and frame parameters, hence is plain too. None if it is not plain."""
    if end - start < 4 or data[start] != 0xFF or data[start + 1] != 0xD8:
        return None
    offsets, values = [0, 1], [0xFF, 0xD8]
    p = start + 2
    framed = False
    for _ in range(_MAX_SEGMENTS):
        if p + 4 > end:
            return None
        marker, code, high, low = data[p : p + 4]
        length = high << 8 | low
        kind = _SEGMENT_KIND[code]
        if marker != 0xFF or kind == 0 or length < 2 or p + 2 + length > end:
            return None
        o = p - start
        offsets += (o, o + 1, o + 2, o + 3)
        values += (marker, code, high, low)
        if kind == _FRAME:
            precision, components = data[p + 4], data[p + 9]
            if framed or precision != 8 or components not in (1, 3) or length != 8 + 3 * components:
                return None
            ids = [data[p + 10 + 3 * c] for c in range(components)]
            if ids == [82, 71, 66]:  # "R", "G", "B": libjpeg then decodes without YCbCr conversion
                return None
            offsets += (o + 4, o + 9, *(o + 10 + 3 * c for c in range(components)))
            values += (precision, components, *ids)
            framed = True
        elif kind == _SCAN:
            return (offsets, values, o + 2 + length) if framed else None
        p += 2 + length
    return None


def plain_jpegs(data: bytes, starts: list[int], ends: list[int]) -> list[bool]:
    """For each ``data[starts[i]:ends[i]]``: True where it is a plain JPEG (see above), which
    :func:`decode_jpeg_into` may decode without a header check; False where unsure.

    Images of one encoder share a header layout, so each layout found is checked against all
    images at once (one numpy gather); the few images left are walked one by one.
    """
    n = len(starts)
    plain = np.zeros(n, dtype=bool)
    if not n:
        return []
    view = np.frombuffer(data, dtype=np.uint8)
    begin = np.asarray(starts, dtype=np.int64)
    size = np.asarray(ends, dtype=np.int64) - begin
    todo = np.arange(n)
    for _ in range(_MAX_LAYOUTS):
        if not todo.size:
            break
        first = int(todo[0])
        layout = _jpeg_layout(data, starts[first], ends[first])
        if layout is None:
            todo = todo[1:]
            continue
        offsets, values, length = layout
        at = np.minimum(begin[todo, None] + np.asarray(offsets), view.size - 1)
        same = (view[at] == np.asarray(values, dtype=np.uint8)).all(1) & (size[todo] >= length)
        plain[todo[same]] = True
        todo = todo[~same]
    for i in todo.tolist():
        plain[i] = _jpeg_layout(data, starts[i], ends[i]) is not None
    return plain.tolist()


def decode_jpeg_into(data: bytes, buffer: np.ndarray) -> np.ndarray | None:
    """simplejpeg's RGB decode of a plain JPEG (:func:`plain_jpegs`) straight into ``buffer``, a
    C-contiguous HWC uint8 array with 3 channels; None unless the image is exactly that size
    and decodes cleanly (``buffer`` may then hold garbage).

    For such an image it is the very call ``decode_image_fast(data, 3, buffer's (H, W),
    max_pixels, buffer)`` makes (given H * W <= max_pixels): same flags, same output.
    """
    if _simplejpeg is None:
        return None
    try:
        array = _simplejpeg.decode_jpeg(data, "RGB", False, False, 0, 0, 1.0, buffer, True)
    except Exception:  # corrupt, truncated, too large for the buffer, a libjpeg warning (strict)
        return None
    return array if array.shape == buffer.shape else None


# PNG colour types: 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA. PIL converts each to RGB
# (dropping alpha, expanding palettes, repeating grey) exactly as libspng's RGB8 output does.
_PNG_TO_RGB = frozenset({0, 2, 3, 4, 6})


def _decode_png_fast(data, channels, target_hw, max_pixels) -> np.ndarray | None:
    """pyspng's decode of an 8-bit PNG, or None where PIL must decide (or would differ).

    16-bit and low-bit-depth PNGs go to PIL (its grey "I;16" rescaling differs); so do grey
    output from colour (PIL's own weights), damaged data and oversized headers. One known
    difference: libspng ignores a bad checksum on an ancillary chunk (text, gamma, ...) and
    decodes the pixels, where PIL calls the file broken.
    """
    try:
        tag, width, height, depth, colour, _, _, interlace = _PNG_IHDR.unpack_from(data, 12)
    except struct.error:
        return None
    if tag != b"IHDR" or depth != 8 or interlace > 1 or width <= 0 or height <= 0 or width * height > max_pixels:
        return None
    if Image.MAX_IMAGE_PIXELS and width * height > 2 * Image.MAX_IMAGE_PIXELS:
        return None  # PIL calls it a decompression bomb: too_large
    if colour == 0 and channels in (None, 1):
        fmt = "L"
    elif colour in _PNG_TO_RGB and (channels == 3 or (channels is None and colour != 4)):
        fmt = "RGB"  # PIL keeps grey+alpha ("LA") grey when channels is None
    else:
        return None
    try:
        array = _pyspng.load(data, fmt)
    except Exception:
        return None
    if array.shape[0] != height or array.shape[1] != width:
        return None
    if target_hw is not None and (height, width) != tuple(target_hw):
        array = np.asarray(fit_image(Image.fromarray(array), target_hw), dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def decode_png_rgb(data: bytes, shape: tuple[int, int, int]) -> np.ndarray | None:
    """pyspng's RGB decode of an 8-bit PNG whose decoded shape is exactly ``shape`` (H, W, 3);
    None for anything else.

    The stream's per-image PNG path: the checks of :func:`_decode_png_fast` for that one case,
    without its general ones (resize, grey output), which measured ~2 us of a 64x64 PNG's
    ~100 us. For such an image it returns what ``decode_image_fast(data, 3, (H, W),
    max_pixels)`` returns (given H * W <= max_pixels). (libspng cannot decode into a given
    array: the caller copies the result into its batch.)
    """
    if _pyspng is None or data[:8] != _PNG_MAGIC:
        return None
    try:
        tag, width, height, depth, colour, _, _, interlace = _PNG_IHDR.unpack_from(data, 12)
    except struct.error:
        return None
    if tag != b"IHDR" or depth != 8 or interlace > 1 or colour not in _PNG_TO_RGB or (height, width, 3) != shape:
        return None
    if Image.MAX_IMAGE_PIXELS and width * height > 2 * Image.MAX_IMAGE_PIXELS:
        return None  # PIL calls it a decompression bomb: too_large
    try:
        array = _pyspng.load(data, "RGB")
    except Exception:
        return None
    return array if array.shape == shape else None


def fit_image(img: Image.Image, target_hw: tuple[int, int]) -> Image.Image:
    """Scale ``img`` (bicubic) so it covers ``target_hw`` and centre-crop to exactly that size."""
    height, width = target_hw
    if img.size == (width, height):
        return img
    scale = max(width / img.width, height / img.height)
    new_w = max(width, round(img.width * scale))
    new_h = max(height, round(img.height * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return img.crop((left, top, left + width, top + height))


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open the image header only and reject it if it announces too many pixels."""
    try:
        with warnings.catch_warnings():
            # We apply our own, stricter limit just below; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exn:
        raise BadSample(TOO_LARGE, str(exn)) from None
    except Exception as exn:
        raise BadSample(DECODE_ERROR, f"not an image: {exn}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise BadSample(DECODE_ERROR, f"empty image {width}x{height}")
    if width * height > max_pixels:
        raise BadSample(TOO_LARGE, f"{width}x{height} > {max_pixels} pixels")
    return img


def _target_hw(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = image_size
    return (int(height), int(width))


def _target_mode(mode: str, channels: int | None) -> str:
    if channels is None:
        return "L" if mode in _GREY_MODES else "RGB"
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    return "L" if channels == 1 else "RGB"


def _convert_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert to "L" or "RGB", handling the modes a plain convert() gets wrong."""
    if img.mode == mode:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit greyscale: convert("L") would clip at 255 instead of rescaling.
        values = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(values * (255.0 / peak), 0, 255).round().astype(np.uint8))
        return img if mode == "L" else img.convert(mode)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when converting such palettes straight to RGB
    return img.convert(mode)
