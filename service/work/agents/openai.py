"""`openai`: streams a chat completion from an OpenAI-compatible server (OpenAI, Ollama,
vLLM, llama.cpp server) with httpx.

Config: `baseUrl` (e.g. http://127.0.0.1:11434/v1) and `model` (required); `apiKeyEnv`, the
name of the server's environment variable holding the key (it must end in `_API_KEY`, so an
agent cannot be pointed at any other secret of the server); `system` (a system message);
`params` (more request fields, e.g. temperature); `connectTimeoutSeconds`, `readTimeoutSeconds`.

The request asks for usage on the stream (`stream_options.include_usage`; `params` may override
it for a server that refuses the field): each usage the server sends (`usage.prompt_tokens`,
`usage.completion_tokens`, in the final chunk, or in every chunk) is reported as the run's usage so
far, summed over the run's completions; a usage that is not two whole numbers is ignored.

Deltas stream as `text` output. A message sent while a completion streams becomes the next
user turn once it ends; the run finishes when a completion ends with no message waiting, and
its deliverable is that last completion's text. An error answer, HTTP 4xx/5xx, a malformed
chunk, a dropped connection or a silent server fails the run with a sentence saying which.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import httpx
import msgspec

from events.types import Tokens, TokenUsage
from service.work.agents import Config, RunContext, RunFailed

Seconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]


class OpenAIConfig(Config, kw_only=True):
    base_url: Annotated[str, msgspec.Meta(pattern=r"^https?://\S+$")]
    model: Annotated[str, msgspec.Meta(min_length=1)]
    api_key_env: Annotated[str, msgspec.Meta(pattern=r"^(?!MC_)[A-Za-z_][A-Za-z0-9_]*_API_KEY$")] | None = None
    system: str | None = None
    params: dict[str, Any] = {}
    connect_timeout_seconds: Seconds = 10.0
    read_timeout_seconds: Seconds = 120.0
    """The longest silence allowed between two pieces of an answer."""


async def run(ctx: RunContext) -> str | None:
    config = ctx.config(OpenAIConfig)
    headers = {}
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise RunFailed("error", f"The environment variable {config.api_key_env} (the API key) is not set.")
        headers["Authorization"] = f"Bearer {key}"
    conversation = [{"role": "system", "content": config.system}] if config.system else []
    conversation.append({"role": "user", "content": ctx.prompt})
    timeout = httpx.Timeout(config.read_timeout_seconds, connect=config.connect_timeout_seconds)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, follow_redirects=False) as client:
        spent = _Spent(ctx)
        while True:
            answer = await _complete(client, config, conversation, spent)
            spent.completed()
            conversation.append({"role": "assistant", "content": answer})
            follow_ups = []
            while not ctx.messages.empty():
                follow_ups.append({"role": "user", "content": ctx.messages.get_nowait()})
            if not follow_ups:
                return answer
            conversation += follow_ups


class _Spent:
    """The run's usage: the completions finished, and the one streaming (whose usage the server may
    send more than once, each time the whole so far)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.before = TokenUsage(prompt_tokens=0, completion_tokens=0)
        self.current: TokenUsage | None = None

    def report(self, chunk: dict) -> None:
        try:
            found = msgspec.convert(chunk.get("usage"), _ProviderUsage)
        except msgspec.ValidationError:  # absent (null) or not whole numbers: nothing to count
            return
        self.current = TokenUsage(prompt_tokens=found.prompt_tokens, completion_tokens=found.completion_tokens)
        self.ctx.spent(TokenUsage(
            prompt_tokens=self.before.prompt_tokens + found.prompt_tokens,
            completion_tokens=self.before.completion_tokens + found.completion_tokens,
        ))

    def completed(self) -> None:
        if self.current is not None:
            self.before = TokenUsage(
                prompt_tokens=self.before.prompt_tokens + self.current.prompt_tokens,
                completion_tokens=self.before.completion_tokens + self.current.completion_tokens,
            )
        self.current = None


class _ProviderUsage(msgspec.Struct):
    """The OpenAI wire's `usage` (other fields, such as total_tokens, are ignored)."""

    prompt_tokens: Tokens
    completion_tokens: Tokens


async def _complete(client: httpx.AsyncClient, config: OpenAIConfig, conversation: list, spent: _Spent) -> str:
    url = config.base_url.rstrip("/") + "/chat/completions"
    body = {
        "stream_options": {"include_usage": True}, **config.params,
        "model": config.model, "messages": conversation, "stream": True,
    }
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code >= 300:
                detail = (await response.aread())[:500].decode(errors="replace")
                raise RunFailed("error", f"{url} answered HTTP {response.status_code}: {_error_text(detail)}")
            if response.headers.get("content-type", "").startswith("application/json"):  # did not stream
                answer = _json(await response.aread())
                spent.report(answer)
                return _text(_field(answer, "choices", 0, "message").get("content"))
            return await _stream(response, spent)
    except httpx.TimeoutException as exc:
        raise RunFailed("error", f"{url} did not answer in time ({type(exc).__name__}).") from None
    except httpx.HTTPError as exc:
        raise RunFailed("error", f"The connection to {url} failed: {type(exc).__name__}: {exc}") from None


async def _stream(response: httpx.Response, spent: _Spent) -> str:
    ctx = spent.ctx
    parts: list[str] = []
    finished = False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments and `event:` lines
        data = line[5:].strip()
        if data == "[DONE]":
            return "".join(parts)
        chunk = _json(data)
        spent.report(chunk)
        choices = chunk.get("choices") or []  # a usage-only chunk has none
        if not choices:
            continue
        delta = _text(_field(chunk, "choices", 0, "delta").get("content"))
        if delta:
            parts.append(delta)
            await ctx.emit("text", delta)
        finished = finished or bool(choices[0].get("finish_reason"))
    if finished:  # some servers close the stream after the last chunk without [DONE]
        return "".join(parts)
    raise RunFailed("error", "The stream ended before the completion did (no finish_reason, no [DONE]).")


def _json(data: str | bytes) -> dict:
    try:
        value = json.loads(data)
    except ValueError:
        raise RunFailed("error", f"Malformed chunk from the provider: {_preview(data)}") from None
    if not isinstance(value, dict):
        raise RunFailed("error", f"Malformed chunk from the provider: {_preview(data)}")
    if "error" in value:
        raise RunFailed("error", f"The provider answered with an error: {_error_text(value['error'])}")
    return value


def _field(value: Any, *path: str | int) -> dict:
    for step in path:
        try:
            value = value[step]
        except (KeyError, IndexError, TypeError):
            raise RunFailed("error", f"Malformed chunk from the provider: no {'.'.join(map(str, path))}.") from None
    if not isinstance(value, dict):
        raise RunFailed("error", f"Malformed chunk from the provider: {'.'.join(map(str, path))} is not an object.")
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RunFailed("error", f"Malformed chunk from the provider: content is {type(value).__name__}, not text.")
    # A lone surrogate (legal in JSON, not in UTF-8) would make the output unrecordable.
    return value.encode("utf-8", "replace").decode()


def _error_text(error: Any) -> str:
    if isinstance(error, str):
        try:
            error = json.loads(error).get("error", error)
        except (ValueError, AttributeError):
            return error.strip() or "(no detail)"
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _preview(data: str | bytes) -> str:
    text = data if isinstance(data, str) else data.decode(errors="replace")
    return repr(text[:200])
