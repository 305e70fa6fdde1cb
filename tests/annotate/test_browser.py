"""Real headless Chromium (Debian's, driven by Playwright): log in and annotate by keyboard only,
then find the judgement in the export."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from alignforge.annotate.export import export_dataset
from tests.annotate.helpers import flagged_rows, long_rows, make_project

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


def _page(browser, **kw):
    """A page that may run Playwright's waits: they evaluate strings, which the app's CSP
    forbids. The raw-toggle test runs under the CSP, so the app's own script is checked there."""
    return browser.new_context(bypass_csp=True, **kw).new_page()


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
    page = _page(browser, viewport={"width": 1400, "height": 1000})
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
    page.keyboard.press("k")  # back to 'relations'
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
    page.keyboard.press("Backspace")  # asks first
    assert "again to skip" in page.inner_text("#status")
    assert int(page.get_attribute("#task", "data-item")) == second
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


def _shot(page, path: Path, name: str) -> None:
    page.screenshot(path=str(path))
    if os.environ.get("ANNOTATE_SCREENSHOT_DIR"):
        shutil.copy(path, Path(os.environ["ANNOTATE_SCREENSHOT_DIR"]) / name)


def test_layout_at_1366x768_shows_both_answers_and_the_keyboard_scrolls_them(
    tmp_path, live_server, browser
):
    store, tokens = make_project(tmp_path / "p", annotators=["alice"], rows=long_rows(1))
    srv = live_server(store.dir)
    page = _page(browser, viewport={"width": 1366, "height": 768})
    page.set_default_timeout(60_000)
    _login(page, srv.url, tokens["alice"])
    page.keyboard.press("g")  # the guidelines open on the first item; close them
    assert not page.evaluate("document.getElementById('guidelines').open")
    _shot(page, tmp_path / "task-1366x768.png", "task-1366x768.png")
    geo = page.evaluate("""() => {
        const r = (s) => document.querySelector(s).getBoundingClientRect();
        const row = (side) => r(`#completion-${side} table.ents tbody tr:nth-child(3)`);
        return {panel: r('#answers').top, a: row('a'), b: row('b'), h: innerHeight, w: innerWidth,
                scroll: document.scrollingElement.scrollHeight};
    }""")
    assert geo["scroll"] <= geo["h"]  # the page itself does not scroll
    for side in "ab":  # three entity rows of each answer are on screen, above the questions
        assert 0 < geo[side]["top"] and geo[side]["bottom"] < geo["panel"] <= geo["h"], geo
        assert 0 <= geo[side]["left"] and geo[side]["right"] <= geo["w"], geo
    tops = "() => ['a', 'b'].map((s) => document.getElementById('completion-' + s).scrollTop)"
    assert page.evaluate(tops) == [0, 0]
    page.keyboard.press("ArrowDown")
    page.keyboard.press("PageDown")
    assert all(t > 100 for t in page.evaluate(tops))
    page.keyboard.press("Shift+ArrowDown")
    assert page.evaluate("document.getElementById('document').scrollTop") > 0
    page.keyboard.press("PageUp")
    page.keyboard.press("ArrowUp")
    assert page.evaluate(tops) == [0, 0]
    # arrows scroll, they do not change the question: j/k do
    assert page.get_attribute("fieldset.current", "data-aspect") == "entities"
    page.keyboard.press("j")
    assert page.get_attribute("fieldset.current", "data-aspect") == "relations"


def test_revise_a_saved_judgement_and_undo_a_skip(tmp_path, live_server, browser):
    store, tokens = make_project(tmp_path / "p", annotators=["alice"], n_prompts=1, k=3)
    srv = live_server(store.dir)
    page = _page(browser, viewport={"width": 1366, "height": 768})
    page.set_default_timeout(60_000)
    _login(page, srv.url, tokens["alice"])
    first = page.get_attribute("#task", "data-item")
    for key in ["1", "1", "1"]:
        page.keyboard.press(key)
    page.fill("#comment", "both fine")
    page.press("#comment", "Escape")
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.querySelector('#task').dataset.item != '{first}'")
    second = page.get_attribute("#task", "data-item")
    page.keyboard.press("p")  # revise the previous item
    page.wait_for_selector("#revise-note")
    assert page.get_attribute("#task", "data-item") == first
    assert page.is_checked("input[name=answer_summary][value='1']")
    assert page.input_value("#comment") == "both fine"
    page.keyboard.press("j")
    page.keyboard.press("j")
    page.keyboard.press("3")  # summary: B
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.querySelector('#task').dataset.item == '{second}'")
    # skip asks first; Esc keeps the item
    page.keyboard.press("2")
    page.keyboard.press("Backspace")
    page.keyboard.press("Escape")
    page.keyboard.press("Backspace")
    assert page.get_attribute("#task", "data-item") == second
    page.keyboard.press("Backspace")
    page.wait_for_function(f"document.querySelector('#task').dataset.item != '{second}'")
    assert page.is_visible("#undo-skip")
    page.keyboard.press("u")
    page.wait_for_url(f"**/task/{second}")
    assert page.is_checked("input[name=answer_entities][value='2']")  # the draft came back
    with store.connect() as conn:
        uid = store.user_by_token(conn, tokens["alice"]).id
        (j,) = store.judgements(conn)
        assert store.assignment(conn, uid, int(second))[1] == "served"
        trail = store.audit_trail(conn, uid)
    swapped = store_swapped(store, uid, int(first))
    s = -1 if swapped else 1
    assert j.scores == {"entities": s, "relations": s, "summary": -s}
    assert [t["action"] for t in trail] == ["unskip", "skip", "revise"]
    assert trail[2]["detail"]["old_scores"] == {"entities": s, "relations": s, "summary": s}
    assert trail[2]["detail"]["old_comment"] == "both fine"


def store_swapped(store, user_id: int, item_id: int) -> bool:
    with store.connect() as conn:
        return store.assignment(conn, user_id, item_id)[0].swapped


def test_without_javascript_the_form_saves_skips_and_undoes(tmp_path, live_server, browser):
    store, tokens = make_project(tmp_path / "p", annotators=["alice"], n_prompts=1, k=3)
    srv = live_server(store.dir)
    ctx = browser.new_context(
        java_script_enabled=False, viewport={"width": 1366, "height": 768}, bypass_csp=True
    )
    page = ctx.new_page()
    page.set_default_timeout(60_000)
    _login(page, srv.url, tokens["alice"])
    assert page.evaluate("1 + 1") == 2  # playwright's own evaluation still works
    assert page.get_attribute("#task", "data-item")  # the page rendered without scripts
    first = page.get_attribute("#task", "data-item")
    assert page.input_value("#submission_id")  # filled by the server, not by a script
    for aspect, choice in [("entities", "3"), ("relations", "3"), ("summary", "1")]:
        page.click(f"label.choice:has(input[name=answer_{aspect}][value='{choice}'])")
    page.fill("#comment", "no JS here")
    page.click("#save")
    page.wait_for_url(f"{srv.url}/task")
    second = page.get_attribute("#task", "data-item")
    assert second != first
    page.click("#skip")  # no answers needed to skip
    page.wait_for_selector("#undo-skip")
    assert page.get_attribute("#task", "data-item") != second
    page.click("#undo-skip button")
    page.wait_for_url(f"**/task/{second}")
    with store.connect() as conn:
        (j,) = store.judgements(conn)
        uid = store.user_by_token(conn, tokens["alice"]).id
        assert store.assignment(conn, uid, int(second))[1] == "served"
    s = -1 if store_swapped(store, uid, int(first)) else 1
    assert j.item_id == int(first) and j.comment == "no JS here"
    assert j.scores == {"entities": -s, "relations": -s, "summary": s}
    ctx.close()


def test_guidelines_panel_and_comment_drafts_survive_a_reload(tmp_path, live_server, browser):
    from alignforge.annotate.config import AnnotateConfig

    cfg = AnnotateConfig(
        instructions="Prefer the answer that invents nothing.",
        shortcuts={"guidelines": "h", "comment": "m"},
    )  # keys are configurable
    store, tokens = make_project(tmp_path / "p", annotators=["alice"], cfg=cfg)
    srv = live_server(store.dir)
    page = _page(browser, viewport={"width": 1366, "height": 768})
    page.set_default_timeout(60_000)
    _login(page, srv.url, tokens["alice"])
    assert page.is_visible("text=Prefer the answer that invents nothing.")  # open at first
    page.keyboard.press("h")
    assert not page.is_visible("text=Prefer the answer that invents nothing.")
    page.keyboard.press("g")  # no longer bound
    assert not page.is_visible("text=Prefer the answer that invents nothing.")
    page.keyboard.press("h")
    assert page.is_visible("text=Prefer the answer that invents nothing.")
    item = page.get_attribute("#task", "data-item")
    page.keyboard.press("m")
    page.keyboard.type("entity types look off")
    page.wait_for_timeout(1500)  # the server draft is saved after a short debounce
    page.evaluate("localStorage.clear()")  # only the server's copy is left
    page.reload()
    page.wait_for_selector("#task")
    assert page.get_attribute("#task", "data-item") == item
    assert page.input_value("#comment") == "entity types look off"
