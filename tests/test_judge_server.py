"""judge=openai against a scripted OpenAI-compatible server on 127.0.0.1.

The server's reply depends on a marker in the summary being rated, so each behaviour
is deterministic under concurrent requests: a reply with top_logprobs, a plain
integer, malformed text, a slow first answer (a timeout, then a retry), a 429 with
Retry-After, a 500 that never clears, and a 401 that echoes the key back. The API key
must reach the server and nothing else: no file, no log line, no message.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException as HydraCompositionError
from omegaconf import open_dict

from conftest import compose_cfg
from ftexp import judge, recipes
from ftexp.config import validate
from ftexp.errors import ConfigError
from ftexp.tasks import build_task

SECRET = "sk-test-7f3a9c-NEVER-WRITE-ME"
DIALOGSUM = ["data=dialogsum", "task=summarization", "eval.n=4", "train.max_steps=2",
             "task.generation.max_new_tokens=8"]


class Script(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions by the marker in the rated summary."""

    seen: list  # (marker, time, authorization header) per request
    counts: dict

    def log_message(self, *args):  # keep the test output quiet
        pass

    def _send(self, status: int, body: dict | str, headers: dict | None = None) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except BrokenPipeError:  # the client timed out and left: the point of SLOW
            pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"]
        marker = next((m for m in ("LOGPROBS", "PLAIN", "MALFORMED", "OUTOFRANGE", "SLOW", "BUSY", "DOWN", "DENIED")
                       if m in text), "OTHER")
        auth = self.headers.get("Authorization")
        with LOCK:
            Script.seen.append((marker, time.monotonic(), auth, body))
            Script.counts[marker] = Script.counts.get(marker, 0) + 1
            count = Script.counts[marker]
        if marker == "LOGPROBS":
            tops = [{"token": "4", "logprob": math.log(0.6)}, {"token": " 3", "logprob": math.log(0.3)},
                    {"token": "5", "logprob": math.log(0.1)}, {"token": "The", "logprob": math.log(0.001)}]
            return self._send(200, reply("4", [{"token": "4", "logprob": math.log(0.6), "top_logprobs": tops}]))
        if marker == "PLAIN":
            return self._send(200, reply("Score: 3 out of 5"))
        if marker == "MALFORMED":
            return self._send(200, reply("I would rather not say."))
        if marker == "OUTOFRANGE":
            return self._send(200, reply("7"))
        if marker == "SLOW":
            if count == 1:
                time.sleep(1.5)  # past the client's timeout
            return self._send(200, reply("2"))
        if marker == "BUSY":
            if count == 1:
                return self._send(429, {"error": "slow down"}, {"Retry-After": "1"})
            return self._send(200, reply("5"))
        if marker == "DOWN":
            return self._send(500, {"error": "internal"})
        if marker == "DENIED":
            return self._send(401, {"error": f"bad key {auth}"})
        return self._send(200, reply("3"))


LOCK = threading.Lock()


def reply(content: str, logprobs: list | None = None) -> dict:
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


@pytest.fixture
def server():
    Script.seen, Script.counts = [], {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Script)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def openai_cfg(base_url: str, tmp_path: Path, *extra: str):
    cfg = compose_cfg([*DIALOGSUM, "judge=openai", f"judge.base_url={base_url}", "judge.model=scripted",
                       "judge.timeout_s=0.5", "judge.max_retries=2", "judge.backoff_s=0.01",
                       f"cache_dir={tmp_path / 'cache'}", *extra], tmp_path / "out")
    with open_dict(cfg):
        cfg.judge.criteria = {"fluency": cfg.judge.criteria.fluency}
    validate(cfg)
    return cfg


def test_a_reply_gives_its_first_integer_if_it_is_a_rating_and_never_a_guess():
    assert judge.rating_from_reply("4", None)["score"] == 4
    assert judge.rating_from_reply("Score: 2/5", None)["score"] == 2
    assert judge.rating_from_reply("On a scale of 1 to 5 it is a 4", None)["score"] == 1  # the first, not a guess
    for bad in ("", "excellent", "7", "10 out of 10", "0", "Rating: 3.5"):
        assert judge.rating_from_reply(bad, None)["score"] is None
    # list numbers and digits inside words are not ratings: a small model that echoes the rubric's
    # steps ("1. Read the conversation ...") or names a speaker ("#Person1#") gave none
    for echo in ("1. Read the summary.\n2. Note errors", "1. Read the summary.\n2", "  2) Check each statement",
                 "#Person1# and #Person2# meet"):
        assert judge.rating_from_reply(echo, None)["score"] is None
    assert judge.rating_from_reply("Steps:\n1. Read it\nScore: 4", None)["score"] == 4
    tokens = [{"token": "Score", "top_logprobs": []}, {"token": ":", "top_logprobs": []},
              {"token": " 4", "top_logprobs": [{"token": " 4", "logprob": math.log(0.5)},
                                              {"token": "4", "logprob": math.log(0.1)},
                                              {"token": " 2", "logprob": math.log(0.5)}]}]
    got = judge.rating_from_reply("Score: 4", tokens)  # the distribution where the rating was generated
    assert got["score"] == pytest.approx(3.0) and got["probs"] == [0, 0.5, 0, 0.5, 0]


def test_the_server_judge_parses_retries_and_caches(server, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    cfg = openai_cfg(server, tmp_path)
    markers = ["LOGPROBS", "PLAIN", "MALFORMED", "OUTOFRANGE", "SLOW", "BUSY", "DOWN"]
    records = [{"dialogue": f"#Person1#: hello {m}", "summary": "x"} for m in markers]
    rows = [{"prediction": f"They talk. {m}"} for m in markers]
    task = build_task(cfg.task)

    start = time.monotonic()
    got = judge.judge_predictions(cfg, task, records, rows, "cpu")
    by = {m: r for m, r in zip(markers, rows)}
    assert by["LOGPROBS"]["judge"]["fluency"] == pytest.approx(0.6 * 4 + 0.3 * 3 + 0.1 * 5, abs=1e-4)
    assert by["LOGPROBS"]["judge_argmax"]["fluency"] == 4
    assert by["PLAIN"]["judge"]["fluency"] == 3 and by["PLAIN"]["judge_reply"]["fluency"] == "Score: 3 out of 5"
    assert by["MALFORMED"]["judge"]["fluency"] is None and by["OUTOFRANGE"]["judge"]["fluency"] is None
    assert by["MALFORMED"]["judge_reply"]["fluency"] == "I would rather not say."
    assert by["SLOW"]["judge"]["fluency"] == 2  # timed out once, answered on the retry
    assert by["BUSY"]["judge"]["fluency"] == 5
    assert by["DOWN"]["judge"]["fluency"] is None  # 3 tries, then left out
    assert got["judge/n"] == 7 and got["judge/unparsed"] == 2 and got["judge/failed"] == 1
    assert got["judge/fluency"] == pytest.approx((3.8 + 3 + 2 + 5) / 4, abs=1e-4)  # the rated ones only
    assert Script.counts == {"LOGPROBS": 1, "PLAIN": 1, "MALFORMED": 1, "OUTOFRANGE": 1, "SLOW": 2, "BUSY": 2,
                             "DOWN": 3}
    assert got["judge/requests"] == sum(Script.counts.values()) == 11
    busy = [t for m, t, _, _ in Script.seen if m == "BUSY"]
    assert busy[1] - busy[0] >= 0.9  # Retry-After: 1 was honoured over the 0.01 s backoff
    assert all(auth == f"Bearer {SECRET}" for _, _, auth, _ in Script.seen)
    sent = Script.seen[0][3]
    assert sent["model"] == "scripted" and sent["temperature"] == 0 and sent["logprobs"] and sent["top_logprobs"] == 5
    assert time.monotonic() - start < 20

    # the identical rerun: every rating from the cache, except the one that failed
    Script.seen.clear()
    Script.counts.clear()
    rows2 = [{"prediction": f"They talk. {m}"} for m in markers]
    again = judge.judge_predictions(cfg, task, records, rows2, "cpu")
    assert Script.counts == {"DOWN": 3} and again["judge/requests"] == 3 and again["judge/cache_hits"] == 6
    assert again["judge/fluency"] == pytest.approx(got["judge/fluency"])

    # the key reached the server and nothing else
    assert SECRET not in caplog.text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_run_judged_by_a_server_writes_no_key_anywhere(server, tmp_path, caplog, monkeypatch, shared_data):
    monkeypatch.setenv("FTEXP_JUDGE_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    run = tmp_path / "run"
    recipes.finetune(compose_cfg([*DIALOGSUM, f"data.path={shared_data / 'dialogsum'}"], run))
    over = ["judge=openai", f"judge.base_url={server}", "judge.model=scripted", "judge.api_key_env=FTEXP_JUDGE_KEY",
            "judge.references=true", "judge.control=true", f"cache_dir={tmp_path / 'cache'}"]
    got = recipes.evaluate_only(compose_cfg([f"run={run}", *over], tmp_path / "judged"),
                                overrides=["run", "judge", "judge.base_url", "judge.model", "judge.api_key_env",
                                           "judge.references", "judge.control", "cache_dir"])
    assert got["judge/n"] == 4 and got["judge/relevance"] == 3 and got["judge/reference_fluency"] == 3
    assert got["judge/control_gap_consistency"] == 0 and got["judge/control_ok"] == 0  # a judge that always says 3
    assert all(got[f"judge/valid_{c}"] == 0 for c in ("relevance", "coherence", "consistency", "fluency"))
    assert got["judge/requests"] == 4 * 4 * 3 and got["judge/unparsed"] == 0
    saved = (tmp_path / "judged" / "config.yaml").read_text()
    assert "api_key_env: FTEXP_JUDGE_KEY" in saved  # the variable's name, never its value
    assert SECRET not in caplog.text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_a_server_that_is_down_or_refuses_the_key_stops_the_judge_with_a_clear_message(server, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    cfg = openai_cfg(closed, tmp_path, "judge.max_retries=1")
    task = build_task(cfg.task)
    records, rows = [{"dialogue": "a", "summary": "b"}], [{"prediction": "c"}]
    with pytest.raises(judge.JudgeError, match="did not answer .* Is it running"):
        judge.judge_predictions(cfg, task, records, rows, "cpu")

    cfg = openai_cfg(server, tmp_path)
    with pytest.raises(judge.JudgeError, match=r"HTTP 401.*Check the key in \$OPENAI_API_KEY") as err:
        judge.judge_predictions(cfg, task, records, [{"prediction": "DENIED"}], "cpu")
    assert SECRET not in str(err.value) and "***" in str(err.value)  # the server echoed it; the message masks it


def test_openai_judge_settings_are_checked_before_anything_loads(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="judge.base_url=None"):
        validate(compose_cfg([*DIALOGSUM, "judge=openai", "judge.model=m"]))
    with pytest.raises(ConfigError, match="judge.model is not set"):
        validate(compose_cfg([*DIALOGSUM, "judge=openai", "judge.base_url=http://127.0.0.1:1/v1"]))
    with pytest.raises(ConfigError, match="export OPENAI_API_KEY"):
        validate(compose_cfg([*DIALOGSUM, "judge=openai", "judge.model=gpt-4o-mini",
                              "judge.base_url=https://api.openai.com/v1"]))
    with pytest.raises(ConfigError, match="judge.concurrency=0"):
        validate(compose_cfg([*DIALOGSUM, "judge=openai", "judge.model=m", "judge.base_url=http://h/v1",
                              "judge.concurrency=0"]))
    with pytest.raises(HydraCompositionError) as err:
        compose_cfg([*DIALOGSUM, "judge.name=gpt"])
    assert "expected one of [none, hf, openai]" in str(err.value.__cause__)


def test_the_samsum_study_preset_asks_for_its_judge_server(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = compose_cfg(["experiment=samsum_falcon_7b_qlora"], fast=False)
    assert cfg.judge.name == "openai" and cfg.judge.references and cfg.judge.control
    assert set(cfg.judge.criteria) == {"relevance", "coherence", "consistency", "fluency"}
    with pytest.raises(ConfigError, match="judge.base_url=None: the judge=openai server's API root"):
        validate(cfg)
    validate(compose_cfg(["experiment=samsum_falcon_7b_qlora", "judge.base_url=http://127.0.0.1:8000/v1",
                          "judge.model=some-instruct-model"], fast=False))
