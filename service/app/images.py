"""Image files -> float32 [C, H, W] in [0, 1] of the shape the deployed model takes, and back to PNG.

Pure functions; the routes run them in a worker thread unless the images are small (api/uploads.run_sized).
Every refusal is an ApiError naming the file and the problem; nothing here may raise anything else.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass, field
import numpy as np
from PIL import Image, UnidentifiedImageError

from .core.errors import ApiError

# 8-bit modes whose conversion to L / RGB is exact. 16-bit, 32-bit int/float and CMYK/LAB/HSV images are
# refused: Pillow's conversion of those clips or guesses (e.g. I;16 -> L saturates at 255).
CONVERTIBLE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "La"}
FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"}
FITS = ("pad", "stretch")

Image.MAX_IMAGE_PIXELS = None  # the gateway checks the declared size itself, before decoding (MAX_PIXELS)


@dataclass
class Decoded:
    name: str
    array: np.ndarray  # float32 [C, H, W] in [0, 1]
    info: dict = field(default_factory=dict)


def _bad(name: str, status: int, reason: str, msg: str) -> ApiError:
    return ApiError(status, reason, f"image {name}: {msg}")


def b64decode(name: str, data: str) -> bytes:
    """Standard base64, optionally as a data: URL ('data:image/png;base64,...'); whitespace is ignored."""
    s = data.strip()
    if s.startswith("data:"):
        head, sep, s = s.partition(",")
        if not sep or ";base64" not in head:
            raise _bad(name, 422, "bad_base64", "a data: URL must be base64-encoded ('data:image/png;base64,...')")
    s = "".join(s.split())
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(name, 422, "bad_base64", f"invalid base64 ({e})") from None


def header_pixels(raw: bytes) -> int:
    """The pixel count an image file's header claims (no pixel is decoded); an unreadable header counts as
    unbounded, so the caller treats it as large (decode() then gives the error)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w, h = Image.open(io.BytesIO(raw)).size
        return w * h
    except Exception:  # noqa: BLE001 - any failure here is reported by decode()
        return 1 << 62


def decode(name: str, raw: bytes, shape: tuple[int, int, int], max_pixels: int, convert: bool = True,
           fit: str = "pad") -> Decoded:
    """Decode and bring to shape (C, H, W). With convert=False a file that is not already of that mode and
    size is refused (422) instead of converted."""
    c, h, w = shape
    if not raw:
        raise _bad(name, 422, "bad_image", "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            fmt = img.format or "?"
            if fmt not in FORMATS:
                raise _bad(name, 415, "bad_image", f"format {fmt} is not accepted; send PNG, JPEG or WebP")
            width, height = img.size
            if width * height > max_pixels:  # the header's claim, checked before any pixel is decoded
                raise _bad(name, 413, "too_many_pixels",
                           f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
            if getattr(img, "n_frames", 1) > 1:
                raise _bad(name, 422, "bad_image", f"animated {fmt} with {img.n_frames} frames; send a still image")
            mode = img.mode
            if mode not in CONVERTIBLE_MODES:
                raise _bad(name, 415, "bad_image", f"pixel mode {mode!r} is not supported (16-bit, 32-bit and "
                           "CMYK images are refused); send an 8-bit grayscale or RGB(A) image")
            img.load()
    except ApiError:
        raise
    except UnidentifiedImageError:
        raise _bad(name, 415, "bad_image", "not a recognised image file (PNG, JPEG or WebP expected)") from None
    except Image.DecompressionBombError as e:
        raise _bad(name, 413, "too_many_pixels", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, Image.DecompressionBombWarning) as e:
        raise _bad(name, 422, "bad_image", f"cannot decode the {fmt} data ({e})") from None

    info: dict = {"filename": name, "format": fmt, "width": width, "height": height, "mode": mode,
                  "conversions": []}
    want_mode = {1: "L", 3: "RGB"}.get(c)
    if want_mode is None:
        raise ApiError(503, "triton_unavailable", f"the deployed model takes {c}-channel images, which the "
                       "gateway cannot produce from image files")
    if not convert:
        problems = []
        if mode != want_mode:
            problems.append(f"mode {mode} (model takes {want_mode})")
        if (width, height) != (w, h):
            problems.append(f"size {width}x{height} (model takes {w}x{h})")
        if problems:
            raise _bad(name, 422, "needs_conversion", "would need conversion: " + ", ".join(problems) +
                       "; send it as the model takes it or allow conversion (convert=true)")
    conv = info["conversions"]
    try:
        if mode != want_mode:
            if mode in ("LA", "PA", "RGBA", "La") or (mode == "P" and "transparency" in img.info):
                # flatten transparency onto black, as the model's training images have a black background
                rgba = img.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                img = Image.alpha_composite(bg, rgba)
                conv.append("alpha flattened onto black")
            img = img.convert(want_mode)
            conv.append(f"mode {mode} -> {want_mode}")
        if img.size != (w, h):
            if fit == "stretch":
                img = img.resize((w, h), Image.Resampling.BICUBIC)
                conv.append(f"resized {width}x{height} -> {w}x{h} (stretch)")
            else:
                scale = min(w / img.width, h / img.height, 1.0)  # shrink to fit, never enlarge
                if scale < 1.0:
                    nw, nh = max(1, round(img.width * scale)), max(1, round(img.height * scale))
                    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
                    conv.append(f"resized {width}x{height} -> {nw}x{nh} (aspect kept)")
                if img.size != (w, h):
                    conv.append(f"padded {img.width}x{img.height} -> {w}x{h} with black, centred")
                    img = _pad_center(img, w, h)
    except (OSError, ValueError, MemoryError) as e:
        raise _bad(name, 422, "bad_image", f"cannot convert the image ({e})") from None
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    info["converted"] = bool(conv)
    return Decoded(name, np.ascontiguousarray(arr, dtype=np.float32), info)


def _pad_center(img: Image.Image, w: int, h: int) -> Image.Image:
    """Centre on a black canvas without resampling (Fashion-MNIST 28x28 -> 32x32, as the training data)."""
    canvas = Image.new(img.mode, (w, h), 0)
    canvas.paste(img, ((w - img.width) // 2, (h - img.height) // 2))
    return canvas


def to_png(chw: np.ndarray) -> bytes:
    """float [C, H, W] in [0, 1] -> PNG bytes (L for 1 channel, RGB for 3)."""
    a = np.clip(np.rint(np.asarray(chw, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(a[0], "L") if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()

