"""The console at ``/``, end to end in a real browser: Debian's headless Chromium driven by
Playwright (``executable_path``, never Playwright's own browser download), against the real
stack (redis-server, Celery workers, gunicorn). No skip: a browser that cannot start fails
the test. Screenshots are checked to be more than a blank page; they are written under
``$FERRY_TEST_SCREENSHOTS`` when set (else the test's tmp dir)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import requests
from PIL import Image, ImageStat
from playwright.sync_api import Page, expect, sync_playwright

from tests.jobclient import CHAT, scripted, submitted, wait_status
from tests.services import RedisServer, Web, Worker

CHROMIUM = "/usr/bin/chromium"  # Debian's package (make test installs it)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY_A, KEY_B = "console-key-a-0001", "console-key-b-0002"


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    # The page's Content-Security-Policy must not have blocked anything of its own.
    pg.on("console", lambda m: errors.append(m.text)
          if m.type == "error" and "Content Security Policy" in m.text else None)
    yield pg
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def shots(tmp_path) -> Path:
    path = Path(os.environ.get("FERRY_TEST_SCREENSHOTS") or tmp_path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def screenshot(page: Page, path: Path) -> Path:
    """A screenshot that shows something: many colours, not one flat field."""
    page.screenshot(path=str(path), full_page=True)
    image = Image.open(path).convert("RGB")
    stddev = ImageStat.Stat(image.convert("L")).stddev[0]
    colours = image.getcolors(maxcolors=1 << 20)
    assert stddev > 8 and (colours is None or len(colours) > 50), (path, stddev)
    return path


def open_console(page: Page, url: str, hash_: str = "") -> None:
    page.goto(url + "/" + hash_)
    page.wait_for_selector("body[data-ready='1']", timeout=15000)


def reply_text(page: Page) -> str:
    return page.locator(".msg.assistant .content").last.inner_text()


def test_console_end_to_end(web, synthetic_worker, batch_worker, page, shots, tmp_path):
    open_console(page, web.url)
    # The key dialog never opens: this server has no keys.
    expect(page.locator("#key-dialog")).not_to_be_visible()
    page.locator("#pg-model option[value=synthetic]").wait_for(state="attached")
    page.select_option("#pg-model", "synthetic")
    # Playground: a slow scripted reply (25 tokens a second for 20 s), streamed, then stopped.
    page.fill("#pg-system", "Be brief.")
    page.fill("#pg-max-tokens", "1000")
    page.fill("#pg-input", json.dumps({"count": 500, "rate": 25}))
    page.press("#pg-input", "Enter")
    page.wait_for_function(
        "() => (document.querySelector('.msg.assistant .content')?.textContent || '').length > 0",
        timeout=15000)
    first = len(reply_text(page))
    page.wait_for_function(
        f"() => document.querySelector('.msg.assistant .content').textContent.length > {first}",
        timeout=10000)
    expect(page.locator("#pg-stop")).to_be_enabled()
    screenshot(page, shots / "playground-streaming.png")
    page.click("#pg-stop")
    stats = page.locator(".msg.assistant .stats").last
    expect(stats).to_contain_text("stopped", timeout=10000)
    job_id = page.locator(".msg.assistant").last.get_attribute("data-job-id")
    assert job_id and job_id.startswith("chatcmpl-"), job_id
    cancelled = wait_status(web, job_id, "cancelled", "completed", timeout=10)
    assert cancelled["status"] == "cancelled", cancelled
    stopped_at = len(reply_text(page))
    time.sleep(0.5)
    assert len(reply_text(page)) == stopped_at, "tokens kept coming after stop"
    assert stopped_at < 500
    # The stopped reply's usage is the job's (its partial result).
    usage = cancelled["result"]["usage"]
    expect(stats).to_contain_text(f"{usage['completion_tokens']} completion tokens")

    # A whole reply: usage, TTFT and tok/s shown.
    page.fill("#pg-input", json.dumps({"tokens": ["Hello", ",", " world"], "delay": 0.05}))
    page.click("#pg-send")
    expect(page.locator(".msg.assistant .content").last).to_have_text("Hello, world",
                                                                       timeout=15000)
    last_stats = page.locator(".msg.assistant .stats").last
    expect(last_stats).to_contain_text("3 completion tokens", timeout=5000)
    expect(last_stats).to_contain_text(re.compile(r"TTFT \d+ ms"))
    expect(last_stats).to_contain_text(re.compile(r"[\d.]+ tok/s"))
    screenshot(page, shots / "playground.png")

    # The stopped reply's job link opens its job page.
    page.locator(f".msg.assistant a.job-link:text-is('{job_id}')").click()
    expect(page.locator("#page-job")).to_be_visible()
    expect(page.locator("#job-id")).to_have_text(job_id)
    expect(page.locator("#job-status")).to_have_text("cancelled", timeout=10000)
    expect(page.locator("#job-facts")).to_contain_text("Queue wait")
    expect(page.locator("#job-output")).not_to_be_empty()
    expect(page.locator("#job-events li").first).to_contain_text("started", timeout=10000)
    screenshot(page, shots / "job.png")

    # A running job's page follows its events live, then shows its end.
    running = submitted(web, scripted(count=40, rate=20))
    page.goto(f"{web.url}/#/jobs/{running['id']}")
    expect(page.locator("#job-status")).to_have_text("in_progress", timeout=10000)
    expect(page.locator("#job-events")).to_contain_text("delta", timeout=10000)
    expect(page.locator("#job-status")).to_have_text("completed", timeout=15000)
    expect(page.locator("#job-events")).to_contain_text("done")
    expect(page.locator("#job-facts")).to_contain_text("1 + 40")

    # A running job's Cancel button stops it.
    hung = submitted(web, scripted(tokens=["x"], hang=True))
    page.goto(f"{web.url}/#/jobs/{hung['id']}")
    expect(page.locator("#job-status")).to_have_text("in_progress", timeout=10000)
    page.click("#job-cancel")
    expect(page.locator("#job-status")).to_have_text("cancelled", timeout=10000)
    expect(page.locator("#job-cancel")).to_be_hidden()
    assert wait_status(web, hung["id"], "cancelled", timeout=5)["status"] == "cancelled"

    # The jobs list: the jobs, newest first, with their status.
    page.click("nav a[data-page=jobs]")
    rows = page.locator("#jobs-rows tr")
    expect(rows.first).to_have_attribute("data-job-id", hung["id"], timeout=10000)
    expect(page.locator(f"#jobs-rows tr[data-job-id='{running['id']}']")).to_contain_text(
        "completed")
    expect(page.locator(f"#jobs-rows tr[data-job-id='{job_id}']")).to_contain_text("cancelled")
    screenshot(page, shots / "jobs.png")

    # Batches: upload a JSONL file, create a batch, watch it complete, download its output.
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": CHAT,
              "body": scripted(tokens=[f"line {i}"])} for i in range(3)]
    lines.append({"custom_id": "bad", "method": "POST", "url": CHAT,
                  "body": scripted(model="gpt-4o", tokens=["x"])})
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(json.dumps(x) + "\n" for x in lines))
    page.click("nav a[data-page=batches]")
    page.set_input_files("#batch-file", str(source))
    before = batch_ids(web)
    page.click("#batch-create")
    row = new_batch_row(page, before)
    expect(row).to_have_attribute("data-status", "completed", timeout=60000)
    expect(row.locator(".counts")).to_have_text("3 / 1 / 4")
    with page.expect_download() as download:
        row.locator("button.download-output").click()
    out = [json.loads(x) for x in Path(download.value.path()).read_text().splitlines()]
    assert sorted(o["custom_id"] for o in out) == ["c0", "c1", "c2"]
    assert {o["response"]["body"]["choices"][0]["message"]["content"] for o in out} == {
        "line 0", "line 1", "line 2"}
    with page.expect_download() as download:
        row.locator("button.download-errors").click()
    [err] = [json.loads(x) for x in Path(download.value.path()).read_text().splitlines()]
    assert err["custom_id"] == "bad" and err["response"]["status_code"] == 404
    screenshot(page, shots / "batches.png")
    # A slow batch, cancelled from its row.
    slow = [{"custom_id": f"s{i}", "method": "POST", "url": CHAT,
             "body": scripted(count=200, rate=20)} for i in range(4)]
    source.write_text("".join(json.dumps(x) + "\n" for x in slow))
    page.set_input_files("#batch-file", str(source))
    before = batch_ids(web)
    page.click("#batch-create")
    newest = new_batch_row(page, before)
    expect(newest).to_have_attribute("data-status", "in_progress", timeout=30000)
    newest.locator("button.cancel").click()
    expect(newest).to_have_attribute("data-status", re.compile("cancell(ing|ed)"), timeout=10000)
    expect(newest).to_have_attribute("data-status", "cancelled", timeout=30000)

    # Workers: the synthetic model's live worker, and the tokens it made this minute.
    page.click("nav a[data-page=workers]")
    card = page.locator("#workers-models article[data-model=synthetic]")
    expect(card.locator(".n-workers")).not_to_have_text("0", timeout=10000)
    expect(card).to_contain_text(synthetic_worker_name(web))
    page.wait_for_function(
        "() => parseFloat(document.querySelector("
        "\"article[data-model=synthetic] .tps\")?.textContent || '0') > 0", timeout=10000)
    screenshot(page, shots / "workers.png")
    chart = card.locator("canvas.chart").screenshot()
    (shots / "workers-chart.png").write_bytes(chart)
    screenshot_chart = Image.open(shots / "workers-chart.png").convert("RGB")
    blue = sum(1 for x in range(screenshot_chart.width) for y in range(screenshot_chart.height)
               if (px := screenshot_chart.getpixel((x, y)))[2] > 150 and px[0] < 120)
    assert blue > 20, "the chart drew no bar"


def batch_ids(web) -> list[str]:
    return [b["id"] for b in requests.get(web.url + "/v1/batches", params={"limit": 100},
                                          timeout=10).json()["data"]]


def new_batch_row(page: Page, before: list[str]):
    """The row of the batch just created: the first one listed that was not listed
    ``before`` (the session's other tests made batches too)."""
    handle = page.wait_for_function(
        "known => { const r = document.querySelector('#batch-rows tr');"
        " return r && !known.includes(r.dataset.batchId) && r.dataset.batchId; }",
        arg=before, timeout=15000)
    return page.locator(f"#batch-rows tr[data-batch-id='{handle.json_value()}']")


@pytest.mark.model
def test_playground_json_mode_with_the_real_model(web, smollm2_worker, page):
    """SmolLM2 through the playground with JSON mode, temperature and max tokens: the request
    carries them, and the streamed reply is a JSON object (grammar-constrained)."""
    open_console(page, web.url)
    page.locator("#pg-model option[value=smollm2]").wait_for(state="attached")
    page.select_option("#pg-model", "smollm2")
    page.check("#pg-json")
    page.fill("#pg-temperature", "0")
    page.fill("#pg-max-tokens", "48")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.fill("#pg-input", "Describe a cat as JSON with a name and an age.")
        page.press("#pg-input", "Enter")
    body = sent.value.post_data_json
    assert body["response_format"] == {"type": "json_object"} and body["stream"] is True
    assert body["temperature"] == 0 and body["max_tokens"] == 48
    stats = page.locator(".msg.assistant .stats").last
    expect(stats).to_contain_text("completion tokens", timeout=60000)
    assert reply_text(page).lstrip().startswith("{"), reply_text(page)


def synthetic_worker_name(web) -> str:
    data = requests.get(web.url + "/v1/workers", timeout=10).json()["data"]
    [synthetic] = [m for m in data if m["model"] == "synthetic"]
    assert synthetic["workers"], data
    return synthetic["workers"][0]["name"]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A stack of its own with two keys on."""
    logs = tmp_path_factory.mktemp("console-keyed")
    server = RedisServer(logs).start()
    started = []
    try:
        for service in (Worker("synthetic", server.url, logs),
                        Web(server.url, logs, FERRY_API_KEYS=json.dumps([KEY_A, KEY_B]))):
            started.append(service.start())
        yield started[1]
    finally:
        for service in reversed(started):
            service.stop()
        server.stop()


def keyed_job(web, key: str, word: str) -> str:
    r = requests.post(web.url + "/v1/jobs", json={"endpoint": CHAT, "body": scripted(tokens=[word])},
                      headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_with_keys_the_console_asks_for_one_and_shows_only_its_tenants_jobs(keyed, page, shots):
    a_job, b_job = keyed_job(keyed, KEY_A, "a"), keyed_job(keyed, KEY_B, "b")
    page.goto(keyed.url + "/#/jobs")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible(timeout=10000)
    screenshot(page, shots / "key-dialog.png")
    # A wrong key is refused, and asked for again.
    page.fill("#key-input", "not-a-key")
    page.click("#key-submit")
    expect(page.locator("#key-error")).to_contain_text("Incorrect API key", timeout=10000)
    expect(dialog).to_be_visible()
    page.fill("#key-input", KEY_A)
    page.click("#key-submit")
    page.wait_for_selector("body[data-ready='1']", timeout=15000)
    expect(dialog).not_to_be_visible()
    assert page.evaluate("sessionStorage.getItem('ferry.apiKey')") == KEY_A
    expect(page.locator(f"#jobs-rows tr[data-job-id='{a_job}']")).to_be_visible(timeout=10000)
    assert page.locator(f"#jobs-rows tr[data-job-id='{b_job}']").count() == 0
    screenshot(page, shots / "jobs-keyed.png")
    # Another tenant's job page is a 404 for this key, as for no job at all.
    page.goto(f"{keyed.url}/#/jobs/{b_job}")
    expect(page.locator("#job-facts")).to_contain_text("No job", timeout=10000)
    # The playground calls with the key too.
    page.goto(keyed.url + "/#/playground")
    page.locator("#pg-model option[value=synthetic]").wait_for(state="attached")
    page.select_option("#pg-model", "synthetic")
    page.fill("#pg-input", json.dumps({"tokens": ["keyed", " reply"]}))
    page.click("#pg-send")
    expect(page.locator(".msg.assistant .content").last).to_have_text("keyed reply",
                                                                       timeout=15000)
    # The reply's stats (and its job link) come when its stream has ended.
    expect(page.locator(".msg.assistant .job-link").last).to_be_visible(timeout=10000)
    reply_job = page.locator(".msg.assistant").last.get_attribute("data-job-id")
    mine = requests.get(keyed.url + "/v1/jobs", headers={"Authorization": f"Bearer {KEY_A}"},
                        timeout=10).json()["data"]
    assert reply_job in [j["id"] for j in mine]
