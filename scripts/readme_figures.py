"""Draw the README's figures from a trained run: its loss curve, and the playground page in Chromium.

    python scripts/readme_figures.py [--out_dir=out-shakespeare-char] [--docs=docs] [--prompt=ROMEO:]

Writes <docs>/loss.png (`nanogpt plot`) and <docs>/playground.png: the run served by `nanogpt serve` in a
background thread, the page opened in a headless Chromium (Debian: apt-get install chromium
chromium-driver), the prompt typed, the generated text streamed, and the pointer resting on a token so
that its alternatives show. Then the "Inside the model" views on --views_prompt, one PNG each:
<docs>/attention.png, layers.png and step.png, and timeline.png (the samples written while training) when
the run's metrics.jsonl has them.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def start_chromium(width: int = 1200, height: int = 760):
    """A headless Chromium driven by Selenium, or RuntimeError saying what is missing."""
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        raise RuntimeError("Chromium and its driver are not installed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    try:
        return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    except WebDriverException as e:
        raise RuntimeError(f"Chromium would not start: {e.msg}") from None


def screenshot_playground(url: str, to: Path, prompt: str, max_tokens: int):
    """The page after a generation, as a PNG; returns the driver, still open, for the views."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = start_chromium()
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "context" in d.find_element(By.ID, "model").text)
        box = driver.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(prompt)
        driver.execute_script(
            "const e = document.getElementById('max_tokens'); e.value = arguments[0];"
            "e.dispatchEvent(new Event('input'));",
            str(max_tokens),
        )
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#output .token")) >= max_tokens)
        wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
        spans = driver.find_elements(By.CSS_SELECTOR, "#output .token")
        ActionChains(driver).move_to_element(spans[len(spans) // 3]).perform()
        time.sleep(0.3)  # let the tooltip and the canvas settle
        driver.save_screenshot(str(to))
        ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "h1")).perform()  # the tooltip away
        return driver
    except BaseException:
        driver.quit()
        raise


VIEWS_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"


def set_value(driver, element_id: str, value) -> None:
    """Set a control as the student would, so that the page's listeners run."""
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];e.dispatchEvent(new Event('input'));",
        element_id,
        str(value),
    )


def open_view(driver, name: str, wait) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f".tab[data-view={name}]").click()
    wait.until(lambda d: d.find_element(By.ID, f"view_{name}").is_displayed())
    wait.until(lambda d: "tokens," in d.find_element(By.ID, "inspect_status").text)  # inspected, not inspecting


def shoot(driver, selector: str, to: Path) -> Path:
    """One element as a PNG, scrolled into the (tall) window: Chromium clips an element to the viewport."""
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.CSS_SELECTOR, selector)
    driver.execute_script("arguments[0].scrollIntoView()", element)
    time.sleep(0.2)  # let the canvases settle
    element.screenshot(str(to))
    return to


def shoot_views(driver, docs: Path, prompt: str) -> list[Path]:
    """On the open page: the prompt inspected, then each view's section (and the timeline) as a PNG."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60)
    driver.set_window_size(1100, 1500)
    set_value(driver, "prompt", prompt)
    set_value(driver, "temperature", 0.8)
    set_value(driver, "top_p", 0.9)  # the step view then shows a cut-off
    driver.execute_script("document.getElementById('inspect_status').textContent = '';")
    open_view(driver, "attention", wait)
    tokens = driver.find_elements(By.CSS_SELECTOR, "#strip .tok")
    tokens[len(tokens) * 2 // 3].click()  # a query with some text behind it
    maps = driver.find_elements(By.CSS_SELECTOR, "#heads canvas")
    maps[-1].click()  # the last layer's last head: the text shaded by it
    written = [shoot(driver, ".inside", docs / "attention.png")]
    open_view(driver, "layers", wait)
    written.append(shoot(driver, ".inside", docs / "layers.png"))
    # the step view after a word's end: the next word's first letter is open, so the bars spread out
    set_value(driver, "prompt", prompt.rsplit(" ", 1)[0] + " ")
    open_view(driver, "step", wait)
    written.append(shoot(driver, ".inside", docs / "step.png"))
    if driver.find_element(By.ID, "timeline_box").is_displayed():
        # a small picture of the whole story: five samples, first to last, the others hidden
        driver.execute_script(
            "const items = Array.from(document.querySelectorAll('#timeline li'));"
            "const keep = new Set([0, 1, 2, 3, 4].map((i) => Math.round(i * (items.length - 1) / 4)));"
            "items.forEach((li, i) => { li.hidden = !keep.has(i); });"
            "document.getElementById('timeline').style.maxHeight = 'none';"
        )
        written.append(shoot(driver, "#timeline_box", docs / "timeline.png"))
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="out-shakespeare-char", help="the trained run (default out-shakespeare-char)")
    p.add_argument("--docs", default="docs", help="where the PNGs go (default docs)")
    p.add_argument("--prompt", default="ROMEO:", help="what to type into the page")
    p.add_argument("--max_tokens", type=int, default=300, help="how much the page generates")
    p.add_argument("--views_prompt", default=VIEWS_PROMPT, help="the text the inside-the-model views inspect")
    a = p.parse_args(argv)

    from nanogpt.plot import plot_runs
    from nanogpt.serve import BackgroundServer, ServeOptions, build_app

    docs = Path(a.docs)
    print(f"wrote {plot_runs([a.out_dir], docs / 'loss.png')}")
    app, engine, _ = build_app(ServeOptions(out_dir=a.out_dir, device="cpu"))
    server = BackgroundServer(app)
    try:
        driver = screenshot_playground(server.url + "/", docs / "playground.png", a.prompt, a.max_tokens)
        print(f"wrote {docs / 'playground.png'}")
        try:
            for path in shoot_views(driver, docs, a.views_prompt):
                print(f"wrote {path}")
        finally:
            driver.quit()
    finally:
        server.stop()
        engine.close()


if __name__ == "__main__":
    main()
