"""Real headless Chromium (Debian's, driven by Playwright): log in and annotate by keyboard only,
then find the judgement in the export."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from alignforge.annotate.export import export_dataset
from tests.annotate.helpers import flagged_rows, make_project

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"{CHROMIUM} is absent (scripts/install_browser.sh installs it)",
    ),  # fmt: skip
]


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def _login(page, url: str, token: str) -> None:
    page.goto(url + "/login")
    page.fill("#token", token)
    page.press("#token", "Enter")
    page.wait_for_selector("#task, #queue-empty")


def test_raw_toggle_and_format_flags(tmp_path, live_server, browser):
    store, tokens = make_project(tmp_path / "p", annotators=["alice"], rows=flagged_rows())
    srv = live_server(store.dir)
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    page.set_default_timeout(60_000)
    _login(page, srv.url, tokens["alice"])
    flags = page.locator("li.flag")
    assert {flags.nth(i).get_attribute("data-flag") for i in range(flags.count())} == {
        "text_around", "multiple", "truncated"}  # fmt: skip
    assert flags.first.is_visible() and page.is_visible(".flag-summary")
    assert page.locator(".finish.bad").inner_text() == "finish: length"
    raw, parsed = page.locator(".raw-view"), page.locator(".parsed-view")
    assert not raw.first.is_visible() and parsed.first.is_visible()
    page.keyboard.press("r")
    assert raw.first.is_visible() and raw.nth(1).is_visible() and not parsed.first.is_visible()
    texts = raw.first.inner_text() + raw.nth(1).inner_text()
    assert "Sure! Here is the extraction:" in texts and '"Beta Ltd"' in texts
    page.keyboard.press("r")
    assert not raw.first.is_visible() and parsed.first.is_visible()
    page.click("label.toggle-raw")  # the mouse toggles it too
    assert raw.first.is_visible()


def test_keyboard_only_annotation_ends_up_in_the_export(tmp_path, live_server, browser):
    store, tokens = make_project(tmp_path / "p", annotators=["alice"], n_prompts=1, k=3)
    srv = live_server(store.dir)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)  # a loaded CI machine can be slow to answer
    page.goto(srv.url + "/task")  # not logged in: sent to the login form, token field focused
    assert page.url.endswith("/login")
    # autofocus lands after the load event; typing earlier loses the first keystrokes
    page.wait_for_function("document.activeElement && document.activeElement.id === 'token'")
    page.keyboard.type(tokens["alice"])
    page.keyboard.press("Enter")
    page.wait_for_selector("#task")
    first = int(page.get_attribute("#task", "data-item"))
    page.wait_for_timeout(1200)  # let the active-time clock tick
    shot = tmp_path / "task.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("ANNOTATE_SCREENSHOT"):
        shutil.copy(shot, os.environ["ANNOTATE_SCREENSHOT"])
    # entities: A, relations: A (a typo, fixed below), summary: tie
    for key in ["1", "1", "2"]:
        page.keyboard.press(key)
    page.keyboard.press("ArrowUp")  # back to 'relations'
    page.keyboard.press("3")  # relations: B
    assert page.is_checked("input[name=answer_relations][value='3']")
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.querySelector('#task') && "
                           f"document.querySelector('#task').dataset.item != '{first}'")  # fmt: skip
    # second item: answer one question, reload, the draft survives; then skip with Backspace
    second = int(page.get_attribute("#task", "data-item"))
    page.keyboard.press("3")
    page.wait_for_timeout(2500)  # the server draft is saved after a short debounce
    page.reload()
    page.wait_for_selector("#task")
    assert int(page.get_attribute("#task", "data-item")) == second
    assert page.is_checked("input[name=answer_entities][value='3']")
    page.keyboard.press("Backspace")
    page.wait_for_function(f"!document.querySelector('#task') || "
                           f"document.querySelector('#task').dataset.item != '{second}'")  # fmt: skip
    # third item: B wins everything
    for key in ["3", "3", "3", "Enter"]:
        page.keyboard.press(key)
    page.wait_for_selector("#queue-empty")

    with store.connect() as conn:
        js = {j.item_id: j for j in store.judgements(conn)}
        swapped = {i: store.assignment(conn, js[i].user_id, i)[0].swapped for i in js}
    assert len(js) == 2
    assert second not in js  # skipped
    s = -1 if swapped[first] else 1
    assert js[first].scores == {"entities": s, "relations": -s, "summary": 0}
    assert js[first].client_seconds > 0 and js[first].server_seconds > 0
    (third,) = [i for i in js if i != first]
    rep = export_dataset(store.dir, tmp_path / "out", ties="margin0")
    rows = [json.loads(x) for f in rep.files for x in open(f)]
    by_pair = {r["pair_id"]: r for r in rows}
    with store.connect() as conn:
        it1, it3 = store.item(conn, first), store.item(conn, third)
    assert by_pair[it1["pair_key"]]["tie"] is True  # A, B, tie sums to 0
    r3 = by_pair[it3["pair_key"]]
    b_shown = it3["a_text"] if swapped[third] else it3["b_text"]
    assert r3["chosen"][0]["content"] == b_shown and r3["margin"] == 3.0
    assert r3["annotators"] == ["alice"] and r3["split"] == "train"
