"""Drives Trellis's admin panel in headless Chromium (Debian's, through chromedriver and
Selenium): log in, watch the dashboard count new messages, find a user and deactivate
them, resolve a report, read the audit log and a room's recent messages, make a
registration token, send a server notice. Screenshots of each step go to the artefact
directory. Exits non-zero, with a message, at the first thing that is not as expected.

Usage: admin_panel.py BASE_URL ADMIN_USER ADMIN_PASSWORD SENDER_TOKEN ROOM_ID TARGET_USER
       ARTEFACT_DIR NOTICE_TO
"""

import json
import os
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

base, admin, password, sender_token, room, target, artefacts, notice_to = sys.argv[1:9]
os.makedirs(artefacts, exist_ok=True)


def find_binary(*names):
    for name in names:
        for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/lib/chromium"]:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    sys.exit(f"none of {names} found")


options = webdriver.ChromeOptions()
options.binary_location = find_binary("chromium", "chromium-browser")
for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
            "--window-size=1280,1000", "--no-first-run", "--disable-extensions"]:
    options.add_argument(arg)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service(find_binary("chromedriver")), options=options)
wait = WebDriverWait(driver, 20)
step = 0


def shot(name):
    global step
    step += 1
    driver.save_screenshot(os.path.join(artefacts, f"{step:02d}-{name}.png"))


def fail(message):
    shot("failure")
    print(message, file=sys.stderr)
    print(driver.find_element(By.TAG_NAME, "body").text, file=sys.stderr)
    driver.quit()
    sys.exit(1)


def text_of(selector):
    return wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, selector))).text


def wait_for(condition, what):
    def check(_driver):
        # The page re-renders while it is watched: an element read may go stale.
        try:
            return condition()
        except Exception:
            return False

    try:
        wait.until(check)
    except Exception:
        fail(f"timed out waiting for {what}")


def send_event(kind, content):
    request = urllib.request.Request(
        f"{base}/_matrix/client/v3/rooms/{room}/send/{kind}/panel{time.time_ns()}",
        data=json.dumps(content).encode(),
        headers={"Authorization": f"Bearer {sender_token}", "Content-Type": "application/json"},
        method="PUT",
    )
    urllib.request.urlopen(request).read()


def send_messages(n):
    for i in range(n):
        request = urllib.request.Request(
            f"{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/panel{time.time_ns()}{i}",
            data=json.dumps({"msgtype": "m.text", "body": f"panel test {i}"}).encode(),
            headers={"Authorization": f"Bearer {sender_token}", "Content-Type": "application/json"},
            method="PUT",
        )
        urllib.request.urlopen(request).read()


try:
    # Log in.
    driver.get(f"{base}/_trellis/admin/")
    wait.until(EC.presence_of_element_located((By.ID, "login-form")))
    shot("login")
    driver.find_element(By.ID, "login-user").send_keys(admin)
    driver.find_element(By.ID, "login-password").send_keys(password)
    driver.find_element(By.ID, "login-submit").click()
    wait_for(lambda: driver.find_elements(By.ID, "dash-messages-hour"), "the dashboard")
    before = int(text_of("#dash-messages-hour"))
    users = int(text_of("#dash-users"))
    shot("dashboard")

    # The dashboard follows what users do (it refreshes itself every 5 seconds).
    send_messages(3)
    wait_for(lambda: int(text_of("#dash-messages-hour")) == before + 3, "the dashboard to count 3 more messages")
    shot("dashboard-after-messages")

    # Find the user and deactivate them.
    driver.find_element(By.ID, "nav-users").click()
    search = wait.until(EC.presence_of_element_located((By.ID, "user-search")))
    search.send_keys(target.split(":")[0].lstrip("@"))
    driver.find_element(By.ID, "user-search-go").click()
    wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "table[data-test=users] tbody tr")) == 1, "one user found")
    shot("user-search")
    driver.find_element(By.CSS_SELECTOR, f"a[data-user='{target}']").click()
    wait.until(EC.element_to_be_clickable((By.ID, "deactivate"))).click()
    wait.until(EC.element_to_be_clickable((By.ID, "deactivate-confirm"))).click()
    wait_for(lambda: driver.find_elements(By.ID, "user-deactivated"), "the user to show as deactivated")
    shot("user-deactivated")

    # Resolve the open report.
    driver.find_element(By.ID, "nav-reports").click()
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "button[data-action=resolve]"), "an open report")
    report = driver.find_element(By.CSS_SELECTOR, "button[data-action=resolve]").get_attribute("data-report")
    driver.find_element(By.CSS_SELECTOR, f"input[data-note='{report}']").send_keys("handled in the panel")
    shot("report-open")
    driver.find_element(By.CSS_SELECTOR, "button[data-action=resolve]").click()
    wait_for(lambda: not driver.find_elements(By.CSS_SELECTOR, f"[data-report-status='{report}']"), "the report to leave the open list")
    driver.execute_script("location.hash = '#/reports?status=resolved'")
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, f"[data-report-status='{report}']"), "the report in the resolved list")
    if text_of(f"[data-report-status='{report}']") != "resolved":
        fail("the report is not resolved")
    if "handled in the panel" not in text_of("table[data-test=reports]"):
        fail("the note is not shown")
    shot("report-resolved")

    # The audit log shows what the panel did.
    driver.find_element(By.ID, "nav-audit").click()
    wait.until(EC.presence_of_element_located((By.ID, "audit-action"))).send_keys("deactivate")
    driver.find_element(By.ID, "audit-filter").click()
    wait_for(lambda: target in text_of("table[data-test=audit]") or "deactivate" in text_of("table[data-test=audit]"), "the deactivation in the audit log")
    shot("audit")

    # A room's moderation view shows its recent messages (it is not encrypted).
    driver.find_element(By.ID, "nav-rooms").click()
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "table[data-test=rooms] a"), "the room list")
    driver.find_element(By.CSS_SELECTOR, "table[data-test=rooms] a").click()
    wait_for(lambda: "panel test 2" in text_of("table[data-test=room-messages]"), "the room's messages")
    shot("room")

    # A registration token is made; a server notice is sent.
    driver.find_element(By.ID, "nav-tokens").click()
    wait.until(EC.element_to_be_clickable((By.ID, "token-create"))).click()
    wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "table[data-test=tokens] tbody tr")) == 1, "the new token")
    shot("tokens")
    driver.find_element(By.ID, "nav-notices").click()
    wait.until(EC.presence_of_element_located((By.ID, "notice-user"))).send_keys(notice_to)
    driver.find_element(By.ID, "notice-body").send_keys("Maintenance tonight")
    driver.find_element(By.ID, "notice-send").click()
    wait_for(lambda: "Server notice: done" in text_of("#flash"), "the notice to be sent")
    shot("notice")
    driver.find_element(By.ID, "nav-media").click()
    wait_for(lambda: "Who stores most" in driver.find_element(By.TAG_NAME, "main").text, "the media page")

    # A call rung in the room and hung up unanswered shows in the call list as missed.
    send_event("m.call.invite", {"call_id": "panelcall", "party_id": "p", "version": "1", "lifetime": 60000,
                                 "offer": {"type": "offer", "sdp": "v=0\r\nm=audio 9 RTP 0\r\n"}})
    send_event("m.call.hangup", {"call_id": "panelcall", "party_id": "p", "version": "1", "reason": "invite_timeout"})
    driver.find_element(By.ID, "nav-calls").click()
    wait_for(lambda: "missed" in text_of("table[data-test=calls]"), "the missed call in the call list")
    shot("calls")

    # Back on the dashboard: deactivated accounts still count, and the notice made the
    # server notices account.
    driver.find_element(By.ID, "nav-dashboard").click()
    wait_for(lambda: text_of("#dash-users") == str(users + 1), "the dashboard again")

    # Nothing the page did broke its content security policy.
    problems = [entry["message"] for entry in driver.get_log("browser")
                if entry["level"] == "SEVERE" and ("Content Security Policy" in entry["message"] or "Uncaught" in entry["message"])]
    if problems:
        fail(f"browser errors: {problems}")

    # Log out: the login form comes back.
    driver.find_element(By.ID, "logout").click()
    wait.until(EC.presence_of_element_located((By.ID, "login-form")))
    shot("logged-out")
    print(json.dumps({"ok": True, "screenshots": step}))
finally:
    driver.quit()
