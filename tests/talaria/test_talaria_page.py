"""Talaria end to end on a small random model: the analysis (real micro-benchmarks, the
compressor's sensitivities), the page in real headless Chromium (a what-if changes the
predictions, exactly as ``roofline.predict`` computes them; sort, filter, search; export, then
the recipe loads in ``parse_recipe`` and ``afmkit compress palettize --recipe``; a refused recipe
shows its error; Verify measures what was predicted), and bad input one line each."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import threading
import time

import jax
import pytest

import afmkit
from afmkit.cli import EXIT_USER_ERROR, main
from afmkit.compress import allocate, sensitivity
from afmkit.compress.recipe import parse_recipe
from afmkit.config import get_size
from afmkit.files import packaged_data
from afmkit.interop import native
from afmkit.model.palettized import PalettizedWeight
from afmkit.model.transformer import init_params
from afmkit.talaria.analysis import analyze_model, eval_text_of
from afmkit.talaria.app import create_app
from afmkit.talaria.roofline import predict
from afmkit.talaria.settings import TalariaSettings

CONFIG = dataclasses.replace(
    get_size("afm-tiny"), name="afm-micro", d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128
)
CALIBRATION = str(packaged_data("tinyshakespeare/input_head.txt"))
SETTINGS = TalariaSettings(
    calibration=CALIBRATION,
    calibration_tokens=256,
    seq_len=64,
    context=32,
    repeats=2,
    eval_chars=3000,
    decode_tokens=8,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    old = os.environ.get("AFMKIT_CACHE")
    os.environ["AFMKIT_CACHE"] = str(tmp_path_factory.mktemp("talaria-cache"))
    yield
    if old is None:
        os.environ.pop("AFMKIT_CACHE")
    else:
        os.environ["AFMKIT_CACHE"] = old


@pytest.fixture(scope="module")
def micro(smollm2, cache):
    return afmkit.LanguageModel(CONFIG, init_params(CONFIG, jax.random.PRNGKey(3)), smollm2.tokenizer, name="afm-micro")


@pytest.fixture(scope="module")
def analysis(micro):
    return analyze_model(micro, SETTINGS, quiet=True)


def test_the_table_holds_every_operation_and_predictions_add_up(micro, analysis):
    names = sensitivity.matrix_names(micro.params)
    rows = {r["name"]: r for r in analysis["rows"]}
    for i in range(CONFIG.n_layers):
        for kind in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "attention", "attn_norm", "mlp_norm"):
            assert f"layers.{i}.{kind}" in rows
    assert {"embed", "output_head", "final_norm"} <= set(rows)
    assert analysis["matrices"] == names
    # Sensitivities are the compressor's cached ones.
    [cached] = [a for a in sensitivity.find_analyses() if a.fingerprint == analysis["model"]["fingerprint"]]
    mixed = {n: (2, 3, 4, 8)[i % 4] for i, n in enumerate(names)}
    p = predict(analysis, mixed)
    assert math.isclose(p["loss_rise"], sum(cached.sensitivity[n][b] for n, b in mixed.items()), rel_tol=1e-12)
    # Bits per weight as the compressor's allocation counts them.
    expected = allocate.bits_per_weight(cached.shapes, mixed, group_rows=16, per_row_scale=True)
    assert math.isclose(p["bits_per_weight"], expected, rel_tol=1e-12)
    # A matrix's FLOPs are 2 K N per token; the float matrix's decode bytes its fp32 weights.
    wq = rows["layers.0.wq"]
    assert wq["flops_decode"] == 2 * CONFIG.d_model * CONFIG.n_heads * CONFIG.head_dim
    assert wq["bytes_decode"]["float"] == 4 * wq["k"] * wq["n"] + 4 * (wq["k"] + wq["n"])
    # Fewer bits: fewer bytes, so the bandwidth-bound decode estimate falls on every profile.
    two, eight = predict(analysis, dict.fromkeys(names, 2)), predict(analysis, dict.fromkeys(names, 8))
    assert two["size_bytes"] < eight["size_bytes"]
    for name in two["profiles"]:
        assert two["profiles"][name]["decode_s"] < eight["profiles"][name]["decode_s"]
    assert all(r["measured_decode"][f] >= 0 for r in analysis["rows"] for f in r["measured_decode"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(micro, analysis):
    import uvicorn

    text, _ = eval_text_of(SETTINGS, analysis["sensitivity"]["calibration"])
    port = _free_port()
    app = create_app(analysis, model=micro, eval_text=text, settings=SETTINGS)
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    instance.should_exit = True
    thread.join(timeout=10)


def _browser(tmp_path):
    import shutil

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not binary or not shutil.which(driver):
        pytest.skip("headless Chromium is not installed (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chrome-profile'}")
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def test_page_what_if_export_refusal_and_verify_in_headless_chromium(server, micro, analysis, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser = _browser(tmp_path)
    try:
        wait = WebDriverWait(browser, 60)
        ready = lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"  # noqa: E731
        browser.get(server)
        wait.until(ready)
        text = lambda i: browser.find_element(By.ID, i).text  # noqa: E731
        names = analysis["matrices"]

        def shown_matches(bits):
            p = predict(analysis, bits)
            assert text("pred-ppl") == f"{p['perplexity']:.2f}"
            assert text("pred-size") == f"{p['size_bytes'] / 1e6:.2f} MB"
            assert text("pred-decode-measured") == f"{p['measured_decode_s'] * 1e3:.3f} ms"
            assert text("pred-decode") == f"{p['profiles']['this-cpu']['decode_s'] * 1e3:.3f} ms"
            return p

        before = shown_matches(dict.fromkeys(names, 4))  # the page opens at 4 bits everywhere
        # What-if by type and layer range: every w_down to 2 bits.
        Select(browser.find_element(By.ID, "set-kind")).select_by_value("w_down")
        Select(browser.find_element(By.ID, "set-bits")).select_by_value("2")
        browser.find_element(By.ID, "apply-bits").click()
        chosen = {n: 2 if n.endswith("w_down") else 4 for n in names}
        after = shown_matches(chosen)
        assert after["perplexity"] > before["perplexity"] and after["size_bytes"] < before["size_bytes"]
        # One matrix at a time, from its row.
        Select(browser.find_element(By.CSS_SELECTOR, 'select.row-bits[data-name="layers.1.wq"]')).select_by_value("8")
        chosen["layers.1.wq"] = 8
        shown_matches(chosen)
        # Another profile: the roofline estimate follows it.
        Select(browser.find_element(By.ID, "profile")).select_by_value("h200")
        h200 = predict(analysis, chosen)["profiles"]["h200"]["decode_s"]
        assert text("pred-decode") == f"{h200 * 1e3:.3f} ms"
        # Search, filter and sort the table.
        browser.find_element(By.ID, "search").send_keys("layers.1.")
        assert text("row-count") == f"10 of {len(analysis['rows'])} operations"
        Select(browser.find_element(By.ID, "filter-kind")).select_by_value("w_up")
        assert text("row-count") == f"1 of {len(analysis['rows'])} operations"
        browser.find_element(By.ID, "search").clear()
        browser.execute_script("document.getElementById('search').dispatchEvent(new Event('input'))")
        Select(browser.find_element(By.ID, "filter-kind")).select_by_value("")
        browser.find_element(By.CSS_SELECTOR, 'th[data-key="params"]').click()  # descending
        first = browser.find_element(By.CSS_SELECTOR, "#ops tbody tr").get_attribute("data-name")
        assert first == max(analysis["rows"], key=lambda r: r["params"])["name"]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#strip div")) == CONFIG.n_layers

        # Export: the JSON parse_recipe accepts for this model, and afmkit compress takes unchanged.
        browser.find_element(By.ID, "export").click()
        wait.until(ec.visibility_of_element_located((By.ID, "export-json")))
        exported = json.loads(text("export-json"))
        recipe = parse_recipe(
            exported,
            source="exported",
            fingerprint=sensitivity.model_fingerprint(micro.config, micro.params),
            matrices=sensitivity.matrix_names(micro.params),
        )
        assert recipe.bits == chosen
        path = tmp_path / "recipe.json"
        path.write_text(text("export-json"))
        float_dir = native.save_checkpoint(tmp_path / "float", CONFIG, micro.params, micro.tokenizer)
        out = tmp_path / "compressed"
        argv = ["compress", "palettize", "--model", str(float_dir), "--recipe", str(path), "--calibration"]
        argv += [CALIBRATION, "--calibration-tokens", "256", "--seq-len", "64", "--out", str(out), "--quiet"]
        assert main(argv) == 0
        loaded = afmkit.load(out)
        assert isinstance(loaded.params["layers"][1]["wq"], PalettizedWeight)
        assert loaded.params["layers"][1]["wq"].bits == 8 and loaded.params["layers"][0]["w_down"].bits == 2

        # A recipe for another model is refused with parse_recipe's line, shown on the page.
        other = dict(exported, model={"name": "someone-else", "fingerprint": "0123456789abcdef"})
        browser.find_element(By.ID, "recipe-input").send_keys(json.dumps(other))
        browser.find_element(By.ID, "load-recipe").click()
        wait.until(lambda d: d.find_element(By.ID, "recipe-error").text != "")
        assert "the recipe was made for someone-else" in text("recipe-error")
        assert "make a recipe for this model" in text("recipe-error")

        # Verify: compress in the background; measured bits per weight equal the predicted ones.
        browser.find_element(By.ID, "verify").click()
        wait.until(ec.visibility_of_element_located((By.ID, "verify-table")))
        cells = browser.find_elements(By.CSS_SELECTOR, '#verify-table tr[data-metric="bpw"] td')
        assert cells[1].text == cells[2].text == f"{predict(analysis, chosen)['bits_per_weight']:.3f}"
        ppl = browser.find_elements(By.CSS_SELECTOR, '#verify-table tr[data-metric="perplexity"] td')[2].text
        assert float(ppl) > 1 and text("verify-error") == ""

        # The page opens (navigation to ready, the analysis fetched and drawn) in under 2 s (issue
        # 14's target): reloads, so Chromium's own first start is not counted, and the best of
        # three, so the other jobs on a shared CPU are not counted either.
        opened = []
        for _ in range(3):
            browser.refresh()
            wait.until(ready)
            opened.append(browser.execute_script("return window.talariaReadyMs") / 1e3)
        assert min(opened) < 2.0, f"the page took {min(opened):.2f} s to open"
    finally:
        browser.quit()


def one_line_error(capsys, *argv) -> str:
    assert main(["talaria", *argv]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_before_the_model_loads(capsys):
    # A model path that does not exist proves the check came first.
    missing = "/nonexistent/model"
    assert "unknown device profile 'tpu-v9'" in one_line_error(capsys, "--model", missing, "--device", "tpu-v9")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(capsys, "--model", missing, "--port", str(port))
    assert "--context must be positive" in one_line_error(capsys, "--model", missing, "--context", "0")
