"""The playground page in a real headless Chromium (Debian's chromium and chromium-driver, through Selenium):
type a prompt, watch the tokens stream in, hover one for its alternatives, see the loss curve."""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="nanogpt serve needs the [serve] extra")
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="the page test drives Chromium with selenium ([dev] extra)"
)
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serverthread import MODEL_ID, Server, greedy  # noqa: E402

from nanogpt.metrics import MetricsWriter  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import readme_figures  # noqa: E402


def chromium():
    """A headless Chromium, or a skip that says why not (.ci/run installs it with apt-get where it can)."""
    try:
        return readme_figures.start_chromium()
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture
def page(tmp_path):
    metrics_dir = tmp_path / "run"
    metrics_dir.mkdir()
    w = MetricsWriter(metrics_dir)
    for i in range(0, 201, 20):
        w.write("train", iter=i, tokens=i * 100, train_loss=3.0 - i / 100, lr=1e-3, mfu=None)
        if i % 100 == 0:
            w.write("eval", iter=i, tokens=i * 100, train_loss=3.0 - i / 100, val_loss=3.1 - i / 100, lr=1e-3, mfu=None)
    w.close()
    server = Server(step_seconds=0.04, metrics_path=metrics_dir / "metrics.jsonl")  # 40 tokens take ~2 s
    driver = chromium()
    try:
        yield server, driver
    finally:
        driver.quit()
        server.stop()


def set_range(driver, element_id: str, value) -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];e.dispatchEvent(new Event('input'));",
        element_id,
        str(value),
    )


def test_prompt_streams_tokens_with_probabilities_and_alternatives(page, tmp_path):
    server, driver = page
    driver.get(server.url + "/")
    wait = WebDriverWait(driver, 20)
    wait.until(lambda d: MODEL_ID in d.find_element(By.ID, "model").text)
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("ROMEO:")
    set_range(driver, "temperature", 0)  # greedy: the page must show exactly the model's text
    set_range(driver, "max_tokens", 40)
    assert driver.find_element(By.CSS_SELECTOR, "output[for=max_tokens]").text == "40"
    driver.find_element(By.ID, "generate").click()

    seen = set()  # token counts observed while generating: streaming shows them one by one
    deadline = time.monotonic() + 30
    while (n := len(driver.find_elements(By.CSS_SELECTOR, "#output .token"))) < 40:
        assert time.monotonic() < deadline, f"only {n} tokens arrived"
        seen.add(n)
        time.sleep(0.05)
    assert len([n for n in seen if 0 < n < 40]) >= 3, seen
    wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
    spans = driver.find_elements(By.CSS_SELECTOR, "#output .token")
    text = driver.execute_script(
        "return Array.from(document.querySelectorAll('#output .token')).map(s => s.textContent).join('')"
    )
    assert text == greedy(server, "ROMEO:", 40)
    assert "tokens/s" in driver.find_element(By.ID, "status").text
    probs = [float(s.get_attribute("data-p")) for s in spans]
    assert all(0 < p <= 1 for p in probs)
    shades = {s.value_of_css_property("background-color") for s in spans}
    assert len(shades) > 1  # shaded by probability, not one colour

    ActionChains(driver).move_to_element(spans[5]).perform()
    tooltip = driver.find_element(By.ID, "tooltip")
    wait.until(lambda d: tooltip.is_displayed())
    rows = tooltip.find_elements(By.CSS_SELECTOR, "tr")
    assert len(rows) == 5 and "chosen:" in tooltip.text and "%" in rows[0].text
    assert tooltip.find_elements(By.CSS_SELECTOR, "tr.chosen")  # greedy: the chosen token is among the top 5

    note = driver.find_element(By.ID, "loss_note").text
    assert "last 1.1000 at iteration 200" in note
    shot = tmp_path / "page.png"
    assert driver.save_screenshot(str(shot))
    width, height = struct.unpack(">II", shot.read_bytes()[16:24])
    assert (width, height) >= (800, 500)


def test_errors_show_on_the_page(page):
    server, driver = page
    driver.get(server.url + "/")
    WebDriverWait(driver, 20).until(lambda d: MODEL_ID in d.find_element(By.ID, "model").text)
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("\u263a")  # not in the model's vocabulary
    driver.find_element(By.ID, "generate").click()
    error = WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#output .error"))
    assert "not in the model's vocabulary" in error[0].text


def test_readme_figures_script(tiny_checkpoint, tmp_path):
    """scripts/readme_figures.py, which draws the README's figures, on a tiny run."""
    chromium().quit()  # skips here, with the reason, where Chromium is missing
    readme_figures.main([f"--out_dir={tiny_checkpoint}", f"--docs={tmp_path}", "--max_tokens=20"])
    for name in ("loss.png", "playground.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 5000
