"""AI judge: an LLM answers the annotators' aspect questions, debiased by swapping positions.

    from alignforge.annotate.judge import OpenAIChatBackend, judge_pair, run_judge
    backend = OpenAIChatBackend("http://127.0.0.1:8000/v1", model="qwen2.5-7b-instruct")
    v = judge_pair(backend, prompt, a_text, b_text, ["entities", "relations", "summary"])
    v.scores          # {'entities': 1, 'relations': 0, 'summary': -1}; + means a is better
    run_judge(store, backend, "qwen2.5-7b-instruct", aspects)   # stored as judge:<model>

Position-swap debiasing (Zheng et al. 2023, "Judging LLM-as-a-judge", sec. 3.4): each pair is
asked twice, (a, b) and (b, a). An aspect keeps its answer only if both orders agree. Otherwise
it becomes a tie. On the 5-point scale both answers must have the same sign, and the smaller
magnitude is kept.

Any object with ``chat(messages, **kw) -> str`` is a backend, and so is a plain callable
``fn(messages, **kw) -> str``. An object with ``judge_item(item, questions, scale) ->
PairVerdict`` judges whole items itself: ``annotate/reference.py``'s judge against gold answers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, Protocol, runtime_checkable

from alignforge.annotate.agreement import cohen_kappa, label
from alignforge.annotate.render import extract_json, split_prompt
from alignforge.errors import UserError


class JudgeError(UserError, RuntimeError):
    """The judge backend failed (HTTP error, bad response, unparseable answer)."""


@runtime_checkable
class ChatBackend(Protocol):
    def chat(self, messages: list[dict], **kw: Any) -> str: ...


class CallableBackend:
    """A plain ``fn(messages, **kw) -> str``; keyword options it does not take are not passed."""

    def __init__(self, fn: Callable[..., str]):
        import inspect

        self.fn = fn
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            params = []
        self.takes = {p.name for p in params}
        self.takes_any = any(p.kind is p.VAR_KEYWORD for p in params)

    def chat(self, messages: list[dict], **kw: Any) -> str:
        return self.fn(
            messages, **{k: v for k, v in kw.items() if self.takes_any or k in self.takes}
        )


def as_backend(x: Any) -> ChatBackend:
    if isinstance(x, ChatBackend):
        return x
    if callable(x):
        return CallableBackend(x)
    raise TypeError(f"a judge backend needs chat(messages) or to be callable, got {type(x)}")


class OpenAIChatBackend:
    """``POST {base_url}/chat/completions`` of any OpenAI-compatible server, through
    :class:`~alignforge.rollout.openai_client.OpenAIChatClient` (connection errors, timeouts,
    429 and 5xx retried with exponential backoff).

    Asks for the ``response_format`` the caller passes (the judge passes a JSON schema of the
    verdict), else ``{"type": "json_object"}``; a server that rejects it (HTTP 400 naming
    response_format) is asked again without it, and never with it again.
    """

    def __init__(
        self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
        max_retries: int = 3, json_mode: bool = True, temperature: float = 0.0,
        max_tokens: int = 512, backoff: float = 0.5,
    ):  # fmt: skip
        from alignforge.rollout.openai_client import OpenAIChatClient

        self.client = OpenAIChatClient(
            base_url, model, api_key=api_key, timeout=timeout, max_retries=max_retries,
            backoff=backoff,
        )  # fmt: skip
        self.url, self.model, self.json_mode = self.client.url, model, json_mode
        self.temperature, self.max_tokens = temperature, max_tokens

    def check(self, field: str = "base_url") -> None:
        """Raise a one-line JudgeError naming ``field`` when no server answers at the base URL,
        before any item is judged (each would fail after its retries). Any reply counts."""
        from alignforge.rollout.openai_client import EndpointError, OpenAIClient

        base = self.client.base_url
        try:
            OpenAIClient(base, self.client.api_key, timeout=10, max_retries=0).get("models")
        except EndpointError as e:
            if e.connection:
                raise JudgeError(
                    f"{field} {base}: cannot connect ({e.detail[:120]}); check that the "
                    "judge's server is running there"
                ) from None

    def chat(self, messages: list[dict], **kw: Any) -> str:
        from alignforge.rollout.openai_client import EndpointError

        wanted = kw.pop("response_format", None) or {"type": "json_object"}
        kw = {"temperature": self.temperature, "max_tokens": self.max_tokens, **kw}
        try:
            if self.json_mode:
                try:
                    return _content(self.client.chat(messages, response_format=wanted, **kw))
                except EndpointError as e:
                    if e.status != 400 or "response_format" not in e.detail:
                        raise
                    self.json_mode = False
            return _content(self.client.chat(messages, **kw))
        except EndpointError as e:
            raise JudgeError(str(e)) from None


def _content(results) -> str:
    if not results:
        raise JudgeError("the judge's reply has no choices")
    return results[0].text


JUDGE_SYSTEM = (
    "You are a meticulous annotator comparing two extractions of entities, relationships and "
    "summaries from a document. Judge only on the questions asked. Answer with one JSON object "
    "and nothing else."
)


def judge_messages(
    prompt: str | list[dict], first: str, second: str, questions: dict[str, str],
    scale: str = "ab", source_document: str | None = None,
) -> list[dict]:  # fmt: skip
    instruction, document = split_prompt(prompt, source_document)
    if scale == "ab":
        how = 'each value is "1" (response 1 is better), "2" (response 2 is better) or "tie"'
    else:
        how = "each value is an integer from -2 to 2: 2 = response 1 much better, 1 = better, " \
              "0 = tie, -1 = response 2 better, -2 = response 2 much better"  # fmt: skip
    qs = "\n".join(f'- "{k}": {q}' for k, q in questions.items())
    keys = ", ".join(f'"{k}": ...' for k in questions)
    user = (
        (f"<instruction>\n{instruction}\n</instruction>\n\n" if instruction else "")
        + f"<document>\n{document}\n</document>\n\n<response_1>\n{first}\n</response_1>\n\n"
        + f"<response_2>\n{second}\n</response_2>\n\nQuestions:\n{qs}\n\n"
        + f"Reply with JSON {{{keys}}} where {how}."
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_FIRST = {"1", "a", "first", "response 1", "response_1", "response1", "r1", "+1", "one"}
_SECOND = {"2", "b", "second", "response 2", "response_2", "response2", "r2", "-1", "two"}
_TIE = {"tie", "0", "equal", "same", "none", "both", "neither", "draw", "="}


def _value(v: Any, scale: str) -> int | None:
    if scale == "likert5":
        try:
            x = int(round(float(v)))
        except (TypeError, ValueError):
            return None
        return x if -2 <= x <= 2 else None
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return {1: 1, 2: -1, 0: 0}.get(int(v)) if float(v).is_integer() else None
    s = str(v).strip().lower().strip(".\"' ")
    return 1 if s in _FIRST else -1 if s in _SECOND else 0 if s in _TIE else None


def parse_verdict(text: str, keys: list[str], scale: str = "ab") -> dict[str, int]:
    """Scores from the first response's point of view (+1 = response 1 better) for every key.

    Reads the first JSON object (code fences and prose ignored; keys matched case-insensitively,
    values like "1", "Response 1", "A", "tie"). Lines such as ``entities: 2`` are a fallback.
    """
    obj = extract_json(text)
    found: dict[str, Any] = {}
    if isinstance(obj, dict):
        found = {str(k).strip().lower(): v for k, v in obj.items()}
        inner = found.get("answers") or found.get("verdict")
        if isinstance(inner, dict):
            found.update({str(k).lower(): v for k, v in inner.items()})
    out = {}
    for k in keys:
        raw = found.get(k.lower())
        if raw is None:
            m = re.search(rf"{re.escape(k)}\W{{0,3}}\s*[:=]\s*\"?([\w -]+)", text, re.I)
            raw = m.group(1) if m else None
        v = _value(raw, scale) if raw is not None else None
        if v is None:
            raise JudgeError(f"judge answer has no valid value for {k!r}: {text[:200]!r}")
        out[k] = v
    return out


class PairVerdict(NamedTuple):
    scores: dict[str, int]  # canonical: + means a is better
    consistent: dict[str, bool]  # both orders agreed on this aspect
    raw: list[str]  # the two answers, (a, b) order first
    why: dict | None = None  # stored instead of ``raw`` when set (the reference judge's measures)


def verdict_response_format(keys: list[str], scale: str = "ab") -> dict:
    """OpenAI ``response_format`` whose JSON schema admits exactly a verdict on ``keys``.

    Servers with structured output (and alignforge's local models, through constrained
    decoding) then cannot answer anything :func:`parse_verdict` rejects.
    """
    value = ({"type": "string", "enum": ["1", "2", "tie"]} if scale == "ab"
             else {"type": "integer", "enum": [-2, -1, 0, 1, 2]})  # fmt: skip
    schema = {"type": "object", "properties": {k: value for k in keys}, "required": list(keys),
              "additionalProperties": False}  # fmt: skip
    return {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}


def _ask(backend, msgs, keys, scale, parse_retries):
    fmt = verdict_response_format(keys, scale)
    for attempt in range(parse_retries + 1):
        text = backend.chat(msgs, response_format=fmt)
        try:
            return parse_verdict(text, keys, scale), text
        except JudgeError:
            if attempt == parse_retries:
                raise
    raise AssertionError("unreachable")


def combine(s1: int, s2: int, scale: str) -> int:
    """Debias: s1 from the (a, b) order, s2 from (b, a) already turned to a's point of view."""
    if scale == "ab":
        return s1 if s1 == s2 else 0
    if s1 * s2 <= 0:
        return 0
    return (1 if s1 > 0 else -1) * min(abs(s1), abs(s2))


def judge_pair(
    backend: Any, prompt: str | list[dict], a: str, b: str, questions: dict[str, str],
    scale: str = "ab", parse_retries: int = 1, source_document: str | None = None,
) -> PairVerdict:  # fmt: skip
    be = as_backend(backend)
    keys = list(questions)
    m1 = judge_messages(prompt, a, b, questions, scale, source_document)
    m2 = judge_messages(prompt, b, a, questions, scale, source_document)
    r1, t1 = _ask(be, m1, keys, scale, parse_retries)
    r2, t2 = _ask(be, m2, keys, scale, parse_retries)
    scores = {k: combine(r1[k], -r2[k], scale) for k in keys}
    consistent = {k: r1[k] == -r2[k] for k in keys}
    return PairVerdict(scores, consistent, [t1, t2])


class JudgeRun(NamedTuple):
    n_items: int
    n_judged: int
    n_already: int
    n_failed: int
    n_inconsistent: int  # aspects turned into ties by the position swap
    errors: list[str]


def run_judge(
    store, backend: Any, model: str, questions: dict[str, str], scale: str = "ab",
    kind: str | None = None, released_only: bool = False, limit: int | None = None,
    workers: int = 4, progress: bool = True,
) -> JudgeRun:  # fmt: skip
    """Judge every item not yet judged by ``judge:<model>`` and store the verdicts."""
    from tqdm import tqdm

    judge_item = item_judge(backend)
    with store.connect() as conn:
        judge = store.judge_user(conn, model)
        where = ["NOT EXISTS (SELECT 1 FROM judgements j WHERE j.item_id = i.id AND j.user_id = ?)"]
        args: list[Any] = [judge.id]
        if kind:
            where.append("i.kind = ?")
            args.append(kind)
        if released_only:
            where.append("i.batch_id IS NOT NULL")
        sql = f"SELECT i.id FROM items i WHERE {' AND '.join(where)} ORDER BY i.id"
        ids = [r[0] for r in conn.execute(sql, args)][: limit if limit is not None else None]
        total = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def one(item_id: int):
        with store.connect() as c:
            v = judge_item(store.item(c, item_id), questions, scale)
            store.record_judge(c, judge, item_id, v.scores, v.why or {"raw": v.raw})
            return sum(not ok for ok in v.consistent.values())

    judged, failed, incons, errors = 0, 0, 0, []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futs = {pool.submit(one, i): i for i in ids}
        for f in tqdm(futs, desc=f"judge:{model}", disable=not progress):
            try:
                incons += f.result()
                judged += 1
            except (JudgeError, OSError, ValueError) as e:
                failed += 1
                errors.append(f"item {futs[f]}: {e}")
    return JudgeRun(len(ids), judged, total - len(ids), failed, incons, errors[:20])


def item_judge(backend: Any) -> Callable[[dict, dict[str, str], str], PairVerdict]:
    """``fn(item, questions, scale) -> PairVerdict``: the backend's own ``judge_item``, or
    :func:`judge_pair` asking a chat backend about the item's prompt and answers."""
    if hasattr(backend, "judge_item"):
        return backend.judge_item
    be = as_backend(backend)

    def ask(it: dict, questions: dict[str, str], scale: str) -> PairVerdict:
        return judge_pair(be, it["prompt"], it["a_text"], it["b_text"], questions, scale,
                          source_document=it.get("source_document"))  # fmt: skip

    return ask


class JudgeAgreement(NamedTuple):
    aspect: str
    n: int  # (judge, human) label pairs
    kappa: float
    kappa_no_ties: float
    accuracy: float  # share of pairs with the same label


def judge_human_agreement(judgements, judge_user: str, aspects: list[str]) -> list[JudgeAgreement]:
    """Cohen's kappa between the judge and the humans, pooled over every human judgement of an
    item the judge also judged (one pair of labels per human judgement)."""
    judge = {j.item_id: j for j in judgements if j.user == judge_user}
    humans = [j for j in judgements if j.role == "annotator" and j.item_id in judge]
    out = []
    for a in [*aspects, "overall"]:
        pairs = []
        for h in humans:
            jd = judge[h.item_id]
            if a == "overall":
                pairs.append((label(jd.overall), label(h.overall)))
            elif a in h.scores and a in jd.scores:
                pairs.append((label(jd.scores[a]), label(h.scores[a])))
        nt = [p for p in pairs if "tie" not in p]
        k = cohen_kappa([p[0] for p in pairs], [p[1] for p in pairs]) if pairs else float("nan")
        knt = cohen_kappa([p[0] for p in nt], [p[1] for p in nt]) if nt else float("nan")
        acc = sum(x == y for x, y in pairs) / len(pairs) if pairs else float("nan")
        out.append(JudgeAgreement(a, len(pairs), k, knt, acc))
    return out


def dumps_verdict(v: PairVerdict) -> str:
    return json.dumps(v._asdict())
