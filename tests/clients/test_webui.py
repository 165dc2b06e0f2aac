"""The browser page that `diffctl serve` answers at `/` (src/server/web/index.html), driven by
Playwright through Debian's Chromium against the real server of the `diffctl_server` fixture."""

import base64
import io
import json
import os
import re
import shutil

import pytest
import requests

from playwright.sync_api import expect, sync_playwright

# The tiny test model is quick only at small sizes.
SIZE = 64
# Long enough that the page sees it running (progress > 0, a live preview) before it is cancelled.
LONG_STEPS = int(os.environ.get("DIFFCTL_WEBUI_LONG_STEPS", "150"))
# The server builds src/server/web/index.html into its binary; set DIFFCTL_WEBUI_PAGE to a file to
# try an edited page against an already built server (the browser is given that file for `/`).
PAGE_OVERRIDE = os.environ.get("DIFFCTL_WEBUI_PAGE")


@pytest.fixture(scope="module")
def browser():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Debian's chromium is needed (tests/clients/run.sh installs it with apt-get)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, diffctl_server):
    user, password = diffctl_server.auth
    context = browser.new_context(
        base_url=diffctl_server.base_url,
        http_credentials={"username": user, "password": password},
    )
    if PAGE_OVERRIDE:
        # Page development: the file on disk instead of the copy built into the binary.
        html = open(PAGE_OVERRIDE, "rb").read()
        context.route(
            lambda url: url.rstrip("/") == diffctl_server.base_url,
            lambda route: route.fulfill(status=200, content_type="text/html; charset=utf-8", body=html),
        )
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield pg
        assert not errors, f"JavaScript errors on the page: {errors}"
    finally:
        context.close()


def open_page(page):
    page.goto("/")
    expect(page).to_have_title("diffctl")
    # The lists arrive with fetch() after load: wait for the models and samplers.
    expect(page.locator("#model option").first).to_be_attached(timeout=30_000)
    expect(page.locator('#sampler option[value="Euler a"]')).to_have_count(1, timeout=30_000)


def small_job(page, steps, prompt="a photo of a cat"):
    page.fill("#prompt", prompt)
    page.fill("#width", str(SIZE))
    page.fill("#height", str(SIZE))
    page.fill("#steps", str(steps))
    page.fill("#seed", "42")


def test_page_lists_models_and_samplers(page, diffctl_server):
    open_page(page)
    models = page.locator("#model option")
    assert models.count() >= 1
    assert page.locator("#model").input_value() != ""
    # The selected model is the server's current checkpoint.
    opts = requests.get(
        diffctl_server.base_url + "/sdapi/v1/options", auth=diffctl_server.auth, timeout=30
    ).json()
    current = opts.get("sd_model_checkpoint")
    titles = models.evaluate_all("os => os.map(o => o.value)")
    if current in titles:
        assert page.locator("#model").input_value() == current
    assert page.locator("#sampler").input_value() == "Euler a"
    # Defaults of the form.
    assert page.input_value("#steps") == "20"
    assert page.input_value("#cfg") == "7"
    assert page.input_value("#width") == "512"
    assert page.input_value("#height") == "512"
    assert page.input_value("#seed") == "-1"
    assert page.locator("#controlnet option").first.inner_text() == "None"
    expect(page.locator("#status")).not_to_have_class(re.compile(r"\berror\b"))


def test_generate_adds_result_to_gallery(page):
    open_page(page)
    small_job(page, steps=4)
    page.click("#generate")
    result = page.locator("#gallery figure.result").first
    expect(result.locator("img")).to_be_visible(timeout=120_000)
    expect(result.locator("figcaption")).to_contain_text("Steps: 4")
    src = result.locator("img").get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    png = base64.b64decode(src.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # The image really is the size asked for.
    w = result.locator("img").evaluate("i => i.naturalWidth")
    h = result.locator("img").evaluate("i => i.naturalHeight")
    assert (w, h) == (SIZE, SIZE)
    expect(page.locator("#status")).not_to_have_class(re.compile(r"\berror\b"))
    expect(page.locator("#generate")).to_be_enabled()

    # A second job lands first in the gallery (newest first).
    page.fill("#steps", "3")
    page.click("#generate")
    expect(page.locator("#gallery figure.result")).to_have_count(2, timeout=120_000)
    expect(page.locator("#gallery figure.result").first.locator("figcaption")).to_contain_text("Steps: 3")
    expect(page.locator("#gallery figure.result").nth(1).locator("figcaption")).to_contain_text("Steps: 4")


def test_progress_preview_and_cancel(page):
    open_page(page)
    small_job(page, steps=LONG_STEPS, prompt="a long job to cancel")
    page.click("#generate")
    expect(page.locator("#cancel")).to_be_enabled()
    page.wait_for_function(
        "() => document.getElementById('progress').value > 0", timeout=60_000, polling=100
    )
    page.wait_for_function(
        "() => (document.getElementById('preview').getAttribute('src') || '').startsWith('data:image/')",
        timeout=60_000,
        polling=100,
    )
    page.click("#cancel")
    expect(page.locator("#status")).to_have_text("cancelled", timeout=60_000)
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#cancel")).to_be_disabled()

    # The server is free again: a short job after the cancelled one completes normally.
    before = page.locator("#gallery figure.result").count()
    page.fill("#steps", "2")
    page.click("#generate")
    expect(page.locator("#gallery figure.result")).to_have_count(before + 1, timeout=120_000)
    expect(page.locator("#gallery figure.result").first.locator("figcaption")).to_contain_text("Steps: 2")


def test_root_needs_credentials(diffctl_server):
    r = requests.get(diffctl_server.base_url + "/", timeout=30)
    assert r.status_code == 401
    assert "basic" in r.headers.get("WWW-Authenticate", "").lower()
    r = requests.get(diffctl_server.base_url + "/", auth=("nobody", "wrong"), timeout=30)
    assert r.status_code == 401
    r = requests.get(diffctl_server.base_url + "/", auth=diffctl_server.auth, timeout=30)
    assert r.status_code == 200
    assert r.headers.get("Content-Type", "").startswith("text/html")
    assert "<title>diffctl</title>" in r.text


def test_server_error_is_shown(page):
    """A request the server refuses (an unknown sampler) shows its message in #status as an error."""
    open_page(page)
    small_job(page, steps=2)
    page.evaluate(
        """() => {
            const s = document.getElementById('sampler');
            const o = document.createElement('option');
            o.value = o.textContent = 'No Such Sampler';
            s.appendChild(o);
            s.value = 'No Such Sampler';
        }"""
    )
    page.click("#generate")
    status = page.locator("#status")
    expect(status).to_have_class(re.compile(r"\berror\b"), timeout=60_000)
    assert status.inner_text().strip() != ""
    assert page.locator("#gallery figure.result").count() == 0
    expect(page.locator("#generate")).to_be_enabled()


def test_generate_with_lora_and_controlnet(page):
    """The LoRA and ControlNet the test server has, chosen in the form, reach the server and give
    an image (the tiny fixtures make noise, so only the round trip is checked)."""
    open_page(page)
    loras = page.locator("#lora option").evaluate_all("os => os.map(o => o.value).filter(Boolean)")
    cns = page.locator("#controlnet option").evaluate_all("os => os.map(o => o.value).filter(Boolean)")
    if not loras or not cns:
        pytest.skip(f"the test server lists no LoRA ({loras}) or no ControlNet ({cns})")
    small_job(page, steps=3, prompt="a cat")
    page.select_option("#lora", loras[0])
    page.fill("#lora-weight", "0.5")
    page.select_option("#controlnet", cns[0])
    page.select_option("#control-module", "none")
    page.set_input_files(
        "#control-image", files=[{"name": "c.png", "mimeType": "image/png", "buffer": _png_bytes(SIZE, (255, 255, 255))}]
    )
    with page.expect_request("**/sdapi/v1/txt2img") as req:
        page.click("#generate")
    body = json.loads(req.value.post_data)
    assert body["prompt"] == f"a cat <lora:{loras[0]}:0.5>"
    assert body["alwayson_scripts"]["controlnet"]["args"][0]["model"] == cns[0]
    result = page.locator("#gallery figure.result").first
    expect(result.locator("img")).to_be_visible(timeout=120_000)
    expect(page.locator("#status")).not_to_have_class(re.compile(r"\berror\b"))
    expect(result.locator("figcaption")).to_contain_text("Steps: 3")
    expect(result.locator("figcaption")).to_contain_text(f"<lora:{loras[0]}:0.5>")


def _png_bytes(size=8, color=(200, 30, 30)):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def test_request_body_with_lora_controlnet_and_ip_adapter(page):
    """What the form sends for LoRA, ControlNet and IP-Adapter units: the lists and the txt2img
    answer are stood in by the browser (page.route), so this checks the page alone, whatever
    models the test server has."""
    page.route(
        "**/controlnet/model_list*",
        lambda r: r.fulfill(
            json={"model_list": ["control_canny_test", "ip-adapter_sd15_test", "ip_adapter_plus_test"]}
        ),
    )
    page.route(
        "**/controlnet/module_list*",
        lambda r: r.fulfill(json={"module_list": ["none", "canny", "ip-adapter_clip_sd15"]}),
    )
    page.route(
        "**/sdapi/v1/loras*",
        lambda r: r.fulfill(json=[{"name": "tinylora", "alias": "tinylora", "path": "/x/tinylora.safetensors"}]),
    )
    sent = {}
    png = base64.b64encode(_png_bytes()).decode()

    def fake_txt2img(route):
        sent["body"] = json.loads(route.request.post_data)
        route.fulfill(
            json={
                "images": [png],
                "parameters": {},
                "info": json.dumps({"infotexts": ["stub, Steps: 5, Seed: 7"], "seed": 7}),
            }
        )

    page.route("**/sdapi/v1/txt2img", fake_txt2img)
    open_page(page)
    # The IP-Adapter models are in their own list, not among the ControlNets.
    cn = page.locator("#controlnet option").evaluate_all("os => os.map(o => o.value)")
    ip = page.locator("#ip-adapter option").evaluate_all("os => os.map(o => o.value)")
    assert cn == ["", "control_canny_test"]
    assert ip == ["", "ip-adapter_sd15_test", "ip_adapter_plus_test"]
    assert page.locator("#control-module").input_value() == "none"

    # Without any unit there is no alwayson_scripts.
    small_job(page, steps=5, prompt="a cat")
    model = page.locator("#model").input_value()
    page.click("#generate")
    expect(page.locator("#gallery figure.result")).to_have_count(1)
    body = sent.pop("body")
    assert "alwayson_scripts" not in body
    assert body["prompt"] == "a cat"
    assert body["override_settings"] == {"sd_model_checkpoint": model}
    assert body["sampler_name"] == "Euler a"
    assert (body["steps"], body["width"], body["height"], body["seed"]) == (5, SIZE, SIZE, 42)
    assert body["cfg_scale"] == 7

    # LoRA, a ControlNet unit and an IP-Adapter unit.
    control_png = _png_bytes(16, (0, 0, 0))
    ip_png = _png_bytes(16, (255, 255, 255))
    page.select_option("#lora", "tinylora")
    page.fill("#lora-weight", "0.6")
    page.select_option("#controlnet", "control_canny_test")
    page.select_option("#control-module", "canny")
    page.fill("#control-weight", "0.8")
    page.set_input_files("#control-image", files=[{"name": "c.png", "mimeType": "image/png", "buffer": control_png}])
    page.select_option("#ip-adapter", "ip-adapter_sd15_test")
    page.set_input_files("#ip-image", files=[{"name": "i.png", "mimeType": "image/png", "buffer": ip_png}])
    page.fill("#negative", "blurry")
    page.click("#generate")
    expect(page.locator("#gallery figure.result")).to_have_count(2)
    body = sent.pop("body")
    assert body["prompt"] == "a cat <lora:tinylora:0.6>"
    assert body["negative_prompt"] == "blurry"
    units = body["alwayson_scripts"]["controlnet"]["args"]
    assert len(units) == 2
    assert units[0]["enabled"] is True
    assert units[0]["model"] == "control_canny_test"
    assert units[0]["module"] == "canny"
    assert units[0]["weight"] == 0.8
    assert base64.b64decode(units[0]["image"]) == control_png
    assert units[1]["enabled"] is True
    assert units[1]["model"] == "ip-adapter_sd15_test"
    assert units[1]["module"] == "ip-adapter_clip_sd15"
    assert units[1]["weight"] == 1
    assert base64.b64decode(units[1]["image"]) == ip_png
    expect(page.locator("#gallery figure.result").first.locator("figcaption")).to_have_text("stub, Steps: 5, Seed: 7")

    # A ControlNet chosen without its image is refused on the page, with nothing sent.
    page.set_input_files("#control-image", files=[])
    page.click("#generate")
    expect(page.locator("#status")).to_have_class(re.compile(r"\berror\b"))
    expect(page.locator("#status")).to_contain_text("control image")
    assert "body" not in sent
