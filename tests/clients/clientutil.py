"""Helpers shared by the client tests: test images, PNG decoding, readable failure messages."""

from __future__ import annotations

import base64
import io
import json

from PIL import Image, ImageDraw

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Every generation in this suite is 64x64 with few steps: the tiny model's native size is 32x32,
# larger sizes only cost time.
W = H = 64
STEPS = 3


def describe(resp, limit: int = 1500) -> str:
    """One line about a `requests` response, for assertion messages."""
    body = resp.text if resp is not None else ""
    if len(body) > limit:
        body = body[:limit] + f"... ({len(resp.text)} chars)"
    req = resp.request
    return f"{req.method} {req.url} -> {resp.status_code} {resp.headers.get('content-type', '')!r}: {body}"


def decode_png_b64(data: str, what: str = "image") -> Image.Image:
    """A base64 PNG (optionally a data: URL) as a loaded PIL image; asserts it really is a PNG."""
    assert isinstance(data, str) and data, f"{what}: expected a non-empty base64 string, got {data!r:.200}"
    if data.startswith("data:"):
        data = data.split(",", 1)[1]
    raw = base64.b64decode(data)
    assert raw.startswith(PNG_MAGIC), f"{what}: decoded bytes are not a PNG (first bytes {raw[:16]!r})"
    return decode_png_bytes(raw, what)


def decode_png_bytes(raw: bytes, what: str = "image") -> Image.Image:
    assert raw.startswith(PNG_MAGIC), f"{what}: not a PNG (first bytes {raw[:16]!r})"
    img = Image.open(io.BytesIO(raw))
    img.load()
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def parse_info(info) -> dict:
    """A1111's `info` is a JSON *string*; webuiapi already parses it into a dict."""
    if isinstance(info, dict):
        return info
    assert isinstance(info, str), f"info should be a JSON string, got {type(info).__name__}: {info!r:.300}"
    try:
        parsed = json.loads(info)
    except ValueError as e:
        raise AssertionError(f"info is not valid JSON ({e}): {info!r:.500}") from None
    assert isinstance(parsed, dict), f"info should decode to an object, got {parsed!r:.300}"
    return parsed


def init_image() -> Image.Image:
    """A 64x64 RGB picture with structure (gradient, shapes) so img2img/inpaint changes are visible."""
    img = Image.new("RGB", (W, H))
    px = img.load()
    for y in range(H):
        for x in range(W):
            px[x, y] = (x * 4 % 256, y * 4 % 256, 128)
    d = ImageDraw.Draw(img)
    d.ellipse((8, 8, 28, 28), fill=(240, 240, 30))
    d.rectangle((36, 36, 58, 58), fill=(20, 40, 200))
    return img


# The inpainted region of mask_image() (white), as a box (x0, y0, x1, y1), inclusive.
MASK_BOX = (20, 20, 43, 43)


def mask_image() -> Image.Image:
    """A1111 convention: white = repaint, black = keep."""
    m = Image.new("L", (W, H), 0)
    ImageDraw.Draw(m).rectangle(MASK_BOX, fill=255)
    return m


def openai_mask_png() -> Image.Image:
    """OpenAI convention: fully transparent pixels (alpha 0) mark where to edit."""
    m = Image.new("RGBA", (W, H), (0, 0, 0, 255))
    ImageDraw.Draw(m).rectangle(MASK_BOX, fill=(0, 0, 0, 0))
    return m


def control_image() -> Image.Image:
    """High-contrast shapes: canny finds clear edges in them."""
    img = Image.new("RGB", (W, H), (0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rectangle((10, 10, 40, 30), fill=(255, 255, 255))
    d.ellipse((30, 30, 56, 56), outline=(255, 255, 255), width=3)
    d.line((4, 60, 60, 4), fill=(255, 255, 255), width=2)
    return img


def mean_abs_diff(a: Image.Image, b: Image.Image, box=None) -> float:
    """Mean absolute difference per channel (0..255) of two RGB images, optionally inside a box."""
    a = a.convert("RGB")
    b = b.convert("RGB")
    assert a.size == b.size, f"sizes differ: {a.size} vs {b.size}"
    if box is not None:
        a = a.crop(box)
        b = b.crop(box)
    da, db = a.tobytes(), b.tobytes()
    return sum(abs(x - y) for x, y in zip(da, db)) / max(len(da), 1)


def outside_box_mask_diff(a: Image.Image, b: Image.Image, box, margin: int) -> float:
    """Mean absolute difference over pixels at least `margin` px away from `box`."""
    a = a.convert("RGB")
    b = b.convert("RGB")
    x0, y0, x1, y1 = box
    pa, pb = a.load(), b.load()
    total, n = 0, 0
    for y in range(a.height):
        for x in range(a.width):
            if x0 - margin <= x <= x1 + margin and y0 - margin <= y <= y1 + margin:
                continue
            total += sum(abs(p - q) for p, q in zip(pa[x, y], pb[x, y]))
            n += 3
    return total / max(n, 1)
