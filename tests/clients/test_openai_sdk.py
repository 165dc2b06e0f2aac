"""`diffctl serve` driven by the official openai SDK (images API, models, errors)."""

from __future__ import annotations


import openai
import pytest
import requests

from clientutil import (
    MASK_BOX,
    H,
    W,
    decode_png_b64,
    decode_png_bytes,
    init_image,
    mean_abs_diff,
    openai_mask_png,
    outside_box_mask_diff,
    png_bytes,
)

PROMPT = "a lighthouse at dusk"


def _client(server, api_key="user:pass"):
    # No retries: an error must surface as the server sent it, not after back-off.
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=api_key, max_retries=0, timeout=120)


def _status_error(e: openai.APIStatusError) -> str:
    return f"HTTP {e.status_code} {e.response.request.method} {e.response.request.url}: {e.response.text[:1000]}"


@pytest.fixture
def client(diffctl_server):
    c = _client(diffctl_server)
    yield c
    c.close()


@pytest.fixture
def model_id(client):
    ids = [m.id for m in client.models.list()]
    assert ids, "GET /v1/models listed no model"
    for want in ("sd1-tiny",):
        if want in ids:
            return want
    candidates = [i for i in ids if "sd1-tiny" in i and "file" not in i]
    assert candidates, f"no sd1-tiny in GET /v1/models ids: {ids}"
    return candidates[0]


def test_models_list(client):
    try:
        models = list(client.models.list())
    except openai.APIStatusError as e:
        raise AssertionError(_status_error(e)) from None
    ids = [m.id for m in models]
    assert any("sd1-tiny" in i for i in ids), f"GET /v1/models ids: {ids}"
    for m in models:
        assert m.object == "model", f"model object field: {m!r}"


def test_generate_b64_json_n2(client, model_id):
    try:
        resp = client.images.generate(model=model_id, prompt=PROMPT, size=f"{W}x{H}", n=2,
                                      response_format="b64_json")
    except openai.APIStatusError as e:
        raise AssertionError(_status_error(e)) from None
    assert resp.data is not None and len(resp.data) == 2, f"n=2 should give 2 images: {resp!r:.500}"
    imgs = []
    for i, item in enumerate(resp.data):
        assert item.b64_json, f"image {i}: no b64_json (url={item.url!r})"
        img = decode_png_b64(item.b64_json, f"data[{i}].b64_json")
        assert img.size == (W, H), f"image {i}: size {img.size}, asked for {W}x{H}"
        imgs.append(img)
    assert isinstance(resp.created, int) and resp.created > 1_600_000_000, f"created: {resp.created!r}"
    assert imgs[0].tobytes() != imgs[1].tobytes(), "n=2 returned two identical images"


def test_generate_url(client, model_id, diffctl_server):
    try:
        resp = client.images.generate(model=model_id, prompt=PROMPT, size=f"{W}x{H}", n=1, response_format="url")
    except openai.APIStatusError as e:
        raise AssertionError(_status_error(e)) from None
    assert resp.data and len(resp.data) == 1, f"{resp!r:.500}"
    url = resp.data[0].url
    assert url, f"response_format=url gave no url: {resp.data[0]!r:.300}"
    assert url.startswith("http://") or url.startswith("https://"), f"url should be absolute: {url!r}"

    r = requests.get(url, auth=diffctl_server.auth, timeout=30)
    assert r.status_code == 200, f"fetching the image with basic auth: {r.status_code} {r.text[:300]}"
    img = decode_png_bytes(r.content, url)
    assert img.size == (W, H), f"size {img.size}"
    assert r.headers.get("content-type", "").startswith("image/png"), f"content-type {r.headers.get('content-type')!r}"

    r2 = requests.get(url, timeout=30)
    assert r2.status_code == 401, f"the image URL must not be readable without credentials: {r2.status_code}"


def test_edit_with_mask(client, model_id, tmp_path):
    image_path = tmp_path / "image.png"
    mask_path = tmp_path / "mask.png"
    image_path.write_bytes(png_bytes(init_image()))
    mask_path.write_bytes(png_bytes(openai_mask_png()))
    try:
        with open(image_path, "rb") as image, open(mask_path, "rb") as mask:
            resp = client.images.edit(model=model_id, image=image, mask=mask, prompt=PROMPT, size=f"{W}x{H}",
                                      response_format="b64_json")
    except openai.APIStatusError as e:
        raise AssertionError(_status_error(e)) from None
    assert resp.data and len(resp.data) == 1, f"{resp!r:.500}"
    img = decode_png_b64(resp.data[0].b64_json, "edit data[0].b64_json")
    assert img.size == (W, H), f"edit result size {img.size}"


def test_edit_keeps_unmasked_pixels(client, model_id, tmp_path):
    """The mask's opaque pixels are the part to keep: the result keeps them (as DALL-E 2 edits do)."""
    init = init_image()
    try:
        resp = client.images.edit(model=model_id, image=("image.png", png_bytes(init), "image/png"),
                                  mask=("mask.png", png_bytes(openai_mask_png()), "image/png"),
                                  prompt=PROMPT, size=f"{W}x{H}", response_format="b64_json")
    except openai.APIStatusError as e:
        raise AssertionError(_status_error(e)) from None
    out = decode_png_b64(resp.data[0].b64_json, "edit data[0].b64_json")
    inside = mean_abs_diff(out, init, box=(MASK_BOX[0], MASK_BOX[1], MASK_BOX[2] + 1, MASK_BOX[3] + 1))
    outside = outside_box_mask_diff(out, init, MASK_BOX, margin=8)
    assert inside > 3.0, f"the transparent (edit) region barely changed: mean |diff| {inside:.2f}"
    assert outside < 2.0, (
        f"pixels 8+ px away from the mask's transparent box changed by mean |diff| {outside:.2f} "
        f"(inside: {inside:.2f}): the unmasked part of the image is not kept"
    )


def test_edit_default_response(client, model_id, tmp_path):
    """Without response_format: whatever the server defaults to must be usable (url or b64_json)."""
    image_path = tmp_path / "image.png"
    image_path.write_bytes(png_bytes(init_image()))
    try:
        with open(image_path, "rb") as image:
            resp = client.images.edit(model=model_id, image=image, prompt=PROMPT, size=f"{W}x{H}")
    except openai.APIStatusError as e:
        raise AssertionError(_status_error(e)) from None
    assert resp.data and len(resp.data) == 1, f"{resp!r:.500}"
    item = resp.data[0]
    assert item.b64_json or item.url, f"neither b64_json nor url: {item!r:.300}"


def test_wrong_api_key(diffctl_server):
    bad = _client(diffctl_server, api_key="user:wrong")
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.models.list()
    body = exc.value.body
    assert isinstance(body, dict) and body.get("message"), (
        f"errors should be {{'error': {{'message', 'type', 'code'}}}}, got {exc.value.response.text[:500]!r}"
    )
    with pytest.raises(openai.AuthenticationError):
        bad.images.generate(prompt=PROMPT, size=f"{W}x{H}", response_format="b64_json")


def test_bad_size(client, model_id):
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(model=model_id, prompt=PROMPT, size="63x64", response_format="b64_json")
    body = exc.value.body
    assert isinstance(body, dict) and body.get("message"), (
        f"errors should be {{'error': {{'message', 'type', 'code'}}}}, got {exc.value.response.text[:500]!r}"
    )
    assert "63" in body["message"] or "size" in body["message"].lower(), f"message should say what is wrong: {body}"


def test_openai_model_name_is_accepted(client):
    """Clients that hard-code OpenAI's model names still get an image (the name is ignored)."""
    try:
        resp = client.images.generate(model="dall-e-3", prompt=PROMPT, size=f"{W}x{H}", response_format="b64_json")
    except openai.APIStatusError as e:
        raise AssertionError(_status_error(e)) from None
    img = decode_png_b64(resp.data[0].b64_json, "data[0].b64_json")
    assert img.size == (W, H), f"size {img.size}"
