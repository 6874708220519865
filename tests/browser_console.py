"""The console in headless Chromium, driven over WebDriver (Debian's chromium-driver and
python3-selenium). Reads the page's state from the page itself (the charts' data, the images'
naturalWidth, the buttons), never its HTML text. Called by tests/browser_console.sh, which
starts the service."""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

args = argparse.ArgumentParser()
for flag in ("console", "ctl", "address", "data", "config", "endless", "screenshots", "work"):
    args.add_argument("--" + flag, required=True)
args = args.parse_args()
control_token = open(os.path.join(args.data, "control.token")).read().strip()
viewer_token = open(os.path.join(args.data, "viewer.token")).read().strip()


def say(message):
    print("browser-console: " + message, flush=True)


def check(condition, message):
    if not condition:
        raise AssertionError(message)


def ctl(*argv):
    out = subprocess.run([args.ctl, "--coordinator", args.address, "--token-file",
                          os.path.join(args.data, "control.token"), *argv],
                         check=True, capture_output=True, text=True).stdout
    return out


def run_record(run_id):
    return json.loads(ctl("get", run_id, "--json"))


def wait(what, predicate, seconds=120, every=0.25):
    deadline = time.time() + seconds
    last_error = None
    while time.time() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (WebDriverException, KeyError, IndexError, ValueError) as error:
            last_error = error
        time.sleep(every)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}"
                         + (f" (last error: {last_error})" if last_error else ""))


options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
             "--window-size=1280,800", "--hide-scrollbars", "--font-render-hinting=none"):
    options.add_argument(flag)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
driver.set_script_timeout(30)
driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                       {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False})
js = driver.execute_script


def sign_in(token):
    driver.get("about:blank")
    driver.get(args.console)
    wait("the login form", lambda: driver.find_element(By.ID, "token").is_displayed())
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()


def fetch(path, method="GET", body=None):
    """A request from the page's own context with the token it holds; status and JSON body."""
    return driver.execute_async_script("""
        const [path, method, body, done] = arguments;
        const token = document.getElementById('token').dataset.used;
        fetch(path, {method, headers: Object.assign({Authorization: 'Bearer ' + token},
                     body === null ? {} : {'Content-Type': 'application/json'}),
                     body: body === null ? undefined : JSON.stringify(body)})
          .then(async (r) => done([r.status, await r.text()]))
          .catch((e) => done([0, String(e)]));""", path, method, body)


def with_token(token, path, method="GET", body=None):
    js("document.getElementById('token').dataset.used = arguments[0]", token)
    status, text = fetch(path, method, body)
    return status, (json.loads(text) if text.startswith("{") else text)


def screenshot(name, selector=None):
    os.makedirs(args.screenshots, exist_ok=True)
    path = os.path.join(args.screenshots, name)
    if selector:
        js("document.querySelector(arguments[0]).scrollIntoView()", selector)
    else:
        js("window.scrollTo(0, 0)")
    time.sleep(0.5)
    driver.save_screenshot(path)
    say(f"screenshot {path}")


try:
    started = json.loads(ctl("start", args.config, "--name", "shapes", "--json"))
    run_id = started["run"]["id"]
    check(started["page_url"] == args.console + "#/runs/" + run_id,
          f"ddpmctl start's page_url {started['page_url']!r}")
    say(f"started {run_id}; its page {started['page_url']}")

    say("1. a wrong token sees the login and no data")
    sign_in("not-a-token")
    wait("the refusal", lambda: "neither" in driver.find_element(By.ID, "login-error").text)
    check(driver.find_element(By.ID, "login").is_displayed(), "the login is not shown")
    check(js("return document.getElementById('view').children.length") == 0,
          "the view shows something without a valid token")
    check(run_id not in js("return document.body.innerText"), "the run's id shows without a token")

    say("2. the runs page lists the run in its state")
    sign_in(control_token)
    wait("the run's row", lambda: js(
        "return document.querySelector(`#runs tr[data-run='${arguments[0]}']`) !== null", run_id))
    state = js("return document.querySelector(`#runs tr[data-run='${arguments[0]}']`).dataset.state",
               run_id)
    check(state in ("QUEUED", "STARTING", "RUNNING"), f"row state {state}")
    wait("the row to show RUNNING", lambda: js(
        "return document.querySelector(`#runs tr[data-run='${arguments[0]}'] .state`).textContent",
        run_id) == "RUNNING")
    check(js("return location.href.indexOf(arguments[0])", control_token) < 0, "the token is in the URL")

    say("3. the run page updates while the run trains, without a reload")
    driver.get("about:blank")
    driver.get(started["page_url"])
    # A fresh document: sign in again (the token lived in the old page's memory only); the
    # address ddpmctl printed opens the run's page.
    field = wait("the login form", lambda: driver.find_element(By.ID, "token").is_displayed()
                 and driver.find_element(By.ID, "token"))
    field.send_keys(control_token)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait("the loss chart", lambda: js("return !!(window.ddpmConsole.charts.loss)"))
    js("window.__sameDocument = true")
    loss_points = "return window.ddpmConsole.charts.loss.data.datasets[0].data.length"
    first = wait("the first loss points", lambda: js(loss_points) >= 1 and js(loss_points))
    updates = js("return window.ddpmConsole.updates")
    wait("more loss points while it trains", lambda: js(loss_points) >= first + 3, seconds=180)
    check(js("return window.__sameDocument === true"), "the page was reloaded")
    check(js("return window.ddpmConsole.updates") > updates, "no live update was counted")
    say(f"loss points {first} -> {js(loss_points)} over live updates, same document")

    say("4. the run completes; the chart has every row of metrics.csv")
    wait(f"{run_id} COMPLETED", lambda: run_record(run_id)["state"] == "COMPLETED", seconds=300, every=1)
    record = run_record(run_id)
    with open(os.path.join(record["run_dir"], "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    wait("the page to show COMPLETED", lambda: js(
        "return document.querySelector('.runhead .state').textContent") == "COMPLETED")
    wait(f"{len(rows)} loss points", lambda: js(loss_points) == len(rows), seconds=30)
    chart_steps = js("return window.ddpmConsole.charts.loss.data.datasets[0].data.map(p => p.x)")
    check(chart_steps == [int(r["step"]) for r in rows], f"chart steps {chart_steps}")
    chart_loss = js("return window.ddpmConsole.charts.loss.data.datasets[0].data.map(p => p.y)")
    for value, row in zip(chart_loss, rows):
        # metrics.csv holds 6 significant digits.
        check(abs(value - float(row["loss"])) <= 1e-5 * abs(float(row["loss"])),
              f"loss {value} against metrics.csv's {row['loss']} at step {row['step']}")
    say(f"the loss chart: {len(rows)} points, the steps and losses of metrics.csv")

    say("5. the scorecard: every image loaded, each FID that of the run's evaluation")
    with open(os.path.join(record["run_dir"], "eval.csv")) as f:
        evals = {int(r["step"]): float(r["fid"]) for r in csv.DictReader(f) if r["fid"]}
    check(sorted(evals) == [40, 80, 120, 160], f"eval.csv steps {sorted(evals)}")
    wait("4 scorecard rows with FIDs", lambda: js(
        "return document.querySelectorAll('#scorecard tr[data-step] td.fid[data-fid]').length") == 4,
        seconds=30)
    wait("every scorecard image to load", lambda: js("""
        const imgs = [...document.querySelectorAll('#scorecard img.thumb')];
        return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);"""), seconds=30)
    scorecard = js("""return [...document.querySelectorAll('#scorecard tr[data-step]')].map(tr => ({
        step: Number(tr.dataset.step), fid: tr.querySelector('td.fid').dataset.fid || null,
        width: tr.querySelector('img.thumb') ? tr.querySelector('img.thumb').naturalWidth : 0}))""")
    check(len(scorecard) == 4, f"scorecard rows {scorecard}")
    for row in scorecard:
        check(row["width"] > 0, f"the grid of step {row['step']} did not load")
        # eval.csv holds 6 significant digits; ddpmctl get's newest FID is compared exactly below.
        check(abs(float(row["fid"]) - evals[row["step"]]) <= 1e-5 * evals[row["step"]],
              f"step {row['step']}: the page's FID {row['fid']}, eval.csv's {evals[row['step']]}")
    latest = record["latest_eval"]
    newest = [r for r in scorecard if r["step"] == int(latest["step"])][0]
    check(float(newest["fid"]) == float(latest["fid"]),
          f"the page's FID {newest['fid']} at step {latest['step']}, ddpmctl get's {latest['fid']}")
    say(f"scorecard: {len(scorecard)} rows, images {[r['width'] for r in scorecard]} px wide, "
        f"FID at step {latest['step']} {latest['fid']} as ddpmctl get says")
    check(js("return window.ddpmConsole.charts.fid.data.datasets[0].data.length") == 4,
          "the FID chart does not have 4 points")
    # eval.select: fid: the row of the lowest FID, and only it, is marked best, with its KID.
    best_step = min(evals, key=evals.get)
    marked = js("""return [...document.querySelectorAll('#scorecard tr.best')].map(tr => ({
        step: Number(tr.dataset.step), badge: !!tr.querySelector('.best-badge'),
        kid: tr.children[5].textContent}))""")
    check(len(marked) == 1 and marked[0]["step"] == best_step and marked[0]["badge"],
          f"best rows {marked}, the lowest FID at step {best_step}")
    check(marked[0]["kid"] not in ("", "-"), f"no KID in the best row: {marked}")
    facts = js("return [...document.querySelectorAll('.fact .k')].map(k => k.textContent)")
    check("KID" in facts and "best" in facts, f"facts {facts}")
    # The slider steps through the grids.
    # The last grid is drawn after the last checkpoint and evaluation (with eval.select the
    # step's checkpoint commits before the evaluation is reported), so it may come later.
    slider_grids = "return Number(document.querySelector('.viewer input[type=range]').max) + 1"
    wait("the slider's 4 grids", lambda: js(slider_grids) >= 4, seconds=30)
    grids = js(slider_grids)
    check(grids >= 4, f"the slider has {grids} grids")
    screenshot("console_run.png")
    screenshot("console_scorecard.png", "#scorecard")

    say("6. a stop from the page moves a run to STOPPED")
    endless = json.loads(ctl("start", args.endless, "--name", "endless", "--json"))["run"]["id"]
    sign_in(control_token)
    wait("the endless run RUNNING on the runs page", lambda: js(
        "return document.querySelector(`#runs tr[data-run='${arguments[0]}'] .state`).textContent",
        endless) == "RUNNING", seconds=120)
    screenshot("console_runs.png")
    js("location.hash = '#/runs/' + arguments[0]", endless)
    # The page redraws its head with every live event, so a button found may be replaced before
    # the click lands: find and click again until one click is taken.
    def click_stop():
        for button in driver.find_elements(By.CSS_SELECTOR, ".runhead button"):
            if button.text == "Stop" and button.is_enabled():
                button.click()
                return True
        return False
    wait("a click on the Stop button", click_stop)
    wait(f"{endless} STOPPED", lambda: run_record(endless)["state"] == "STOPPED", seconds=120, every=1)
    reasons = [t["to"] for t in run_record(endless)["transitions"]]
    check(reasons[-2:] == ["STOPPING", "STOPPED"], f"transitions {reasons}")
    wait("the page to show STOPPED", lambda: js(
        "return document.querySelector('.runhead .state').textContent") == "STOPPED", seconds=30)

    say("6b. the groups page shows the group and its two ranks")
    js("location.hash = '#/groups'")
    wait("the group's two ranks", lambda: js(
        "return document.querySelectorAll('[data-group] tbody tr').length") == 2, seconds=30)
    hosts = js("return [...document.querySelectorAll('[data-group] tbody tr td:nth-child(2)')].map(td => td.textContent)")
    check(all(h and h != "-" for h in hosts), f"the ranks' hosts {hosts}")
    check("idle" in js("return document.querySelector('[data-group] h2').textContent"),
          "the group is not shown idle after its run stopped")
    screenshot("console_groups.png")

    say("7. the viewer token sees everything and cannot stop")
    sign_in(viewer_token)
    wait("both runs listed", lambda: js("return document.querySelectorAll('#runs tr[data-run]').length") == 2)
    check(js("return document.getElementById('role').textContent").startswith("viewer"), "role shown")
    check(js("return [...document.querySelectorAll('#runs button')].filter(b => !b.disabled).length") == 0,
          "a viewer has an enabled action button")
    js("location.hash = '#/runs/' + arguments[0]", run_id)
    wait("the viewer's loss chart", lambda: js(
        "return window.ddpmConsole.charts.loss && window.ddpmConsole.charts.loss.data.datasets[0].data.length")
        == len(rows))
    wait("the viewer's scorecard images", lambda: js("""
        const imgs = [...document.querySelectorAll('#scorecard img.thumb')];
        return imgs.length === 4 && imgs.every(i => i.complete && i.naturalWidth > 0);"""), seconds=30)
    status, body = with_token(viewer_token, f"/api/v1/runs/{run_id}:stop", "POST", {})
    check(status == 403 and "needs the control token" in body["error"], f"viewer stop: {status} {body}")
    say(f"viewer stop refused: {status} {body['error']}")

    say("8. traversal requests for an image are refused")
    # (A browser resolves a literal or %2e-encoded ".." segment itself; encoded slashes reach us.)
    for path in ("..%2f..%2fcontrol.token", "samples%2f..%2f..%2f..%2fviewer.token",
                 "..%2F..%2F..%2Fregistry.db"):
        status, body = with_token(control_token, f"/api/v1/runs/{run_id}/files/{path}")
        check(status == 403 and "'..' leads out of the run directory" in body["error"],
              f"{path}: {status} {body}")
    status, body = with_token(control_token, f"/api/v1/runs/{run_id}/files/%2Fetc%2Fpasswd")
    check(status == 403 and "absolute path" in body["error"], f"absolute: {status} {body}")
    say("traversal refused: 403, naming '..' and the absolute path")

    say("9. nothing the page did broke its Content-Security-Policy, and every stream ended whole")
    problems = [entry["message"] for entry in driver.get_log("browser")
                if entry["level"] == "SEVERE" and any(
                    sign in entry["message"] for sign in
                    ("Content Security Policy", "Refused", "ERR_INCOMPLETE", "favicon"))]
    check(not problems, f"the browser logged: {problems}")
    say("PASS")
finally:
    driver.quit()
