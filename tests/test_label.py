"""Tests of the preference-labelling server (over HTTP), the pair loaders and the page in Chromium."""

from __future__ import annotations

import importlib.util
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from browser import chromium, save_screenshot, set_viewport  # noqa: F401  (chromium is a fixture)

from ppo_rlhf.errors import UserError
from ppo_rlhf.label import load_pairs, make_server, pairs_from_model, skipped_path
from ppo_rlhf.label.server import MAX_BODY_BYTES, append_line

PAIRS = [{"prompt": f"prompt {i}", "a": f"answer A{i}", "b": f"answer B{i}"} for i in range(5)]


@contextmanager
def running(pairs: list[dict], out: Path) -> Iterator[str]:
    """A labelling server on a free loopback port, serving in a thread; yields its URL."""
    server, url = make_server(pairs, out)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def request(url: str, path: str, body: Any = None, *, raw: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON reply) of a GET (no body) or a JSON POST to the server."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method="GET" if data is None else "POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_choices_append_preference_and_sidecar_records(tmp_path: Path) -> None:
    out = tmp_path / "prefs.jsonl"
    with running(PAIRS, out) as url:
        status, state = request(url, "/api/state")
        assert status == 200
        assert (state["done"], state["total"], state["next"]["index"], state["can_undo"]) == (0, 5, 0, False)
        assert request(url, "/api/label", {"index": 0, "choice": 1})[0] == 200
        assert request(url, "/api/label", {"index": 1, "choice": "2"})[0] == 200
        assert request(url, "/api/label", {"index": 2, "choice": "tie"})[0] == 200
        status, state = request(url, "/api/label", {"index": 3, "choice": "skip"})
    assert status == 200 and state["done"] == 4 and state["next"]["index"] == 4 and state["can_undo"]
    assert lines(out) == [
        {"prompt": "prompt 0", "chosen": "answer A0", "rejected": "answer B0"},
        {"prompt": "prompt 1", "chosen": "answer B1", "rejected": "answer A1"},
    ]
    assert lines(skipped_path(out)) == [
        {"prompt": "prompt 2", "a": "answer A2", "b": "answer B2", "label": "tie"},
        {"prompt": "prompt 3", "a": "answer A3", "b": "answer B3", "label": "skip"},
    ]


@pytest.mark.parametrize("raw, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"index": 5, "choice": 1}', 400, '"index" must be an integer in [0, 5)'),
    (b'{"index": -1, "choice": 1}', 400, '"index"'),
    (b'{"index": "0", "choice": 1}', 400, '"index"'),
    (b'{"index": true, "choice": 1}', 400, '"index"'),
    (b'{"choice": 1}', 400, '"index"'),
    (b'{"index": 0, "choice": 3}', 400, '"choice"'),
    (b'{"index": 0, "choice": true}', 400, '"choice"'),
    (b'{"index": 0, "choice": "TIE"}', 400, '"choice"'),
    (b'{"index": 0}', 400, '"choice"'),
    (b'{"index": 0, "choice": 1, "pad": "' + b"x" * MAX_BODY_BYTES + b'"}', 413, "limited"),
], ids=["bad-json", "not-object", "index-too-big", "index-negative", "index-string", "index-bool",
        "no-index", "choice-3", "choice-bool", "choice-case", "no-choice", "too-large"])
def test_bad_requests_are_refused_and_write_nothing(tmp_path: Path, raw: bytes, status: int,
                                                    message: str) -> None:
    out = tmp_path / "prefs.jsonl"
    with running(PAIRS, out) as url:
        got, reply = request(url, "/api/label", raw=raw)
        assert (got, message in reply["error"]) == (status, True), reply
        assert request(url, "/api/state")[1]["done"] == 0
    assert not out.exists() and not skipped_path(out).exists()


def test_wrong_content_type_endpoint_host_and_origin_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "prefs.jsonl"
    body = b'{"index": 0, "choice": 1}'
    with running(PAIRS, out) as url:
        assert request(url, "/api/label", raw=body, headers={"Content-Type": "text/plain"})[0] == 415
        assert request(url, "/api/nope", raw=body)[0] == 404
        assert request(url, "/static/../server.py")[0] == 404
        assert request(url, "/api/label", raw=body, headers={"Host": "evil.example:80"})[0] == 403
        assert request(url, "/api/label", raw=body, headers={"Origin": "http://evil.example"})[0] == 403
        assert request(url, "/api/label", raw=body, headers={"Origin": url.rstrip("/")})[0] == 200
        status, reply = request(url, "/api/label", raw=body)
        assert status == 409 and "already labelled" in reply["error"]
    assert len(lines(out)) == 1


def test_page_and_static_files_are_served(tmp_path: Path) -> None:
    with running(PAIRS, tmp_path / "prefs.jsonl") as url:
        with urllib.request.urlopen(url, timeout=10) as resp:
            page = resp.read().decode()
            assert resp.headers["Content-Type"].startswith("text/html")
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        assert "1 is better" in page and 'id="progress"' in page
        for name in ("app.js", "style.css"):
            with urllib.request.urlopen(url + "static/" + name, timeout=10) as resp:
                assert resp.status == 200 and resp.read()


def test_undo_removes_the_last_label_of_this_session_only(tmp_path: Path) -> None:
    out = tmp_path / "prefs.jsonl"
    earlier = {"prompt": "prompt 4", "chosen": "answer B4", "rejected": "answer A4"}
    out.write_text(json.dumps(earlier) + "\n")
    with running(PAIRS, out) as url:
        request(url, "/api/label", {"index": 0, "choice": 1})
        request(url, "/api/label", {"index": 1, "choice": "tie"})
        status, state = request(url, "/api/undo", {})
        assert status == 200 and state["next"]["index"] == 1 and state["done"] == 2 and state["can_undo"]
        assert lines(skipped_path(out)) == []
        status, state = request(url, "/api/undo", {})
        assert status == 200 and state["next"]["index"] == 0 and state["done"] == 1 and not state["can_undo"]
        status, reply = request(url, "/api/undo", {})
        assert status == 409 and "nothing to undo" in reply["error"]
    assert lines(out) == [earlier]


def test_restart_resumes_after_the_labelled_pairs(tmp_path: Path) -> None:
    out = tmp_path / "prefs.jsonl"
    out.write_text(json.dumps({"prompt": "prompt 0", "chosen": "answer B0", "rejected": "answer A0"}) + "\n"
                   + json.dumps({"prompt": "other", "chosen": "x", "rejected": "y"}) + "\n")
    skipped_path(out).write_text(json.dumps({"prompt": "prompt 1", "a": "answer A1", "b": "answer B1",
                                             "label": "skip"}) + "\n")
    with running(PAIRS, out) as url:
        state = request(url, "/api/state")[1]
        assert (state["done"], state["total"], state["next"]["index"]) == (2, 5, 2)
    out.write_text(out.read_text() + '{"prompt": "torn')
    with pytest.raises(UserError, match=f"{out}:3: not valid JSON"):
        make_server(PAIRS, out)


def test_many_concurrent_clients_lose_no_label(tmp_path: Path) -> None:
    threads, per_thread = 20, 10
    pairs = [{"prompt": f"p{i}", "a": f"a{i} " + "é" * 500, "b": f"b{i}"} for i in range(threads * per_thread)]
    out = tmp_path / "prefs.jsonl"
    statuses: list[int] = []
    with running(pairs, out) as url:
        def client(t: int) -> None:
            for k in range(per_thread):
                index = t * per_thread + k
                choice = [1, 2, "tie"][index % 3]
                statuses.append(request(url, "/api/label", {"index": index, "choice": choice})[0])

        workers = [threading.Thread(target=client, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=30)
        assert request(url, "/api/state")[1]["done"] == len(pairs)
    assert statuses == [200] * len(pairs)
    records = lines(out) + lines(skipped_path(out))  # json.loads of every line: all whole
    assert sorted(r["prompt"] for r in records) == sorted(p["prompt"] for p in pairs)
    assert len(lines(out)) == 134 and len(lines(skipped_path(out))) == 66


def test_append_line_never_glues_onto_an_unterminated_line(tmp_path: Path) -> None:
    path = tmp_path / "f.jsonl"
    path.write_text('{"a": 1}')
    append_line(path, '{"b": 2}\n')
    append_line(path, '{"c": 3}\n')
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n{"c": 3}\n'


def test_load_pairs_reads_both_formats(tmp_path: Path, caplog) -> None:
    path = tmp_path / "pairs.jsonl"
    records = [{"prompt": "p", "a": "x", "b": "y"}, {"prompt": "q", "chosen": "good", "rejected": "bad"}]
    records += [{"prompt": f"r{i}", "chosen": "good", "rejected": "bad"} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in records + [records[0]]) + "\n\n")
    pairs = load_pairs(path)
    assert len(pairs) == 22 and "line 1" in caplog.text  # the duplicate on line 23 is dropped
    assert pairs[0] == {"prompt": "p", "a": "x", "b": "y"}
    assert all({p["a"], p["b"]} == {"good", "bad"} for p in pairs[1:])
    # The old label's side is hidden: "chosen" is shown first for some pairs only, the same way each time.
    assert 0 < sum(p["a"] == "good" for p in pairs[1:]) < 21
    assert load_pairs(path) == pairs


@pytest.mark.parametrize("line, message", [
    ("{oops", "pairs.jsonl:2: not valid JSON"),
    ("[1]", "pairs.jsonl:2: expected a JSON object"),
    ('{"prompt": "p", "a": "x"}', "pairs.jsonl:2: field 'b' is missing"),
    ('{"prompt": "p", "chosen": "x", "rejected": 3}', "pairs.jsonl:2: field 'rejected' must be a string"),
    ('{"prompt": "p", "response": "x"}', "pairs.jsonl:2: no response fields"),
])
def test_load_pairs_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "a": "x", "b": "y"}\n' + line + "\n")
    with pytest.raises(UserError, match=message):
        load_pairs(path)


def test_load_pairs_missing_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        load_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no pairs"):
        load_pairs(tmp_path / "empty.jsonl")


BROWSER_PAIRS = [
    {"prompt": "Write a short, friendly sentence about the weather.",
     "a": "The sun is out and the air is warm: a lovely day for a walk in the park.",
     "b": "weather weather good good good good good"},
    {"prompt": "Summarise in one sentence: the team meeting moved from Tuesday 10 am to Thursday 3 pm "
               "because the demo server is being upgraded on Tuesday.",
     "a": "Meeting moved.",
     "b": "The team meeting is now on Thursday at 3 pm, not Tuesday at 10 am, because of the demo-server "
          "upgrade."},
    {"prompt": "What is 17 + 25? Answer with the number only.", "a": "42", "b": "17 + 25 = 43"},
    {"prompt": "Name a colour of the rainbow.", "a": "Green", "b": "Indigo"},
    {"prompt": "Reverse the list [3, 1, 2].", "a": "[2, 1, 3]", "b": "[1, 2, 3]"},
]


@pytest.mark.browser
def test_page_end_to_end_in_chromium(tmp_path: Path, chromium) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out = tmp_path / "prefs.jsonl"
    with running(BROWSER_PAIRS, out) as url:
        set_viewport(chromium, 1280, 600)
        chromium.get(url)
        wait = WebDriverWait(chromium, 10)

        def shows(progress: str, pair: int) -> None:
            wait.until(lambda d: d.find_element(By.ID, "progress").text == progress
                       and d.find_element(By.ID, "prompt").text == BROWSER_PAIRS[pair]["prompt"])

        shows("0 / 5", 0)
        chromium.find_element(By.ID, "btn-1").click()
        shows("1 / 5", 1)
        assert chromium.find_element(By.ID, "status").text == "Saved: response 1 is better"
        save_screenshot(chromium, "label.png")
        body = chromium.find_element(By.TAG_NAME, "body")
        body.send_keys("2")
        shows("2 / 5", 2)
        body.send_keys("t")
        shows("3 / 5", 3)
        body.send_keys("u")
        shows("2 / 5", 2)
        assert chromium.find_element(By.ID, "status").text == "Undone: that pair is shown again"
    first, second = BROWSER_PAIRS[0], BROWSER_PAIRS[1]
    assert out.read_text(encoding="utf-8") == (
        json.dumps({"prompt": first["prompt"], "chosen": first["a"], "rejected": first["b"]}) + "\n"
        + json.dumps({"prompt": second["prompt"], "chosen": second["b"], "rejected": second["a"]}) + "\n"
    )
    assert skipped_path(out).read_text(encoding="utf-8") == ""


_MODEL_DEPS = ("ppo_rlhf.generation", "ppo_rlhf.tokenizer", "ppo_rlhf.models", "ppo_rlhf.data.encode",
               "ppo_rlhf.data.collate", "ppo_rlhf.data.jsonl")


def test_pairs_from_model(tmp_path: Path) -> None:
    missing = [m for m in _MODEL_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"pairs_from_model needs modules not written yet: {', '.join(missing)}")
    from ppo_rlhf.models import load_causal_lm, save_model
    from ppo_rlhf.tokenizer import train_tokenizer

    prompts = ["2 + 3 =", "7 + 1 =", "4 + 4 ="]
    tokenizer = train_tokenizer([p + " 5 8 9 10" for p in prompts] * 5, vocab_size=300)
    model_dir = save_model(load_causal_lm("tiny-gpt2", tokenizer, seed=0), tokenizer, tmp_path / "model")
    prompts_path = tmp_path / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))

    pairs = pairs_from_model(model_dir, prompts_path, 5, max_new_tokens=8, temperature=1.0, seed=0)
    assert [p["prompt"] for p in pairs] == prompts + prompts[:2]  # cycles through the file
    assert all(isinstance(p["a"], str) and isinstance(p["b"], str) for p in pairs)
    assert any(p["a"] != p["b"] for p in pairs)  # two independent samples, not one copied
    assert pairs == pairs_from_model(model_dir, prompts_path, 5, max_new_tokens=8, temperature=1.0, seed=0)
    with pytest.raises(UserError, match="temperature"):
        pairs_from_model(model_dir, prompts_path, 5, max_new_tokens=8, temperature=0.0, seed=0)


def test_pairs_with_identical_responses_are_skipped_and_counted(tmp_path: Path) -> None:
    pairs = [*PAIRS, {"prompt": "2 + 6 =", "a": "8", "b": "8"}, {"prompt": "1 + 1 =", "a": "2", "b": "2"}]
    with running(pairs, tmp_path / "prefs.jsonl") as url:
        _, state = request(url, "/api/state")
        assert state["total"] == len(PAIRS) and state["identical_skipped"] == 2
        for _ in PAIRS:
            assert state["next"]["a"] != state["next"]["b"]
            _, state = request(url, "/api/label", {"index": state["next"]["index"], "choice": 1})
        assert state["next"] is None
    page = Path(__file__).resolve().parents[1] / "src" / "ppo_rlhf" / "label" / "static"
    assert 'id="identical"' in (page / "index.html").read_text()
    assert "identical_skipped" in (page / "app.js").read_text()


def test_pairs_from_model_redraws_identical_responses(tmp_path: Path, monkeypatch) -> None:
    """Prompt 0's two responses come out identical on the first two draws, prompt 2's on every
    draw: prompt 0 is sampled again until they differ; prompt 2 stays identical (the page skips it)."""
    import torch

    import ppo_rlhf.generation
    from ppo_rlhf.models import load_causal_lm, save_model
    from ppo_rlhf.tokenizer import train_tokenizer

    prompts = ["2 + 3 =", "7 + 1 =", "4 + 4 ="]
    tokenizer = train_tokenizer([p + " 5 8 9 10" for p in prompts] * 5, vocab_size=300)
    model_dir = save_model(load_causal_lm("tiny-gpt2", tokenizer, seed=0), tokenizer, tmp_path / "model")
    prompts_path = tmp_path / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    calls: list[int] = []

    def fake_generate(model, input_ids, attention_mask, **_):
        """Rows come in pairs (one prompt twice): "4 + 4 =" always answers 8 twice, "2 + 3 ="
        answers 5 twice on the first two draws; otherwise the two rows differ."""
        calls.append(input_ids.size(0))
        out = []
        for row in range(input_ids.size(0)):
            text = tokenizer.decode(input_ids[row][attention_mask[row].bool()].tolist(), skip_special_tokens=True)
            if text == "4 + 4 =" or (text == "2 + 3 =" and len(calls) <= 2):
                out.append(digits[int(text[0]) + int(text[4])])
            else:
                out.append(digits[row % 2])
        ids = torch.tensor(out).unsqueeze(1)
        return ids, torch.ones_like(ids, dtype=torch.bool)

    monkeypatch.setattr(ppo_rlhf.generation, "generate", fake_generate)
    pairs = pairs_from_model(model_dir, prompts_path, 3, max_new_tokens=1, temperature=1.0, seed=0)
    assert calls == [6, 4, 4, 2]  # all; prompts 0 and 2 twice; then prompt 2 alone: 3 redraws in all
    assert pairs[0]["a"] != pairs[0]["b"] and pairs[1]["a"] != pairs[1]["b"]
    assert pairs[2]["a"] == pairs[2]["b"] == "8"
    assert (pairs[0]["a"], pairs[0]["b"]) == ("0", "1")  # the third draw
