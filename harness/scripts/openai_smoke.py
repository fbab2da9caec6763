#!/usr/bin/env python3
"""Drive an OpenAI-compatible endpoint with the official `openai` client.

Why: the gateway must stay transparent to real SDKs, so tests point this at the
mock model server directly, or at Envoy in front of it, and check that the
client parses every response and that usage matches the mock's token rules
(prompt_tokens = whitespace-separated words of the prompt, completion_tokens =
max_tokens per choice).

Usage:
  openai_smoke.py --base-url http://127.0.0.1:PORT/v1 --api-key KEY
                  [--expect-prompt N] [--max-tokens K] [--prompt TEXT]
                  [--model M] [--header 'Name: value' ...]
                  [--only STEP ...]
  openai_smoke.py ... --expect-error STATUS [--call chat|stream|completions|embeddings|models]

Normal mode runs models.list, chat (plain and streamed with include_usage),
completions (plain and streamed) and embeddings, then prints one JSON line
{"ok": true, ...}. --expect-error makes one call (default: chat), requires an
openai.APIStatusError with that status, and prints its message/code/type.
Exit 0 on success; 1 with {"ok": false, "error": ...} on stdout and a message
on stderr otherwise; 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

try:
    import openai
except ImportError:  # pragma: no cover - environment problem, not a test result
    print("openai_smoke: the `openai` package is not installed", file=sys.stderr)
    sys.exit(2)

DEFAULT_PROMPT = "Say hello to the tollgate gateway"


class CheckFailed(Exception):
    pass


def words(text: str) -> int:
    return len(text.split())


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)


def fail(msg: str, **extra: Any) -> NoReturn:
    print(json.dumps({"ok": False, "error": msg, **extra}, default=str))
    print(f"openai_smoke: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def dump(obj: Any) -> Any:
    return obj.model_dump(exclude_none=True) if obj is not None else None


def check_usage(what: str, usage: Any, prompt: int, completion: int | None) -> dict:
    check(usage is not None, f"{what}: response has no usage")
    check(
        usage.prompt_tokens == prompt,
        f"{what}: prompt_tokens {usage.prompt_tokens}, expected {prompt}",
    )
    if completion is not None:
        check(
            usage.completion_tokens == completion,
            f"{what}: completion_tokens {usage.completion_tokens}, expected {completion}",
        )
        check(
            usage.total_tokens == prompt + completion,
            f"{what}: total_tokens {usage.total_tokens}, expected {prompt + completion}",
        )
    else:
        check(usage.total_tokens == prompt, f"{what}: total_tokens {usage.total_tokens}, expected {prompt}")
    return dump(usage)


def run_models(client: openai.OpenAI) -> list[str]:
    ids = [m.id for m in client.models.list()]
    check(len(ids) > 0, "models.list returned no models")
    return ids


def run_chat(client: openai.OpenAI, a: argparse.Namespace, expect_prompt: int) -> dict:
    r = client.chat.completions.create(
        model=a.model,
        messages=[{"role": "user", "content": a.prompt}],
        max_tokens=a.max_tokens,
    )
    check(r.object == "chat.completion", f"chat: object {r.object!r}")
    check(r.id.startswith("chatcmpl-"), f"chat: id {r.id!r}")
    check(r.model == a.model, f"chat: model {r.model!r}, expected {a.model!r}")
    check(len(r.choices) == 1, f"chat: {len(r.choices)} choices")
    choice = r.choices[0]
    content = choice.message.content or ""
    check(choice.message.role == "assistant", f"chat: role {choice.message.role!r}")
    check(choice.finish_reason == "length", f"chat: finish_reason {choice.finish_reason!r}")
    check(words(content) == a.max_tokens, f"chat: {words(content)} words in {content!r}, expected {a.max_tokens}")
    usage = check_usage("chat", r.usage, expect_prompt, a.max_tokens)
    return {"id": r.id, "content": content, "usage": usage}


def run_chat_stream(client: openai.OpenAI, a: argparse.Namespace, expect_prompt: int) -> dict:
    stream = client.chat.completions.create(
        model=a.model,
        messages=[{"role": "user", "content": a.prompt}],
        max_tokens=a.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    check(len(chunks) >= 2, f"chat stream: only {len(chunks)} chunks")
    last = chunks[-1]
    check(last.choices == [], f"chat stream: last chunk has choices {last.choices!r}")
    for c in chunks[:-1]:
        check(c.usage is None, "chat stream: usage before the final chunk")
        check(c.object == "chat.completion.chunk", f"chat stream: object {c.object!r}")
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(finish == ["length"], f"chat stream: finish reasons {finish!r}")
    check(words(content) == a.max_tokens, f"chat stream: {words(content)} words in {content!r}")
    usage = check_usage("chat stream", last.usage, expect_prompt, a.max_tokens)
    return {"chunks": len(chunks), "content": content, "usage": usage}


def run_completion(client: openai.OpenAI, a: argparse.Namespace, expect_prompt: int) -> dict:
    r = client.completions.create(model=a.model, prompt=a.prompt, max_tokens=a.max_tokens)
    check(r.object == "text_completion", f"completion: object {r.object!r}")
    check(r.id.startswith("cmpl-"), f"completion: id {r.id!r}")
    check(len(r.choices) == 1, f"completion: {len(r.choices)} choices")
    text = r.choices[0].text
    check(r.choices[0].finish_reason == "length", f"completion: finish_reason {r.choices[0].finish_reason!r}")
    check(words(text) == a.max_tokens, f"completion: {words(text)} words in {text!r}")
    usage = check_usage("completion", r.usage, expect_prompt, a.max_tokens)
    return {"id": r.id, "text": text, "usage": usage}


def run_completion_stream(client: openai.OpenAI, a: argparse.Namespace, expect_prompt: int) -> dict:
    chunks = list(
        client.completions.create(
            model=a.model,
            prompt=a.prompt,
            max_tokens=a.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    check(len(chunks) >= 2, f"completion stream: only {len(chunks)} chunks")
    last = chunks[-1]
    check(last.choices == [], "completion stream: last chunk has choices")
    check(all(c.usage is None for c in chunks[:-1]), "completion stream: usage before the final chunk")
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    check(words(text) == a.max_tokens, f"completion stream: {words(text)} words in {text!r}")
    usage = check_usage("completion stream", last.usage, expect_prompt, a.max_tokens)
    return {"chunks": len(chunks), "usage": usage}


def run_embeddings(client: openai.OpenAI, a: argparse.Namespace, expect_prompt: int) -> dict:
    # The client asks for base64 by default and decodes it; floats are checked too.
    inputs = [a.prompt, a.prompt]
    r = client.embeddings.create(model=a.model, input=inputs)
    check(r.object == "list", f"embeddings: object {r.object!r}")
    check(len(r.data) == 2, f"embeddings: {len(r.data)} vectors for 2 inputs")
    check([d.index for d in r.data] == [0, 1], "embeddings: bad indexes")
    dims = len(r.data[0].embedding)
    check(dims > 0 and all(len(d.embedding) == dims for d in r.data), "embeddings: bad vector sizes")
    check(r.usage is not None, "embeddings: no usage")
    check(r.usage.prompt_tokens == 2 * expect_prompt, f"embeddings: prompt_tokens {r.usage.prompt_tokens}")
    check(r.usage.total_tokens == 2 * expect_prompt, f"embeddings: total_tokens {r.usage.total_tokens}")
    f = client.embeddings.create(model=a.model, input=a.prompt, encoding_format="float")
    check(len(f.data) == 1 and len(f.data[0].embedding) == dims, "embeddings (float): bad shape")
    same = all(abs(x - y) < 1e-6 for x, y in zip(f.data[0].embedding, r.data[0].embedding))
    return {"count": len(r.data), "dims": dims, "float_matches_base64": same, "usage": dump(r.usage)}


def expect_error(client: openai.OpenAI, a: argparse.Namespace) -> dict:
    calls = {
        "chat": lambda: client.chat.completions.create(
            model=a.model, messages=[{"role": "user", "content": a.prompt}], max_tokens=a.max_tokens
        ),
        "stream": lambda: list(
            client.chat.completions.create(
                model=a.model,
                messages=[{"role": "user", "content": a.prompt}],
                max_tokens=a.max_tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
        ),
        "completions": lambda: client.completions.create(model=a.model, prompt=a.prompt, max_tokens=a.max_tokens),
        "embeddings": lambda: client.embeddings.create(model=a.model, input=a.prompt),
        "models": lambda: list(client.models.list()),
    }
    try:
        calls[a.call]()
    except openai.APIStatusError as e:
        check(
            e.status_code == a.expect_error,
            f"{a.call}: got status {e.status_code}, expected {a.expect_error}: {e.message}",
        )
        return {
            "class": type(e).__name__,
            "status": e.status_code,
            "message": e.message,
            "code": e.code,
            "type": e.type,
            "body": e.body,
        }
    raise CheckFailed(f"{a.call}: succeeded, expected an APIStatusError with status {a.expect_error}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:10000/v1")
    p.add_argument("--api-key", required=True)
    p.add_argument("--model", default="mock-model")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-tokens", type=int, default=5)
    p.add_argument("--expect-prompt", type=int, help="expected prompt_tokens (default: words in --prompt)")
    p.add_argument("--header", action="append", default=[], help="extra request header 'Name: value'")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--max-retries", type=int, default=0, help="the client's max_retries (default 0)")
    p.add_argument("--expect-error", type=int, metavar="STATUS", help="expect an APIStatusError with STATUS")
    p.add_argument(
        "--call",
        choices=["chat", "stream", "completions", "embeddings", "models"],
        default="chat",
        help="the call made in --expect-error mode",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=["models", "chat", "chat_stream", "completion", "completion_stream", "embeddings"],
        help="run only these steps of the normal mode (repeatable)",
    )
    a = p.parse_args(argv)
    if a.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    headers = {}
    for h in a.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            p.error(f"--header {h!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    a.headers = headers
    return a


def main(argv: list[str]) -> None:
    a = parse_args(argv)
    client = openai.OpenAI(
        base_url=a.base_url,
        api_key=a.api_key,
        max_retries=a.max_retries,
        timeout=a.timeout,
        default_headers=a.headers or None,
    )
    expect_prompt = a.expect_prompt if a.expect_prompt is not None else words(a.prompt)
    step = "setup"
    try:
        if a.expect_error is not None:
            step = f"expect-error {a.call}"
            result = {"ok": True, "mode": "expect-error", **expect_error(client, a)}
        else:
            result: dict[str, Any] = {"ok": True, "openai_version": openai.__version__}
            for step, run in [
                ("models", lambda: run_models(client)),
                ("chat", lambda: run_chat(client, a, expect_prompt)),
                ("chat_stream", lambda: run_chat_stream(client, a, expect_prompt)),
                ("completion", lambda: run_completion(client, a, expect_prompt)),
                ("completion_stream", lambda: run_completion_stream(client, a, expect_prompt)),
                ("embeddings", lambda: run_embeddings(client, a, expect_prompt)),
            ]:
                if a.only and step not in a.only:
                    continue
                result[step] = run()
    except CheckFailed as e:
        fail(str(e), step=step)
    except openai.APIStatusError as e:
        fail(f"{step}: HTTP {e.status_code}: {e.message}", step=step, status=e.status_code, code=e.code)
    except openai.APIError as e:
        fail(f"{step}: {type(e).__name__}: {e}", step=step)
    except Exception as e:  # noqa: BLE001 - report anything else as a failure, not a traceback
        fail(f"{step}: unexpected {type(e).__name__}: {e}", step=step)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
