"""Draw the README's figures from a trained run: its loss curve, and the playground page in Chromium.

    python scripts/readme_figures.py [--out_dir=out-shakespeare-char] [--docs=docs] [--prompt=ROMEO:]

Writes <docs>/loss.png (`nanogpt plot`) and <docs>/playground.png: the run served by `nanogpt serve` in a
background thread, the page opened in a headless Chromium (Debian: apt-get install chromium
chromium-driver), the prompt typed, the generated text streamed, and the pointer resting on a token so
that its alternatives show.
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


def screenshot_playground(url: str, to: Path, prompt: str, max_tokens: int) -> None:
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
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="out-shakespeare-char", help="the trained run (default out-shakespeare-char)")
    p.add_argument("--docs", default="docs", help="where the PNGs go (default docs)")
    p.add_argument("--prompt", default="ROMEO:", help="what to type into the page")
    p.add_argument("--max_tokens", type=int, default=300, help="how much the page generates")
    a = p.parse_args(argv)

    from nanogpt.plot import plot_runs
    from nanogpt.serve import BackgroundServer, ServeOptions, build_app

    docs = Path(a.docs)
    print(f"wrote {plot_runs([a.out_dir], docs / 'loss.png')}")
    app, engine, _ = build_app(ServeOptions(out_dir=a.out_dir, device="cpu"))
    server = BackgroundServer(app)
    try:
        screenshot_playground(server.url + "/", docs / "playground.png", a.prompt, a.max_tokens)
    finally:
        server.stop()
        engine.close()
    print(f"wrote {docs / 'playground.png'}")


if __name__ == "__main__":
    main()
