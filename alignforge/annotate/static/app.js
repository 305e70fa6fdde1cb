// Keyboard-first task page. The keys come from annotate.yaml (data-keys): number keys answer
// the current question, next/previous question keys move between questions, the arrow and
// page keys scroll both answers (Shift: the document), Enter saves, Backspace twice skips,
// u undoes the last skip, p opens the last judged item to revise it. Drafts (answers and
// comment) live in localStorage and on the server; the page says "Saved" only after the
// server has committed the judgement. Without JavaScript the page is a plain form.
(function () {
  "use strict";
  const root = document.getElementById("task");
  if (!root) return;
  const itemId = Number(root.dataset.item);
  const csrf = root.dataset.csrf;
  const revising = root.dataset.mode === "revise";
  const aspects = root.dataset.aspects.split(",");
  const choices = root.dataset.choices.split(",");
  const keys = JSON.parse(root.dataset.keys);
  const storeKey = "af-draft-" + root.dataset.user + "-" + itemId + (revising ? "-revise" : "");
  const status = document.getElementById("status");
  const timer = document.getElementById("timer");
  const comment = document.getElementById("comment");
  const rawToggle = document.getElementById("show-raw");
  const guidelines = document.getElementById("guidelines");
  const panes = ["completion-a", "completion-b"].map((id) => document.getElementById(id));
  const doc = document.getElementById("document");

  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(storeKey) || "{}"); } catch (e) { saved = {}; }
  const serverDraft = JSON.parse(root.dataset.draft || "{}");
  const state = {
    answers: Object.assign({}, serverDraft, saved.answers || {}),
    activeMs: saved.activeMs || 0,
    submissionId: saved.submissionId || document.getElementById("submission_id").value,
    current: 0,
    busy: false,
    confirmSkip: false,
  };
  let lastInput = Date.now();
  document.getElementById("submission_id").value = state.submissionId;
  if (typeof saved.comment === "string" && saved.comment && !comment.value) {
    comment.value = saved.comment;  // typed after the last server draft
  }

  function persist() {
    try {
      localStorage.setItem(storeKey, JSON.stringify({
        answers: state.answers, activeMs: state.activeMs, submissionId: state.submissionId,
        comment: comment.value,
      }));
    } catch (e) { /* storage full or disabled: the server draft still holds the answers */ }
  }
  let draftTimer = null;
  function saveDraft() {
    persist();
    if (revising) return;  // a saved judgement has no server draft
    clearTimeout(draftTimer);
    draftTimer = setTimeout(() => {
      fetch("/api/draft", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({ item_id: itemId, answers: state.answers, comment: comment.value }),
      }).catch(() => {});
    }, 400);
  }
  comment.addEventListener("input", saveDraft);

  function render() {
    aspects.forEach((key, i) => {
      const fs = document.getElementById("aspect-" + key);
      fs.classList.toggle("current", i === state.current);
      fs.querySelectorAll("input[type=radio]").forEach((r) => {
        r.checked = state.answers[key] === r.value;
      });
    });
  }
  function answer(key, value) {
    state.answers[key] = value;
    const next = aspects.findIndex((k, i) => i > state.current && !(k in state.answers));
    const first = aspects.findIndex((k) => !(k in state.answers));
    state.current = next >= 0 ? next : first >= 0 ? first : state.current;
    render();
    saveDraft();
  }
  function setStatus(text, cls) {
    status.textContent = text;
    status.className = cls || "";
  }

  async function post(url, body) {
    let lastErr = null;
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        return await fetch(url, {
          method: "POST", credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
          body: JSON.stringify(body),
        });
      } catch (e) {  // network error: retry (submits are idempotent by submission id)
        lastErr = e;
        await new Promise((res) => setTimeout(res, 300 * (attempt + 1)));
      }
    }
    throw lastErr;
  }

  async function submit() {
    if (state.busy) return;
    const missing = aspects.filter((k) => !(k in state.answers));
    if (missing.length) {
      state.current = aspects.indexOf(missing[0]);
      render();
      setStatus("Answer every question first (" + missing.length + " left)", "err");
      return;
    }
    state.busy = true;
    setStatus("Saving…");
    const body = { item_id: itemId, answers: state.answers, comment: comment.value };
    if (!revising) {
      body.submission_id = state.submissionId;
      body.client_active_ms = Math.round(state.activeMs);
    }
    try {
      const r = await post(revising ? "/api/revise" : "/api/submit", body);
      const data = await r.json().catch(() => ({}));
      if (r.ok && data.saved) {
        localStorage.removeItem(storeKey);
        setStatus(revising ? "Revised ✓" : "Saved ✓", "saved");
        setTimeout(() => { window.location.assign("/task"); }, 120);
        return;
      }
      setStatus("Not saved: " + (data.error || r.status), "err");
    } catch (e) {
      setStatus("Not saved: the server cannot be reached. Press " + keys.save + " to retry.", "err");
    }
    state.busy = false;
  }

  // Skipping is final for the queue until undone, so it takes a second press to confirm.
  let confirmTimer = null;
  function askSkip() {
    if (revising || state.busy) return;
    if (state.confirmSkip) { skip(); return; }
    state.confirmSkip = true;
    setStatus("Skip this item? Press " + keys.skip + " again to skip, Esc to keep it.", "confirm");
    document.getElementById("skip").textContent = "Confirm skip";
    clearTimeout(confirmTimer);
    confirmTimer = setTimeout(cancelSkip, 5000);
  }
  function cancelSkip() {
    if (!state.confirmSkip) return;
    state.confirmSkip = false;
    setStatus("");
    document.getElementById("skip").textContent = "Skip (" + keys.skip + " twice)";
  }
  async function skip() {
    state.busy = true;
    setStatus("Skipping…");
    try {
      const r = await post("/api/skip", { item_id: itemId });
      if (r.ok) {
        persist();  // kept: an undone skip brings the answers back
        window.location.assign("/task");
        return;
      }
      setStatus("Could not skip (" + r.status + ")", "err");
    } catch (e) {
      setStatus("Could not skip: the server cannot be reached", "err");
    }
    state.busy = false;
    state.confirmSkip = false;
  }
  async function undoSkip() {
    const last = root.dataset.lastSkip;
    if (!last || state.busy) return;
    state.busy = true;
    try {
      const r = await post("/api/unskip", { item_id: Number(last) });
      const data = await r.json().catch(() => ({}));
      if (r.ok) { window.location.assign("/task/" + last); return; }
      setStatus("Could not undo the skip: " + (data.error || r.status), "err");
    } catch (e) {
      setStatus("Could not undo the skip: the server cannot be reached", "err");
    }
    state.busy = false;
  }

  function scrollPanes(targets, dy) {
    targets.forEach((p) => { if (p) p.scrollBy({ top: dy, behavior: "auto" }); });
  }
  const line = 48;
  const actions = {
    save: () => submit(),
    skip: () => askSkip(),
    undo_skip: () => undoSkip(),
    next_question: () => { state.current = Math.min(aspects.length - 1, state.current + 1); render(); },
    prev_question: () => { state.current = Math.max(0, state.current - 1); render(); },
    scroll_down: (ev) => scrollPanes(ev.shiftKey ? [doc] : panes, line),
    scroll_up: (ev) => scrollPanes(ev.shiftKey ? [doc] : panes, -line),
    page_down: (ev) => scrollPanes(ev.shiftKey ? [doc] : panes, 0.9 * panes[0].clientHeight),
    page_up: (ev) => scrollPanes(ev.shiftKey ? [doc] : panes, -0.9 * panes[0].clientHeight),
    raw: () => { rawToggle.checked = !rawToggle.checked; },
    guidelines: () => { guidelines.open = !guidelines.open; },
    comment: () => comment.focus(),
    revise_previous: () => {
      if (root.dataset.previous) window.location.assign("/task/" + root.dataset.previous);
    },
  };
  const byKey = {};
  Object.entries(keys).forEach(([action, key]) => { byKey[key] = action; });

  document.addEventListener("keydown", (ev) => {
    if (ev.target === comment) {
      if (ev.key === "Escape") { comment.blur(); saveDraft(); }
      else if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); submit(); }
      return;
    }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    lastInput = Date.now();
    if (ev.key === "Escape") { cancelSkip(); return; }
    const action = byKey[ev.key];
    if (action !== "skip") cancelSkip();
    if (choices.includes(ev.key)) {
      ev.preventDefault();
      answer(aspects[state.current], ev.key);
    } else if (action) {
      ev.preventDefault();
      actions[action](ev);
    }
  });
  document.querySelectorAll("fieldset.aspect input[type=radio]").forEach((r) => {
    r.addEventListener("change", () => {
      state.current = aspects.indexOf(r.closest("fieldset").dataset.aspect);
      answer(aspects[state.current], r.value);
    });
  });
  document.getElementById("answers").addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (ev.submitter && ev.submitter.id === "skip") askSkip(); else submit();
  });
  const undoForm = document.getElementById("undo-skip");
  if (undoForm) undoForm.addEventListener("submit", (ev) => { ev.preventDefault(); undoSkip(); });

  // Active time: counted while the page is visible, focused, and used in the last minute.
  ["mousemove", "scroll", "mousedown", "wheel"].forEach((t) =>
    document.addEventListener(t, () => { lastInput = Date.now(); }, { passive: true }));
  let lastTick = Date.now();
  setInterval(() => {
    const now = Date.now();
    if (document.visibilityState === "visible" && document.hasFocus() && now - lastInput < 60000) {
      state.activeMs += now - lastTick;
    }
    lastTick = now;
    const s = Math.floor(state.activeMs / 1000);
    timer.textContent = Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
    persist();
  }, 1000);

  const first = aspects.findIndex((k) => !(k in state.answers));
  state.current = first >= 0 ? first : 0;
  render();
})();
