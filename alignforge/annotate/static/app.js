// Keyboard-first task page: number keys answer the current question, arrows move between
// questions, Enter saves, Backspace skips. Drafts live in localStorage and on the server; the
// page says "Saved" only after the server has committed the judgement.
(function () {
  "use strict";
  const root = document.getElementById("task");
  if (!root) return;
  const itemId = Number(root.dataset.item);
  const csrf = root.dataset.csrf;
  const aspects = root.dataset.aspects.split(",");
  const choices = root.dataset.choices.split(",");
  const storeKey = "af-draft-" + root.dataset.user + "-" + itemId;
  const status = document.getElementById("status");
  const timer = document.getElementById("timer");
  const comment = document.getElementById("comment");
  const rawToggle = document.getElementById("show-raw");

  function newId() {
    const b = new Uint8Array(16);
    crypto.getRandomValues(b);
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  }
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(storeKey) || "{}"); } catch (e) { saved = {}; }
  const serverDraft = JSON.parse(root.dataset.draft || "{}");
  const state = {
    answers: Object.assign({}, serverDraft, saved.answers || {}),
    activeMs: saved.activeMs || 0,
    submissionId: saved.submissionId || newId(),
    current: 0,
    busy: false,
  };
  let lastInput = Date.now();
  document.getElementById("submission_id").value = state.submissionId;
  if (typeof saved.comment === "string" && saved.comment && !comment.value) {
    comment.value = saved.comment;  // typed after the last server draft
  }
  comment.addEventListener("input", saveDraft);

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
    clearTimeout(draftTimer);
    draftTimer = setTimeout(() => {
      fetch("/api/draft", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({ item_id: itemId, answers: state.answers, comment: comment.value }),
      }).catch(() => {});
    }, 400);
  }

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
        const r = await fetch(url, {
          method: "POST", credentials: "same-origin",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
          body: JSON.stringify(body),
        });
        return r;
      } catch (e) {  // network error: retry with the same submission id (idempotent)
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
    try {
      const r = await post("/api/submit", {
        item_id: itemId, submission_id: state.submissionId, answers: state.answers,
        client_active_ms: Math.round(state.activeMs), comment: comment.value,
      });
      const data = await r.json().catch(() => ({}));
      if (r.ok && data.saved) {
        localStorage.removeItem(storeKey);
        setStatus("Saved ✓", "saved");
        setTimeout(() => { window.location.assign("/task"); }, 120);
        return;
      }
      setStatus("Not saved: " + (data.error || r.status), "err");
    } catch (e) {
      setStatus("Not saved: the server cannot be reached. Press Enter to retry.", "err");
    }
    state.busy = false;
  }

  async function skip() {
    if (state.busy) return;
    state.busy = true;
    setStatus("Skipping…");
    try {
      const r = await post("/api/skip", { item_id: itemId });
      if (r.ok) {
        localStorage.removeItem(storeKey);
        window.location.assign("/task");
        return;
      }
      setStatus("Could not skip (" + r.status + ")", "err");
    } catch (e) {
      setStatus("Could not skip: the server cannot be reached", "err");
    }
    state.busy = false;
  }

  document.addEventListener("keydown", (ev) => {
    if (ev.target === comment) {
      if (ev.key === "Escape") { comment.blur(); saveDraft(); }
      else if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); submit(); }
      return;
    }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    lastInput = Date.now();
    if (choices.includes(ev.key)) {
      ev.preventDefault();
      answer(aspects[state.current], ev.key);
    } else if (ev.key === "ArrowDown" || ev.key === "j") {
      ev.preventDefault();
      state.current = Math.min(aspects.length - 1, state.current + 1); render();
    } else if (ev.key === "ArrowUp" || ev.key === "k") {
      ev.preventDefault();
      state.current = Math.max(0, state.current - 1); render();
    } else if (ev.key === "Enter") {
      ev.preventDefault(); submit();
    } else if (ev.key === "Backspace") {
      ev.preventDefault(); skip();
    } else if (ev.key === "c") {
      ev.preventDefault(); comment.focus();
    } else if (ev.key === "r") {
      ev.preventDefault(); rawToggle.checked = !rawToggle.checked;
    }
  });
  document.querySelectorAll("fieldset.aspect input[type=radio]").forEach((r) => {
    r.addEventListener("change", () => {
      state.current = aspects.indexOf(r.closest("fieldset").dataset.aspect);
      answer(aspects[state.current], r.value);
    });
  });
  document.getElementById("answers").addEventListener("submit", (ev) => { ev.preventDefault(); submit(); });
  document.getElementById("skip").addEventListener("click", skip);

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
