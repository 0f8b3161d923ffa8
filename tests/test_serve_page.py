"""The playground page in a real headless Chromium (Debian's chromium and chromium-driver, through Selenium):
type a prompt, watch the tokens stream in, hover one for its alternatives, see the loss curve."""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="nanogpt serve needs the [serve] extra")
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="the page test drives Chromium with selenium ([dev] extra)"
)
import serverthread  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serverthread import MODEL_ID, Server, greedy  # noqa: E402

from nanogpt.inspect_model import inspect  # noqa: E402
from nanogpt.metrics import MetricsWriter  # noqa: E402
from nanogpt.model import GPT, GPTConfig  # noqa: E402
from nanogpt.tokenizer import CharTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import readme_figures  # noqa: E402


def chromium():
    """A headless Chromium, or a skip that says why not on a developer's machine; in CI (CI=true), where
    .ci/run installs it, a missing or broken Chromium fails the test instead (as tiny Shakespeare does)."""
    try:
        return readme_figures.start_chromium()
    except RuntimeError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{e} (CI=true: the page tests must run in CI)")
        pytest.skip(str(e))


SAMPLES = {0: "xq$Zk e3!", 100: "ROMEO: I thene", 200: "ROMEO:\nWhat say you?"}


@pytest.fixture
def page(tmp_path):
    metrics_dir = tmp_path / "run"
    metrics_dir.mkdir()
    w = MetricsWriter(metrics_dir)
    for i in range(0, 201, 20):
        w.write("train", iter=i, tokens=i * 100, train_loss=3.0 - i / 100, lr=1e-3, mfu=None)
        if i % 100 == 0:
            w.write("eval", iter=i, tokens=i * 100, train_loss=3.0 - i / 100, val_loss=3.1 - i / 100, lr=1e-3, mfu=None)
            w.write("sample", iter=i, tokens=i * 100, val_loss=3.1 - i / 100, prompt="\n", text=SAMPLES[i])
    w.close()
    driver = chromium()  # first: where it skips or fails, no server is left running
    try:
        server = Server(step_seconds=0.04, metrics_path=metrics_dir / "metrics.jsonl")  # 40 tokens take ~2 s
        try:
            yield server, driver
        finally:
            server.stop()
    finally:
        driver.quit()


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
    assert width >= 800 and height >= 500, (width, height)


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
    args = [f"--out_dir={tiny_checkpoint}", f"--docs={tmp_path}", "--max_tokens=20", "--views_prompt=ROMEO:\nKING"]
    readme_figures.main(args)  # the views' prompt in the tiny corpus's characters
    for name in ("loss.png", "playground.png", "attention.png", "layers.png", "step.png", "timeline.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 5000, name


def test_the_timeline_lists_the_samples_written_while_training(page, tmp_path):
    server, driver = page
    driver.get(server.url + "/")
    items = WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#timeline li"))
    assert driver.find_element(By.ID, "timeline_box").is_displayed()
    texts = [li.text for li in items]
    assert len(texts) == 3
    for text, (i, sample) in zip(texts, SAMPLES.items()):
        assert f"iteration {i}, val loss {3.1 - i / 100:.3f}" in text and sample.splitlines()[-1] in text
    assert driver.save_screenshot(str(tmp_path / "timeline.png"))


# ---------------------------------------------------------------- inside the model: the four views


def two_layers():
    """tiny_model with 2 layers (2 heads each), so that the views have more than one of everything."""
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=len(serverthread.CHARS), block_size=serverthread.BLOCK, n_layer=2, n_head=2, n_embd=32
    )
    model = GPT(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model, CharTokenizer(serverthread.CHARS)


@pytest.fixture
def inside(monkeypatch):
    monkeypatch.setattr(serverthread, "tiny_model", two_layers)
    driver = chromium()  # first: where it skips or fails, no server is left running
    try:
        server = Server()
        try:
            driver.get(server.url + "/")
            # the page inspects its starting prompt ("ROMEO:") at once: one box per character
            WebDriverWait(driver, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#strip .tok")) == 6)
            yield server, driver
        finally:
            server.stop()
    finally:
        driver.quit()


def strip(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#strip .tok")


def open_view(driver, name: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f".tab[data-view={name}]").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, f"view_{name}").is_displayed())


def shoot(driver, to) -> None:
    """A screenshot of the views (scrolled to them), the strip at the top."""
    driver.execute_script("document.querySelector('.inside').scrollIntoView()")
    assert driver.save_screenshot(str(to))


def expected(server, text: str, top: int = 5) -> dict:
    return inspect(server.model, server.tok, server.tok.encode(text), top=top)


def test_the_tokens_view_shows_the_prompt_as_the_model_reads_it(inside, tmp_path):
    server, driver = inside
    assert [s.text for s in strip(driver)] == list("ROMEO:")
    assert strip(driver)[0].get_attribute("title") == f'token 0: id {server.tok.encode("R")[0]} "R"'
    assert "6 tokens, 2 layers, 2 heads" in driver.find_element(By.ID, "inspect_status").text
    shoot(driver, tmp_path / "tokens.png")
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("KING:")
    open_view(driver, "attention")  # a view opened after the prompt changed inspects the new prompt
    WebDriverWait(driver, 10).until(lambda d: [s.text for s in strip(d)] == list("KING:"))
    assert len(driver.find_elements(By.CSS_SELECTOR, "#heads canvas")) == 4


def shading(span) -> float:
    """The alpha of a strip token's background: the selected head's attention to it."""
    rgba = span.value_of_css_property("background-color")
    return float(rgba.rsplit(",", 1)[1].rstrip(")")) if rgba.startswith("rgba") else 1.0


def test_the_attention_view_draws_every_head_and_shades_what_it_reads(inside, tmp_path):
    server, driver = inside
    open_view(driver, "attention")
    canvases = driver.find_elements(By.CSS_SELECTOR, "#heads canvas")
    assert len(canvases) == 2 * 2  # layers x heads
    picture = "return document.querySelector('#heads canvas').toDataURL()"
    before = driver.execute_script(picture)
    strip(driver)[2].click()  # "M": query 2
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(picture) != before)  # its row turns blue
    attention = expected(server, "ROMEO:")["attention"]
    got = [shading(s) for s in strip(driver)]
    assert got[3:] == [0, 0, 0]  # causal: the future gets no attention
    assert got[:3] == pytest.approx(attention[0][0][2][:3], abs=2e-3)
    driver.find_elements(By.CSS_SELECTOR, "#heads canvas")[3].click()  # layer 2, head 2
    WebDriverWait(driver, 10).until(
        lambda d: "selected" in d.find_elements(By.CSS_SELECTOR, ".head")[3].get_attribute("class")
    )
    assert [shading(s) for s in strip(driver)][:3] == pytest.approx(attention[1][1][2][:3], abs=2e-3)
    shoot(driver, tmp_path / "attention.png")


def predictions(driver) -> list[list[str]]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#layers .layer-row")
    return [[p.text for p in row.find_elements(By.CSS_SELECTOR, ".pred")] for row in rows]


def test_the_layer_by_layer_view_lists_each_layers_predictions(inside, tmp_path):
    server, driver = inside
    open_view(driver, "layers")
    lens = expected(server, "ROMEO:")["lens"]

    def as_text(layer, pos):
        return [f"{json.dumps(e['text'])} {100 * e['prob']:.1f}%" for e in lens[layer][pos]]

    assert predictions(driver) == [as_text(0, 5), as_text(1, 5)]  # the last token at first
    strip(driver)[1].click()
    WebDriverWait(driver, 10).until(lambda d: predictions(d) == [as_text(0, 1), as_text(1, 1)])
    assert "(output)" in driver.find_elements(By.CSS_SELECTOR, ".layer-label")[1].text
    shoot(driver, tmp_path / "layers.png")


def bars(driver) -> tuple[int, int]:
    """(bars, bars not cut off)."""
    return len(driver.find_elements(By.CSS_SELECTOR, "#bars .bar")), len(
        driver.find_elements(By.CSS_SELECTOR, "#bars .bar:not(.cut)")
    )


def test_the_step_view_shows_the_distribution_and_appends_a_chosen_token(inside, tmp_path):
    server, driver = inside
    set_range(driver, "temperature", 1)
    open_view(driver, "step")
    WebDriverWait(driver, 10).until(lambda d: bars(d) == (20, 20))
    top = expected(server, "ROMEO:", top=20)["lens"][-1][-1]
    labels = [b.text.split("\n")[0] for b in driver.find_elements(By.CSS_SELECTOR, ".bar-label")]
    assert labels == [json.dumps(e["text"]) for e in top]
    driver.execute_script(
        "const e = document.getElementById('top_k'); e.value = 3; e.dispatchEvent(new Event('input'));"
    )
    WebDriverWait(driver, 10).until(lambda d: bars(d) == (20, 3))  # the cut-off, live
    set_range(driver, "top_p", 0.05)
    WebDriverWait(driver, 10).until(lambda d: bars(d) == (20, 1))
    set_range(driver, "top_p", 1)
    set_range(driver, "temperature", 0)
    WebDriverWait(driver, 10).until(lambda d: bars(d) == (20, 1))
    shoot(driver, tmp_path / "step.png")
    driver.find_elements(By.CSS_SELECTOR, "#bars .bar")[1].click()  # the second likeliest token
    chosen = "ROMEO:" + top[1]["text"]
    WebDriverWait(driver, 10).until(lambda d: len(strip(d)) == 7)
    assert driver.find_element(By.ID, "prompt").get_attribute("value") == chosen
    WebDriverWait(driver, 10).until(lambda d: bars(d)[0] == 20)
    after = expected(server, chosen, top=20)["lens"][-1][-1]
    labels = [b.text for b in driver.find_elements(By.CSS_SELECTOR, ".bar-label")]
    assert labels[0] == json.dumps(after[0]["text"])
    driver.find_element(By.ID, "step_sample").click()  # temperature 0: the likeliest
    WebDriverWait(driver, 10).until(lambda d: len(strip(d)) == 8)
    assert driver.find_element(By.ID, "prompt").get_attribute("value") == chosen + after[0]["text"]
