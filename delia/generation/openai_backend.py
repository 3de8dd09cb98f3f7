"""A generation backend that talks to any OpenAI-compatible server (vLLM, SGLang, TGI, `transformers serve`).

Why: self-sampling a large cache is fastest on a dedicated inference server, often several of them. This backend
POSTs each conversation to `{base_url}/v1/chat/completions`, keeps up to `concurrency` requests in flight, spreads
them round-robin over the servers, and retries what is worth retrying (429, 5xx, connection errors, timeouts) with
exponential backoff. The server renders the chat template itself. Only the standard library is used (urllib, json,
threads), so there is no extra dependency.

    backend = OpenAIBackend("meta-llama/Llama-2-7b-chat-hf", ["http://gpu0:8000", "http://gpu1:8000/v1"])
    replies = backend.generate([[{"role": "user", "content": "Hi"}]], SamplingConfig(max_new_tokens=64))
"""

from __future__ import annotations

import http.client
import json
import os
import random
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from delia.generation.base import Backend, Conversation, Generation, Prompt, SamplingConfig, request_seed

# Finish reasons that mean "ran out of tokens"; every other one (stop, eos, tool_calls, null, ...) counts as "stop".
LENGTH_REASONS = {"length", "max_tokens", "model_length"}
MAX_DELAY = 60.0  # seconds, the longest single backoff
LOOKAHEAD = 4  # requests sent ahead of the oldest unanswered one, per request allowed in flight


class ServerRequestError(RuntimeError):
    """The server refused a request (a 4xx other than 429) or sent a reply that is not a chat completion."""


class ServerUnreachableError(ConnectionError):
    """No reply after every retry: the server is down, overloaded, or the URL is wrong."""


def _normalize_base_url(url: str) -> str:
    """`http://host:8000`, `http://host:8000/` and `http://host:8000/v1/` all become `http://host:8000`."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _error_message(body: bytes) -> str:
    """The human-readable part of an error body: OpenAI/vLLM `{"error": {"message"}}`, FastAPI `{"detail"}`, text."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500] or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error") or data.get("detail") or data.get("message") or data
        if isinstance(error, dict):
            error = error.get("message") or error
        return str(error)
    return str(data)


class OpenAIBackend(Backend):
    """Generates replies by POSTing to one or more OpenAI-compatible `/v1/chat/completions` endpoints."""

    name = "openai"

    def __init__(
        self,
        model: str,
        base_urls: str | list[str],
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
    ):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("base_urls must name at least one server, e.g. 'http://localhost:8000'")
        if concurrency < 1 or max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0, timeout > 0 and backoff >= 0")
        self.model = model
        self.endpoints = [_normalize_base_url(url) + "/v1/chat/completions" for url in urls]
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.concurrency = concurrency
        self.lookahead = LOOKAHEAD * concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff

    def prepare(self, conversations: Sequence[Conversation], ids: Sequence[str]) -> list[Prompt]:
        """The messages as they are (the server renders them); their length in characters is the sort key."""
        return [
            Prompt(request_id, messages, sum(len(message["content"]) for message in messages))
            for request_id, messages in zip(ids, conversations, strict=True)
        ]

    def stream(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> Iterator[Generation]:
        """Replies in the order given, with `concurrency` requests in flight the whole time, across any batches.

        A reply that comes back before an earlier one waits in a reorder buffer while new requests keep going out, up
        to `lookahead` past the oldest unanswered one: a slow reply holds back the yielding, not the sending. The first
        request that fails for good ends the stream: the replies before it that are done are yielded, the requests in
        flight are abandoned (their retries stop at once), and its error is raised.
        """
        abort = threading.Event()  # set when the stream ends early, so the workers stop retrying
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        sent: dict[int, Future[Generation]] = {}  # position -> request, until its reply is yielded
        failed = False  # once a request has failed for good, nothing new is sent; earlier replies still come out
        finished = False
        try:
            for position in range(len(prompts)):
                if not failed:
                    for ahead in range(position + len(sent), min(len(prompts), position + self.lookahead)):
                        sent[ahead] = pool.submit(self._complete, ahead, prompts[ahead], sampling, abort)
                head = sent.pop(position)  # the failed request is reached in order: its result() raises
                while not head.done():
                    pending = [head, *(request for request in sent.values() if not request.done())]
                    wait(pending, return_when=FIRST_COMPLETED)
                    failed = failed or any(r.done() and r.exception() is not None for r in sent.values())
                yield head.result()
            finished = True
        finally:
            if not finished:
                abort.set()
            pool.shutdown(wait=finished, cancel_futures=True)

    def close(self) -> None:
        """Nothing to release: every call opens its own connections and threads."""

    def _complete(self, index: int, prompt: Prompt, sampling: SamplingConfig, abort: threading.Event) -> Generation:
        """One chat completion for `prompt`, seeded by its request id; `index` picks the server."""
        body = {
            "model": self.model,
            "messages": prompt.messages,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": request_seed(sampling.seed, prompt.id),
            "n": 1,
        }
        if sampling.min_new_tokens is not None:
            body["min_tokens"] = sampling.min_new_tokens  # a vLLM/SGLang extension; other servers may refuse it
        data = self._post(index, json.dumps(body).encode(), abort)
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ServerRequestError(f"reply is not a chat completion: {str(data)[:500]}") from None
        completion_tokens = (data.get("usage") or {}).get("completion_tokens")
        num_tokens = completion_tokens if isinstance(completion_tokens, int) else len(text.split())
        finish_reason = "length" if choice.get("finish_reason") in LENGTH_REASONS else "stop"
        return Generation(text=text, num_tokens=num_tokens, finish_reason=finish_reason)

    def _post(self, index: int, payload: bytes, abort: threading.Event) -> dict:
        """POST with retries; request `index` starts on server `index % n` and moves to the next one on each retry."""
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"}
        tried: list[str] = []
        last_error = ""
        for attempt in range(self.max_retries + 1):
            url = self.endpoints[(index + attempt) % len(self.endpoints)]
            if url not in tried:
                tried.append(url)
            retry_after = 0.0
            try:
                request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)
                except ValueError:
                    raise ServerRequestError(f"{url} answered with invalid JSON: {raw[:500]!r}") from None
            except urllib.error.HTTPError as error:
                try:
                    message = _error_message(error.read())
                except (OSError, http.client.HTTPException):
                    message = "(unreadable body)"
                if error.code != 429 and error.code < 500:
                    raise ServerRequestError(f"{url} refused the request: HTTP {error.code}: {message}") from None
                last_error = f"HTTP {error.code}: {message}"
                seconds = (error.headers.get("Retry-After") or "") if error.headers else ""
                retry_after = float(seconds) if seconds.isdigit() else 0.0  # honour the server's hint (429, 503)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as error:  # refused, reset, timed out
                last_error = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
            if attempt < self.max_retries:
                delay = min(MAX_DELAY, max(retry_after, self.backoff * 2**attempt))
                jitter = random.Random(f"{index}:{attempt}").uniform(0, 0.1 * delay)  # seeded: requests spread out
                if abort.wait(delay + jitter):
                    break  # another request failed for good: stop retrying
        raise ServerUnreachableError(
            f"no reply from {', '.join(tried)} after {attempt + 1} attempt(s); last error: {last_error}. "
            "Is the server running, and is the URL right (e.g. http://localhost:8000)?"
        ) from None
