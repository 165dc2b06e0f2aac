"""A browser front end (Chromium through Playwright) talking to `diffctl serve` on its own origin.

Uses Debian's chromium (`executable_path`); Playwright's own browser downloads are not used.
"""

from __future__ import annotations

import shutil

import pytest

from clientutil import H, W

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (tests/clients/run.sh installs Debian's package)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def test_browser_basic_auth_challenge_and_fetch(browser, diffctl_server):
    s = diffctl_server
    # The browser answers the server's 401 challenge itself, as it would after a login prompt.
    ctx = browser.new_context(http_credentials={"username": s.auth[0], "password": s.auth[1]})
    try:
        page = ctx.new_page()
        resp = page.goto(s.sdapi + "/samplers")
        assert resp is not None and resp.status == 200, (
            f"Chromium GET /sdapi/v1/samplers with credentials: {resp.status if resp else None} "
            f"{resp.text()[:300] if resp else ''}"
        )

        # Page script on the server's origin: generate, show the image, poll progress.
        result = page.evaluate(
            """async ({w, h}) => {
                const auth = {'Authorization': 'Basic ' + btoa('user:pass')};
                const r = await fetch('/sdapi/v1/txt2img', {
                    method: 'POST',
                    headers: {...auth, 'Content-Type': 'application/json'},
                    body: JSON.stringify({prompt: 'a house', width: w, height: h, steps: 2, seed: 5}),
                });
                const text = await r.text();
                if (r.status !== 200) return {status: r.status, text: text.slice(0, 500)};
                const body = JSON.parse(text);
                const img = new Image();
                const loaded = new Promise((ok, err) => { img.onload = ok; img.onerror = () => err('decode'); });
                img.src = 'data:image/png;base64,' + body.images[0];
                await loaded;
                const info = JSON.parse(body.info);
                const p = await (await fetch('/sdapi/v1/progress?skip_current_image=true', {headers: auth})).json();
                return {status: 200, width: img.naturalWidth, height: img.naturalHeight, seed: info.seed,
                        jobs: p.state.job_count};
            }""",
            {"w": W, "h": H},
        )
        assert result["status"] == 200, f"fetch txt2img from the page: {result}"
        assert (result["width"], result["height"]) == (W, H), f"the <img> decoded as {result}"
        assert result["seed"] == 5, f"info.seed from the page: {result}"
        assert result["jobs"] == 0, f"progress after the job: {result}"
    finally:
        ctx.close()


def test_browser_without_credentials_is_refused(browser, diffctl_server):
    """Headless Chromium cannot show a login prompt: a 401 challenge ends as an auth error or a 401 page."""
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        try:
            resp = page.goto(diffctl_server.sdapi + "/sd-models")
        except sync_api.Error as e:
            assert "ERR_INVALID_AUTH_CREDENTIALS" in str(e) or "401" in str(e), f"unexpected navigation error: {e}"
            return
        assert resp is not None and resp.status == 401, f"status {resp.status if resp else None}: {resp.text()[:300]}"
    finally:
        ctx.close()
