"""The console's first load in headless Chromium (Debian's chromium-driver, python3-selenium),
from the Performance API: the runs page with the registry's runs listed, and the run page of a
long run with its whole curve drawn. Starts ddpm_bench_console --keep-seconds for the
coordinator (1000 runs, one of 100k steps logged every 100).
usage: /usr/bin/python3 bench/console_page.py BUILD_DIR"""
import re
import subprocess
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

bench = subprocess.Popen([sys.argv[1] + "/bench/ddpm_bench_console", "--keep-seconds", "120",
                          "--requests", "20"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
for line in bench.stdout:
    match = re.match(r"console (\S+) viewer token (\S+) long run (\S+)", line)
    if match:
        break
    if not line.startswith("ddpm_coordinator"):
        print(line.rstrip())
url, token, long_run = match.groups()
options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
    options.add_argument(flag)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def load(hash_route, ready, what):
    driver.get("about:blank")
    driver.get(url + hash_route)
    navigation = driver.execute_script(
        "const n = performance.getEntriesByType('navigation')[0]; return [n.domContentLoadedEventEnd, n.loadEventEnd];")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.execute_script("window.__signIn = performance.now()")
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    deadline = time.time() + 60
    while not driver.execute_script(ready) and time.time() < deadline:
        time.sleep(0.01)
    drawn = driver.execute_script("return performance.now() - window.__signIn")
    print(f"{what}: page loaded {navigation[1]:.0f} ms (DOMContentLoaded {navigation[0]:.0f} ms); "
          f"sign-in to drawn {drawn:.0f} ms")


load("#/runs", "return document.querySelectorAll('#runs tr[data-run]').length === 1000",
     "runs page, 1000 runs")
load("#/runs/" + long_run, "return window.ddpmConsole.charts.loss && "
     "window.ddpmConsole.charts.loss.data.datasets[0].data.length >= 1000",
     f"run page of {long_run} (100k steps, 1000 rows)")
driver.quit()
bench.terminate()
