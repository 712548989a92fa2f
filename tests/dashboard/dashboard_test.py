#!/usr/bin/env python3
"""The dashboard in a real browser: headless Debian chromium driven by selenium.

Usage: dashboard_test.py URL SCREENSHOT [TOKEN]

The node behind URL serves volume `vol` under a write load and an idle volume `doomed`. The page
must list them, show live write IOPS and draw the IOPS graph, open the volume's detail (latency
graph, snapshots, clone tree), take a snapshot, create volume `fromui` (32M) through the form,
refuse a malformed size with a message, and delete `doomed` only once the confirmation is
accepted. With TOKEN (the node needs an API token), the page first asks for it: a wrong one is
refused with a message, the right one shows the volumes. Exits non-zero with the reason on the first failed check; saves a screenshot.
"""
import sys
import tempfile

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

URL, SHOT = sys.argv[1], sys.argv[2]
TOKEN = sys.argv[3] if len(sys.argv) > 3 else None


# What the check is doing, for the failure message: a selenium timeout does not say what it
# waited for.
STEP = "starting chromium"


def step(what):
    global STEP
    STEP = what


def row(name):
    return f'tr.volume[data-volume="{name}"]'


def click(wait, selector):
    """Click the element at `selector`. The page redraws its tables every second, so an element
    found a moment ago may be gone: find and click in one step, again until it holds."""

    def attempt(driver):
        try:
            driver.find_element(By.CSS_SELECTOR, selector).click()
            return True
        except StaleElementReferenceException:
            return False

    wait.until(attempt)


def text(driver, element_id):
    return driver.find_element(By.ID, element_id).text


def write_iops_positive(driver):
    cells = driver.find_elements(By.CSS_SELECTOR, row("vol") + " td.write-iops")
    try:
        return bool(cells) and float(cells[0].text) > 0
    except ValueError:
        return False


def painted(driver, selector):
    """Pixels drawn on the canvas at `selector` (0 for a blank one)."""
    return driver.execute_script(
        """
        const c = document.querySelector(arguments[0]);
        if (!c) return -1;
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return n;
        """,
        selector,
    )


def d_rows(driver):
    return driver.find_elements(By.CSS_SELECTOR, "tr.volume")


def enter_token(driver, token):
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "token-button").click()


def main():
    profile = tempfile.mkdtemp(prefix="vstor-chromium-")
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for arg in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1100",
    ]:
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.set_page_load_timeout(30)
        step("loading the page")
        driver.get(URL)
        # Lambdas that meet a redrawn (stale) element are simply polled again.
        wait = WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,))
        assert driver.title == "vstor dashboard", driver.title

        if TOKEN is not None:
            step("the token prompt")
            # The page loads, its data calls get 401: it asks for the token.
            wait.until(lambda d: d.find_element(By.ID, "auth").is_displayed())
            assert not d_rows(driver), "volumes listed without a token"
            enter_token(driver, "not-the-token")
            wait.until(lambda d: "refused" in text(d, "token-message"))
            assert not d_rows(driver), "volumes listed with a wrong token"
            enter_token(driver, TOKEN)
            wait.until(lambda d: not d.find_element(By.ID, "auth").is_displayed())
        else:
            assert not driver.find_element(By.ID, "auth").is_displayed(), "asked for a token"

        step("volume vol listed")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, row("vol")))
        assert driver.find_elements(By.CSS_SELECTOR, row("doomed")), "doomed is not listed"
        step("vol's write IOPS above 0")
        wait.until(write_iops_positive)
        step("vol's IOPS graph drawn")
        wait.until(lambda d: painted(d, f'canvas.iops[data-volume="vol"]') > 20)

        # The volume's detail: latency graph, snapshots, clone tree.
        step("vol's detail: latency graph and clone tree")
        click(wait, row("vol") + " td")
        wait.until(lambda d: d.find_element(By.ID, "detail").is_displayed())
        wait.until(lambda d: painted(d, "#latency") > 20)
        wait.until(lambda d: "vol" in text(d, "tree"))

        step("a snapshot taken from the page")
        driver.find_element(By.ID, "snapshot-name").send_keys("ui-snap")
        driver.find_element(By.CSS_SELECTOR, "#snapshot button").click()
        wait.until(lambda d: "ui-snap" in text(d, "snapshots"))

        # A malformed size is refused with a message; a good one creates the volume.
        step("volume fromui created from the form")
        driver.find_element(By.ID, "create-name").send_keys("fromui")
        driver.find_element(By.ID, "create-size").send_keys("lots")
        driver.find_element(By.ID, "create-button").click()
        wait.until(lambda d: "size must look like" in text(d, "message"))
        size = driver.find_element(By.ID, "create-size")
        size.clear()
        size.send_keys("32M")
        driver.find_element(By.ID, "create-button").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, row("fromui")))
        wait.until(lambda d: "created volume fromui" in text(d, "message"))

        # Delete asks first: dismissed, nothing happens; accepted, the volume goes.
        step("volume doomed deleted after the confirmation")
        click(wait, row("doomed") + " button.delete")
        wait.until(EC.alert_is_present()).dismiss()
        assert driver.find_elements(By.CSS_SELECTOR, row("doomed")), "deleted without confirmation"
        click(wait, row("doomed") + " button.delete")
        wait.until(EC.alert_is_present()).accept()
        wait.until(lambda d: "deleted volume doomed" in text(d, "message"))
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, row("doomed")))

        # The nodes table.
        step("the nodes table")
        wait.until(lambda d: "yes" in text(d, "nodes"))
        driver.save_screenshot(SHOT)
    except Exception:
        # What the page showed when the check failed, and where it was.
        try:
            body = driver.execute_script("return document.body.innerText")
            print(f"page text at the failure:\n{body[:3000]}", file=sys.stderr)
            driver.save_screenshot(SHOT)
        except Exception as e:  # the browser itself may be gone
            print(f"(no page text: {e})", file=sys.stderr)
        raise
    finally:
        driver.quit()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # the reason goes to the Rust test's failure message
        print(f"dashboard check failed at: {STEP}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
