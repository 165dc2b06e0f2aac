"""`diffctl serve` driven by webuiapi, the Python client most A1111 scripts use."""

from __future__ import annotations

import webuiapi

from clientutil import (
    H,
    MASK_BOX,
    STEPS,
    W,
    control_image,
    init_image,
    mask_image,
    mean_abs_diff,
    outside_box_mask_diff,
)

PROMPT = "a red apple on a wooden table"


def _txt2img(api, **kw):
    # A fresh alwayson_scripts each call: webuiapi's default is a shared dict that a ControlNet call
    # mutates, which would leak the unit into every later request.
    args = dict(prompt=PROMPT, width=W, height=H, steps=STEPS, cfg_scale=7.0, sampler_name="Euler a",
                alwayson_scripts={})
    args.update(kw)
    try:
        return api.txt2img(**args)
    except RuntimeError as e:  # webuiapi raises RuntimeError(status, body) on non-200
        raise AssertionError(f"POST /sdapi/v1/txt2img {args} failed: {e}") from None


def test_txt2img_images_and_info(webui):
    res = _txt2img(webui, seed=1234, batch_size=2)
    assert len(res.images) == 2, f"batch_size=2 should give 2 images, got {len(res.images)}; json keys {list(res.json)}"
    for i, img in enumerate(res.images):
        assert img.size == (W, H), f"image {i}: size {img.size}, asked for {W}x{H}"
        assert img.format == "PNG", f"image {i}: format {img.format}"
    info = res.info
    assert isinstance(info, dict), f"info should be a JSON string decoding to an object, got {info!r:.500}"
    for key in ("seed", "all_seeds", "infotexts"):
        assert key in info, f"info lacks {key!r}: {sorted(info)}"
    assert info["seed"] == 1234, f"info.seed {info['seed']!r}, asked for 1234"
    assert info["all_seeds"][:2] == [1234, 1235], f"A1111 numbers a batch's seeds seed, seed+1: {info['all_seeds']}"
    assert len(info["infotexts"]) == 2, f"one infotext per image: {info['infotexts']}"
    assert PROMPT in info["infotexts"][0], f"infotext should start with the prompt: {info['infotexts'][0]!r}"
    assert "Seed: 1234" in info["infotexts"][0], f"infotext lacks 'Seed: 1234': {info['infotexts'][0]!r}"
    assert isinstance(res.parameters, dict) and res.parameters.get("prompt") == PROMPT, (
        f"parameters should echo the request: {res.parameters!r:.500}"
    )
    assert res.images[0].tobytes() != res.images[1].tobytes(), "the two seeds gave identical images"


def test_seed_reproducible(webui):
    a = _txt2img(webui, seed=42).image
    b = _txt2img(webui, seed=42).image
    c = _txt2img(webui, seed=43).image
    assert a.tobytes() == b.tobytes(), (
        f"same seed, same request gave different pixels (mean |diff| {mean_abs_diff(a, b):.3f})"
    )
    assert a.tobytes() != c.tobytes(), "seeds 42 and 43 gave identical pixels: is the seed ignored?"


def test_random_seed_reported(webui):
    res = _txt2img(webui, seed=-1)
    seed = res.info.get("seed") if isinstance(res.info, dict) else None
    assert isinstance(seed, int) and seed >= 0, f"seed=-1 must be replaced by the seed used, info.seed={seed!r}"
    again = _txt2img(webui, seed=seed).image
    assert again.tobytes() == res.image.tobytes(), f"re-running with the reported seed {seed} gave another image"


def test_img2img_inpaint_with_mask(webui):
    init = init_image()
    mask = mask_image()
    try:
        res = webui.img2img(
            images=[init],
            mask_image=mask,
            inpainting_fill=1,
            denoising_strength=0.7,
            prompt=PROMPT,
            width=W,
            height=H,
            steps=STEPS,
            seed=7,
            sampler_name="Euler a",
            alwayson_scripts={},
        )
    except RuntimeError as e:
        raise AssertionError(f"POST /sdapi/v1/img2img with a mask failed: {e}") from None
    assert len(res.images) == 1, f"expected 1 image, got {len(res.images)}"
    out = res.image
    assert out.size == (W, H), f"img2img result size {out.size}, asked for {W}x{H}"
    inside = mean_abs_diff(out, init, box=(MASK_BOX[0], MASK_BOX[1], MASK_BOX[2] + 1, MASK_BOX[3] + 1))
    # mask_blur=4 (webuiapi's default) feathers the edge; 8 px away the original must be pasted back.
    outside = outside_box_mask_diff(out, init, MASK_BOX, margin=8)
    assert inside > 3.0, f"the masked region barely changed (mean |diff| {inside:.2f}) at denoising 0.7"
    assert outside < 2.0, (
        f"pixels far outside the mask changed (mean |diff| {outside:.2f}); A1111 pastes the original back there"
    )
    assert isinstance(res.info, dict) and res.info.get("seed") == 7, f"info: {res.info!r:.500}"


def test_img2img_inpaint_whole_picture_keeps_unmasked(webui):
    """inpaint_full_res=False ("Whole picture"): A1111 still pastes the original back outside the
    mask (processing.py builds overlay_images for both inpaint areas; apply_overlay after decoding)."""
    init = init_image()
    try:
        res = webui.img2img(
            images=[init], mask_image=mask_image(), inpainting_fill=1, inpaint_full_res=False,
            denoising_strength=0.7, prompt=PROMPT, width=W, height=H, steps=STEPS, seed=7,
            sampler_name="Euler a", alwayson_scripts={},
        )
    except RuntimeError as e:
        raise AssertionError(f"POST /sdapi/v1/img2img (whole picture) failed: {e}") from None
    out = res.image
    assert out.size == (W, H), f"size {out.size}"
    inside = mean_abs_diff(out, init, box=(MASK_BOX[0], MASK_BOX[1], MASK_BOX[2] + 1, MASK_BOX[3] + 1))
    outside = outside_box_mask_diff(out, init, MASK_BOX, margin=8)
    assert inside > 3.0, f"the masked region barely changed (mean |diff| {inside:.2f}) at denoising 0.7"
    assert outside < 2.0, (
        f"inpaint_full_res=False: pixels 8+ px outside the mask changed by mean |diff| {outside:.2f} "
        f"(inside: {inside:.2f}); A1111 pastes the original image back over the unmasked area"
    )


def test_img2img_without_mask(webui):
    init = init_image()
    try:
        res = webui.img2img(
            images=[init], denoising_strength=0.5, prompt=PROMPT, width=W, height=H, steps=STEPS, seed=3,
            alwayson_scripts={},
        )
    except RuntimeError as e:
        raise AssertionError(f"POST /sdapi/v1/img2img failed: {e}") from None
    assert res.image.size == (W, H)
    assert mean_abs_diff(res.image, init) > 1.0, "img2img at denoising 0.5 returned the init image unchanged"


def test_controlnet_unit(webui):
    models = webui.controlnet_model_list()
    assert any("cn-a" in m for m in models), f"/controlnet/model_list lacks cn-a: {models}"
    modules = webui.controlnet_module_list()
    assert "canny" in modules, f"/controlnet/module_list lacks canny: {modules}"

    unit = webuiapi.ControlNetUnit(image=control_image(), module="canny", model="cn-a", processor_res=64,
                                   threshold_a=100, threshold_b=200)
    with_cn = _txt2img(webui, seed=5, controlnet_units=[unit])
    without = _txt2img(webui, seed=5)
    assert with_cn.image.size == (W, H), f"size {with_cn.image.size}"
    # The ControlNet extension appends the detected map to the images; the first one is the generation.
    d = mean_abs_diff(with_cn.images[0], without.image)
    assert d > 0.5, f"a ControlNet unit at weight 1 did not change the image (mean |diff| {d:.3f}): unit ignored?"

    # The full title the model list gives must work too.
    full = next(m for m in models if "cn-a" in m)
    unit_full = webuiapi.ControlNetUnit(image=control_image(), module="canny", model=full, processor_res=64,
                                        threshold_a=100, threshold_b=200)
    again = _txt2img(webui, seed=5, controlnet_units=[unit_full])
    assert again.images[0].tobytes() == with_cn.images[0].tobytes(), (
        f"model={full!r} and model='cn-a' gave different images"
    )


def test_model_list_and_switch(webui, model_titles, restore_model):
    dir_title, file_title = model_titles
    names = webui.util_get_model_names()
    assert dir_title in names and file_title in names, f"util_get_model_names(): {names}"

    webui.util_set_model(file_title)
    current = webui.get_options().get("sd_model_checkpoint")
    assert current == file_title, f"after util_set_model({file_title!r}) options say {current!r}"
    assert webui.util_get_current_model() == file_title
    res = _txt2img(webui, seed=11)
    assert res.image.size == (W, H)
    infotext = res.info["infotexts"][0]
    if "Model:" in infotext:
        assert "Model: sd1-tiny-file" in infotext, f"generated after the switch, infotext names another model: {infotext!r}"

    webui.set_options({"sd_model_checkpoint": dir_title})
    current = webui.get_options().get("sd_model_checkpoint")
    assert current == dir_title, f"after set_options back to {dir_title!r} options say {current!r}"


def test_samplers_and_lists(webui):
    samplers = webui.util_get_sampler_names()
    assert "Euler a" in samplers, f"samplers: {samplers}"
    assert "DPM++ 2M" in samplers, f"samplers: {samplers}"
    schedulers = webui.util_get_scheduler_names()
    assert schedulers, "GET /sdapi/v1/schedulers is empty"
    loras = webui.get_loras()
    assert any(l.get("name") == "kohya" for l in loras), f"GET /sdapi/v1/loras lacks kohya: {loras}"
    for getter in (webui.get_upscalers, webui.get_sd_vae, webui.get_embeddings):
        value = getter()
        assert isinstance(value, (list, dict)), f"{getter.__name__}: {value!r:.300}"


def test_lora_prompt_tag_changes_image(webui):
    plain = _txt2img(webui, seed=99).image
    with_lora = _txt2img(webui, prompt=PROMPT + " <lora:kohya:0.8>", seed=99)
    d = mean_abs_diff(plain, with_lora.image)
    assert d > 0.5, f"<lora:kohya:0.8> did not change the image at the same seed (mean |diff| {d:.3f})"
    infotext = with_lora.info["infotexts"][0]
    assert "<lora:kohya:0.8>" in infotext, f"A1111 keeps the LoRA tag in the infotext's prompt: {infotext!r}"


def test_png_info_roundtrip(webui):
    res = _txt2img(webui, seed=21)
    info = webui.png_info(res.image)
    text = info.info if isinstance(info.info, str) else str(info.info)
    assert "Seed: 21" in text, f"png-info of a generated image should give its infotext, got {info.json!r:.500}"


def test_progress_idle(webui):
    p = webui.get_progress()
    assert p["state"]["job_count"] == 0, f"idle server reports jobs: {p!r:.500}"
    assert "progress" in p and "eta_relative" in p, f"progress fields: {sorted(p)}"
