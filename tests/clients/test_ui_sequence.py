"""The raw HTTP sequence an A1111 front end makes (model switch, progress polling, interrupt) and auth."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from clientutil import H, STEPS, W, decode_png_b64, describe, parse_info

# A job long enough to be seen running and interrupted (~0.1 s a step for the tiny model at 64x64 on
# 2 cores); 150 is `diffctl serve`'s default --max-steps.
LONG_STEPS = 150


def _wait_idle(http, server, timeout=60):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        r = http.get(server.sdapi + "/progress", params={"skip_current_image": "true"})
        assert r.status_code == 200, describe(r)
        last = r.json()
        if last["state"]["job_count"] == 0:
            return last
        time.sleep(0.1)
    raise AssertionError(f"progress never showed job_count 0 within {timeout} s; last: {last!r:.800}")


def _txt2img(http, server, **kw):
    payload = dict(prompt="a cat", width=W, height=H, steps=STEPS, sampler_name="Euler a", seed=1)
    payload.update(kw)
    return http.post(server.sdapi + "/txt2img", json=payload)


def test_ui_switch_model_then_generate(http, diffctl_server, model_titles, restore_model):
    s = diffctl_server
    dir_title, file_title = model_titles

    r = http.get(s.sdapi + "/sd-models")
    assert r.status_code == 200, describe(r)
    titles = [m.get("title") for m in r.json()]
    assert len(titles) == len(set(titles)), f"sd-models titles must be unique (options select by title): {titles}"
    for m in r.json():
        missing = {"title", "model_name", "hash", "sha256", "filename"} - set(m)
        assert not missing, f"sd-models entry lacks {missing}: {m}"

    r = http.get(s.sdapi + "/options")
    assert r.status_code == 200, describe(r)
    assert r.json().get("sd_model_checkpoint") == dir_title, (
        f"the --model should be the current checkpoint: options say {r.json().get('sd_model_checkpoint')!r}"
    )

    r = http.post(s.sdapi + "/options", json={"sd_model_checkpoint": file_title})
    assert r.status_code == 200, describe(r)
    r = http.get(s.sdapi + "/options")
    assert r.status_code == 200, describe(r)
    assert r.json().get("sd_model_checkpoint") == file_title, (
        f"after POST options {{sd_model_checkpoint: {file_title!r}}}, GET options says "
        f"{r.json().get('sd_model_checkpoint')!r}"
    )

    idle = _wait_idle(http, s)
    for key in ("progress", "eta_relative", "state", "current_image", "textinfo"):
        assert key in idle, f"progress lacks {key!r}: {idle!r:.500}"
    for key in ("job_count", "sampling_step", "sampling_steps", "interrupted"):
        assert key in idle["state"], f"progress.state lacks {key!r}: {idle['state']}"

    r = _txt2img(http, s, seed=77)
    assert r.status_code == 200, describe(r)
    body = r.json()
    assert len(body["images"]) == 1, f"{len(body['images'])} images"
    img = decode_png_b64(body["images"][0], "images[0]")
    assert img.size == (W, H), f"size {img.size}"
    info = parse_info(body["info"])
    assert info.get("seed") == 77, f"info.seed: {info.get('seed')!r}"
    infotext = info["infotexts"][0]
    if "Model:" in infotext:
        assert "Model: sd1-tiny-file" in infotext, f"generated after switching models, infotext: {infotext!r}"


def test_override_settings_checkpoint_is_restored(http, diffctl_server, model_titles, restore_model):
    """A per-request `override_settings: {sd_model_checkpoint}` (what bots send instead of switching)
    uses that model for the request only: with override_settings_restore_afterwards (default true),
    A1111 puts the option back afterwards, so the next plain request uses the selected model again."""
    s = diffctl_server
    dir_title, file_title = model_titles
    r = http.post(s.sdapi + "/options", json={"sd_model_checkpoint": dir_title})
    assert r.status_code == 200, describe(r)

    r = _txt2img(http, s, seed=12, override_settings={"sd_model_checkpoint": file_title},
                 override_settings_restore_afterwards=True)
    assert r.status_code == 200, describe(r)
    infotext = parse_info(r.json()["info"])["infotexts"][0]
    assert "Model: sd1-tiny-file" in infotext, f"the override was not used: {infotext!r}"

    current = http.get(s.sdapi + "/options").json().get("sd_model_checkpoint")
    assert current == dir_title, (
        f"after a txt2img with override_settings={{'sd_model_checkpoint': {file_title!r}}} and "
        f"override_settings_restore_afterwards=true, GET options says {current!r}, expected {dir_title!r} back"
    )
    r = _txt2img(http, s, seed=12)
    infotext = parse_info(r.json()["info"])["infotexts"][0]
    assert "Model: sd1-tiny," in infotext, f"the next request without override used another model: {infotext!r}"


def test_ui_unknown_checkpoint_rejected(http, diffctl_server, model_titles, restore_model):
    s = diffctl_server
    r = http.post(s.sdapi + "/options", json={"sd_model_checkpoint": "no-such-model [0000000000]"})
    current = http.get(s.sdapi + "/options").json().get("sd_model_checkpoint")
    assert current in model_titles, f"options now name a checkpoint that does not exist: {current!r} ({describe(r)})"


def test_ui_interrupt_long_job(http, diffctl_server):
    s = diffctl_server
    _wait_idle(http, s)
    result = {}

    def run():
        try:
            result["resp"] = requests.post(
                s.sdapi + "/txt2img",
                json=dict(prompt="a long job", width=W, height=H, steps=LONG_STEPS, sampler_name="Euler a", seed=3),
                auth=s.auth,
                timeout=120,
            )
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e
        result["done_at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()

    # 1. progress moves (a UI shows a bar and the live preview).
    deadline = time.monotonic() + 60
    seen, preview = None, None
    while time.monotonic() < deadline and t.is_alive():
        r = http.get(s.sdapi + "/progress", params={"skip_current_image": "false"})
        assert r.status_code == 200, describe(r)
        p = r.json()
        if p["progress"] > 0:
            seen = seen or p
            if p.get("current_image"):
                preview = p["current_image"]
                break
        time.sleep(0.05)
    assert seen is not None, (
        f"progress never went above 0 while a {LONG_STEPS}-step txt2img ran "
        f"(thread alive: {t.is_alive()}, result: {result!r:.300})"
    )
    assert seen["state"]["job_count"] >= 1, f"job_count during a job: {seen['state']}"
    assert 0 < seen["progress"] <= 1, f"progress: {seen['progress']}"
    assert seen["state"]["sampling_steps"] in (LONG_STEPS, LONG_STEPS + 1), f"sampling_steps: {seen['state']}"
    assert preview is not None, (
        "progress?skip_current_image=false never carried a current_image during the job "
        f"(last progress {seen['progress']:.3f}, thread alive: {t.is_alive()})"
    )
    decode_png_b64(preview, "progress.current_image")

    # skip_current_image=true must not send the preview.
    r = http.get(s.sdapi + "/progress", params={"skip_current_image": "true"})
    assert r.status_code == 200 and r.json().get("current_image") is None, describe(r, 300)

    # 2. interrupt: the request returns soon, whatever it returns.
    assert t.is_alive(), f"the {LONG_STEPS}-step job ended before it could be interrupted: {result!r:.300}"
    t_interrupt = time.monotonic()
    r = http.post(s.sdapi + "/interrupt")
    assert r.status_code == 200, describe(r)
    t.join(timeout=60)
    assert not t.is_alive(), "txt2img did not return within 60 s of POST /sdapi/v1/interrupt"
    assert "error" not in result, f"txt2img request failed: {result['error']!r}"
    resp = result["resp"]
    assert resp.status_code == 200 or 400 <= resp.status_code < 600, describe(resp, 300)
    took = result["done_at"] - t_interrupt
    assert took < 60, f"txt2img returned {took:.1f} s after the interrupt"
    if resp.status_code == 200:
        for i, b64 in enumerate(resp.json().get("images", [])):
            decode_png_b64(b64, f"interrupted images[{i}]")

    # 3. the server is idle again, and the next job is not interrupted.
    _wait_idle(http, s, timeout=10)
    r = _txt2img(http, s, seed=8)
    assert r.status_code == 200, f"the first job after an interrupt: {describe(r)}"
    assert len(r.json()["images"]) == 1
    p = http.get(s.sdapi + "/progress").json()
    assert p["state"]["job_count"] == 0, f"after the job: {p['state']}"


def test_queued_jobs_counted(http, diffctl_server):
    """Two UIs generating at once: both answered, and progress counts the waiting job too."""
    s = diffctl_server
    _wait_idle(http, s)
    codes = []

    def run(seed):
        r = requests.post(s.sdapi + "/txt2img", auth=s.auth, timeout=120,
                          json=dict(prompt="queued", width=W, height=H, steps=25, sampler_name="Euler a", seed=seed))
        codes.append((r.status_code, r.text[:200] if r.status_code != 200 else ""))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    most = 0
    deadline = time.monotonic() + 60
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        p = http.get(s.sdapi + "/progress", params={"skip_current_image": "true"}).json()
        most = max(most, p["state"]["job_count"])
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=60)
    assert [c for c, _ in codes] == [200, 200], f"two concurrent txt2img: {codes}"
    assert most == 2, f"progress.state.job_count peaked at {most} with one job running and one waiting"
    _wait_idle(http, s, timeout=10)


def test_interrupt_when_idle(http, diffctl_server):
    r = http.post(diffctl_server.sdapi + "/interrupt")
    assert r.status_code == 200, describe(r)
    r = _txt2img(http, diffctl_server, seed=9)
    assert r.status_code == 200, f"interrupt while idle must not cancel the next job: {describe(r)}"
    assert len(r.json()["images"]) == 1


@pytest.mark.parametrize("path", ["/", "/sdapi/v1/sd-models", "/sdapi/v1/progress", "/controlnet/model_list", "/v1/models"])
def test_no_auth_is_401(diffctl_server, path):
    r = requests.get(diffctl_server.base_url + path, timeout=30)
    assert r.status_code == 401, describe(r, 300)
    r = requests.get(diffctl_server.base_url + path, auth=("user", "wrong"), timeout=30)
    assert r.status_code == 401, f"wrong password: {describe(r, 300)}"
    r = requests.get(diffctl_server.base_url + path, auth=("other", "pass"), timeout=30)
    assert r.status_code == 401, f"wrong user: {describe(r, 300)}"


def test_401_asks_for_basic_auth(diffctl_server):
    r = requests.get(diffctl_server.sdapi + "/sd-models", timeout=30)
    assert r.status_code == 401
    assert r.headers.get("www-authenticate", "").lower().startswith("basic"), (
        f"a 401 for HTTP Basic should carry 'WWW-Authenticate: Basic ...' (browsers need it): {dict(r.headers)}"
    )


def test_post_without_auth_is_401(diffctl_server):
    r = requests.post(diffctl_server.sdapi + "/txt2img", json={"prompt": "x", "width": W, "height": H, "steps": 1},
                      timeout=30)
    assert r.status_code == 401, describe(r, 300)
    r = requests.post(diffctl_server.base_url + "/v1/images/generations",
                      json={"prompt": "x", "size": f"{W}x{H}"}, timeout=30)
    assert r.status_code == 401, describe(r, 300)
    assert "error" in r.json(), f"OpenAI routes answer errors as {{'error': ...}}: {describe(r, 300)}"


def test_bearer_on_openai_routes(diffctl_server):
    r = requests.get(diffctl_server.base_url + "/v1/models", headers={"Authorization": "Bearer user:pass"}, timeout=30)
    assert r.status_code == 200, describe(r)
    body = r.json()
    assert body.get("object") == "list" and isinstance(body.get("data"), list), describe(r)
    assert any("sd1-tiny" in m.get("id", "") for m in body["data"]), describe(r)
    r = requests.get(diffctl_server.base_url + "/v1/models", headers={"Authorization": "Bearer user:nope"}, timeout=30)
    assert r.status_code == 401, describe(r, 300)
