"""A generation backend that talks to any OpenAI-compatible server (vLLM, SGLang, TGI, `transformers serve`).

Why: self-sampling a large cache is fastest on a dedicated inference server, often several of them. This backend
POSTs each conversation to `{base_url}/v1/chat/completions`, keeps `concurrency` requests in flight, spreads them
round-robin over the servers, and retries what is worth retrying with exponential backoff: 429 (its Retry-After
honoured), 5xx, dropped connections, timeouts, and a 200 reply that is not a chat completion (body not JSON, cut
short, no `choices` or `message`: a proxy's HTML error page, a load balancer mid-restart). The server renders the
chat template itself. A raw text (`prepare_text`: the user-turn prefix of self-generated queries) goes to
`{base_url}/v1/completions` instead, as the prompt to continue. Only the standard library is used (urllib, json,
threads), so there is no extra dependency.

Each HTTP attempt is one task for a pool of `concurrency` threads; a request waiting on its backoff holds no thread
and no slot, so the others keep `concurrency` requests in flight. `stream_unordered` yields each reply as soon as it
is done, with its position (what build_cache writes, keyed by id); `stream` yields them in the order given.

Time to error for a server that accepts connections and never answers, with the defaults: (max_retries + 1) attempts
of `timeout` seconds plus the backoffs between them, 4 x 30 s + (1 + 2 + 4) s = 127 s, about 2 minutes
(`time_to_error` computes it for other settings).

    backend = OpenAIBackend("meta-llama/Llama-2-7b-chat-hf", ["http://gpu0:8000", "http://gpu1:8000/v1"])
    replies = backend.generate([[{"role": "user", "content": "Hi"}]], SamplingConfig(max_new_tokens=64))
"""

from __future__ import annotations

import contextlib
import heapq
import http.client
import json
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from delia.generation.base import Backend, Conversation, Generation, Prompt, SamplingConfig, request_seed

# Finish reasons that mean "ran out of tokens"; every other one (stop, eos, tool_calls, null, ...) counts as "stop".
LENGTH_REASONS = {"length", "max_tokens", "model_length"}
MAX_DELAY = 60.0  # seconds, the longest single backoff
JITTER = 0.1  # each backoff is lengthened by up to this fraction (seeded per request and attempt)
LOOKAHEAD = 4  # `stream` only: requests sent ahead of the oldest unanswered one, per request allowed in flight
DEFAULT_TIMEOUT = 30.0  # seconds per attempt: a 512-token reply on a busy server fits; a silent server errors in ~2 min
DEFAULT_MAX_RETRIES = 3  # 4 attempts: at 5% transient faults, 1 request in 160,000 fails for good
DEFAULT_BACKOFF = 1.0  # seconds before the first retry, doubling on each further one
QUOTED_BODY = 200  # bytes of a bad reply's body quoted in the final error
CHAT_PATH, TEXT_PATH = "/v1/chat/completions", "/v1/completions"  # conversations; raw texts (`prepare_text`)


class ServerRequestError(RuntimeError):
    """The server refused a request (a 4xx other than 429), or answered it with no chat completion on every attempt."""


class ServerUnreachableError(ConnectionError):
    """No reply after every retry: the server is down, overloaded, or the URL is wrong."""


class _Retryable(Exception):
    """One attempt failed in a way worth retrying: 429, 5xx, connection error, timeout, or an unusable 200 reply."""

    def __init__(self, message: str, retry_after: float = 0.0, invalid_body: bytes | None = None):
        super().__init__(message)
        self.retry_after = retry_after  # the server's Retry-After hint, in seconds (0: none)
        self.invalid_body = invalid_body  # set when the server answered 200 with something not a chat completion


@dataclass(eq=False)
class _Request:
    """One prompt's request across its attempts: where it is in the input, which attempt is next, what went wrong."""

    position: int
    prompt: Prompt
    attempt: int = 0  # the attempt now in flight or due next, from 0
    tried: list[str] = field(default_factory=list)  # the servers asked, in order, each once
    invalid: int = 0  # attempts answered with 200 but no chat completion
    last_error: str = ""
    first_invalid_body: bytes = b""


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


def _parse_completion(raw: bytes, chat: bool = True) -> Generation:
    """The reply in a chat completion body (a text completion's with `chat=False`); `_Retryable` (with the body) if
    it is not JSON, cut short, or incomplete."""
    try:
        data = json.loads(raw)
        choice = data["choices"][0]
        text = (choice["message"].get("content") if chat else choice["text"]) or ""
        if not isinstance(text, str):
            raise TypeError(f"content is a {type(text).__name__}")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
        where = "choices[0].message" if chat else "choices[0].text"
        problem = "not JSON" if isinstance(error, ValueError) else f"no usable {where} ({error!r})"
        kind = "a chat completion" if chat else "a completion"
        raise _Retryable(f"HTTP 200 but not {kind} ({problem})", invalid_body=raw) from None
    completion_tokens = (data.get("usage") or {}).get("completion_tokens")
    num_tokens = completion_tokens if isinstance(completion_tokens, int) else len(text.split())
    finish_reason = "length" if choice.get("finish_reason") in LENGTH_REASONS else "stop"
    return Generation(text=text, num_tokens=num_tokens, finish_reason=finish_reason)


class OpenAIBackend(Backend):
    """Generates replies by POSTing to one or more OpenAI-compatible `/v1/chat/completions` endpoints.

    `timeout` bounds each attempt (seconds without a byte from the server), `max_retries` the attempts after the first,
    `backoff` the first wait between attempts (doubling, at most MAX_DELAY). Counters over the backend's life:
    `retries` (attempts retried, of any kind) and `invalid_replies_retried` (200 replies that were no chat completion).
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        base_urls: str | list[str],
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
    ):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("base_urls must name at least one server, e.g. 'http://localhost:8000'")
        if concurrency < 1 or max_retries < 0 or timeout <= 0 or backoff < 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0, timeout > 0 and backoff >= 0")
        self.model = model
        self.endpoints = [_normalize_base_url(url) + CHAT_PATH for url in urls]
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.concurrency = concurrency
        self.lookahead = LOOKAHEAD * concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.retries = 0
        self.invalid_replies_retried = 0

    def prepare(self, conversations: Sequence[Conversation], ids: Sequence[str]) -> list[Prompt]:
        """The messages as they are (the server renders them); their length in characters is the sort key."""
        return [
            Prompt(request_id, messages, sum(len(message["content"]) for message in messages))
            for request_id, messages in zip(ids, conversations, strict=True)
        ]

    def prepare_text(self, texts: Sequence[str], ids: Sequence[str]) -> list[Prompt]:
        """Each raw text as it is, for the completions endpoint (`/v1/completions`, the server's own tokenizer)."""
        return [Prompt(request_id, [], len(text), text=text) for request_id, text in zip(ids, texts, strict=True)]

    def stream(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> Iterator[Generation]:
        """Replies in the order given, with `concurrency` requests in flight, up to `lookahead` past the oldest one.

        A reply that comes back before an earlier one waits in a reorder buffer while new requests keep going out: a
        slow reply holds back the yielding, not the sending, until the look-ahead is used up. The first request that
        fails for good ends the stream: the earlier requests are still finished and yielded, then its error is raised.
        """
        waiting: dict[int, Generation] = {}
        next_position = 0
        with contextlib.closing(_Flight(self, prompts, sampling, ordered=True).run()) as replies:
            for position, reply in replies:
                waiting[position] = reply
                while next_position in waiting:
                    yield waiting.pop(next_position)
                    next_position += 1

    def stream_unordered(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> Iterator[tuple[int, Generation]]:
        """(position in `prompts`, reply) as each reply is done, with `concurrency` requests in flight throughout.

        Nothing waits on a retry's backoff or on a slow reply. The first request that fails for good ends the stream:
        the replies already back are yielded, the other requests are abandoned, and its error is raised.
        """
        return _Flight(self, prompts, sampling, ordered=False).run()

    def close(self) -> None:
        """Nothing to release: every call opens its own connections and threads."""

    def time_to_error(self) -> float:
        """The longest a request can take to fail against a server that accepts connections and never answers."""
        waits = sum(min(MAX_DELAY, self.backoff * 2**attempt) for attempt in range(self.max_retries))
        return (self.max_retries + 1) * self.timeout + (1 + JITTER) * waits

    def _payload(self, prompt: Prompt, sampling: SamplingConfig) -> bytes:
        """The JSON body of one request, seeded by the prompt's request id: a chat completion, or for a raw text
        (`prepare_text`) a text completion."""
        body = {
            "model": self.model,
            **({"prompt": prompt.text} if prompt.text is not None else {"messages": prompt.messages}),
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": request_seed(sampling.seed, prompt.id),
            "n": 1,
        }
        if sampling.min_new_tokens is not None:
            body["min_tokens"] = sampling.min_new_tokens  # a vLLM/SGLang extension; other servers may refuse it
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        return json.dumps(body).encode()

    def _attempt(self, url: str, payload: bytes) -> Generation:
        """One POST to `url`: the reply, `_Retryable` if worth another attempt, ServerRequestError if refused (4xx)."""
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"}
        try:
            request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            try:
                message = _error_message(error.read())
            except (OSError, http.client.HTTPException):
                message = "(unreadable body)"
            if error.code != 429 and error.code < 500:
                raise ServerRequestError(f"{url} refused the request: HTTP {error.code}: {message}") from None
            seconds = (error.headers.get("Retry-After") or "").strip() if error.headers else ""
            retry_after = float(seconds) if seconds.isdigit() else 0.0  # honour the server's hint (429, 503)
            raise _Retryable(f"HTTP {error.code}: {message}", retry_after) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:  # refused, reset, timed out
            raise _Retryable(f"{type(error).__name__}: {getattr(error, 'reason', error)}") from None
        return _parse_completion(raw, chat=url.endswith(CHAT_PATH))

    def _delay(self, request: _Request, retry_after: float) -> float:
        """Seconds before `request`'s next attempt: exponential backoff or the server's hint, plus seeded jitter."""
        delay = min(MAX_DELAY, max(retry_after, self.backoff * 2**request.attempt))
        return delay + random.Random(f"{request.position}:{request.attempt}").uniform(0, JITTER * delay)

    def _final_error(self, request: _Request) -> Exception:
        """The error of a request whose every attempt failed: the unusable body if that is all it got, else the last."""
        attempts = request.attempt + 1
        if request.invalid == attempts:
            text = request.prompt.text is not None  # a raw-text completion (/v1/completions), not a chat
            wanted = (
                "text completion (body not JSON, cut short, or without choices/text)"
                if text
                else ("chat completion (body not JSON, cut short, or without choices/message)")
            )
            return ServerRequestError(
                f"{', '.join(request.tried)} answered {attempts} attempt(s) with HTTP 200 but no {wanted}; "
                "the body starts: "
                f"{request.first_invalid_body[:QUOTED_BODY]!r}"
            )
        return ServerUnreachableError(
            f"no reply from {', '.join(request.tried)} after {attempts} attempt(s); last error: {request.last_error}. "
            "Is the server running, and is the URL right (e.g. http://localhost:8000)?"
        )


class _Flight:
    """The requests of one stream call: the attempts in flight, the retries waiting on their backoff, the failure.

    Runs in the caller's thread; only single HTTP attempts go to the pool, so a backoff holds no thread. With
    `ordered`, new requests stay within the backend's look-ahead of the oldest unanswered one, and after a failure the
    requests before it are still finished (the ordered stream yields them); otherwise a failure ends the run at once.
    """

    def __init__(self, backend: OpenAIBackend, prompts: Sequence[Prompt], sampling: SamplingConfig, ordered: bool):
        self.backend, self.prompts, self.sampling, self.ordered = backend, prompts, sampling, ordered
        self.running: dict[Future[Generation], _Request] = {}
        self.waiting: list[tuple[float, int, _Request]] = []  # (due time, position, request): a heap of retries
        self.next_fresh = 0  # the next position never sent
        self.failed_at: int | None = None  # the earliest position that failed for good
        self.error: Exception | None = None

    def run(self) -> Iterator[tuple[int, Generation]]:
        """(position, reply) as replies come back; raises the failure once what it keeps alive is done."""
        pool = ThreadPoolExecutor(max_workers=self.backend.concurrency)
        try:
            while self._unfinished():
                self._send(pool)
                yield from self._collect(self._wait())
            if self.error is not None:
                raise self.error
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # abandoned attempts end within `timeout`

    def _keeps(self, position: int) -> bool:
        """Whether the request at `position` is still worth finishing."""
        return self.failed_at is None or (self.ordered and position < self.failed_at)

    def _unfinished(self) -> bool:
        """Whether any request worth finishing is in flight, waiting, or not sent yet."""
        if self.failed_at is None and self.next_fresh < len(self.prompts):
            return True
        return any(self._keeps(r.position) for r in self.running.values()) or any(
            self._keeps(position) for _, position, _ in self.waiting
        )

    def _send(self, pool: ThreadPoolExecutor) -> None:
        """Fill the free slots: retries whose backoff is over first, then new requests."""
        now = time.monotonic()
        while len(self.running) < self.backend.concurrency:
            if self.waiting and self.waiting[0][0] <= now:
                request = heapq.heappop(self.waiting)[2]
            elif self._may_send_fresh():
                request = _Request(self.next_fresh, self.prompts[self.next_fresh])
                self.next_fresh += 1
            else:
                return
            endpoints = self.backend.endpoints
            url = endpoints[(request.position + request.attempt) % len(endpoints)]
            if request.prompt.text is not None:
                url = url[: -len(CHAT_PATH)] + TEXT_PATH
            if url not in request.tried:
                request.tried.append(url)
            payload = self.backend._payload(request.prompt, self.sampling)
            self.running[pool.submit(self.backend._attempt, url, payload)] = request

    def _may_send_fresh(self) -> bool:
        """A new request may go out: none failed, some are left, and (ordered) it is within the look-ahead."""
        if self.failed_at is not None or self.next_fresh >= len(self.prompts):
            return False
        if not self.ordered:
            return True
        positions = [r.position for r in self.running.values()] + [position for _, position, _ in self.waiting]
        return self.next_fresh < min(positions, default=self.next_fresh) + self.backend.lookahead

    def _wait(self) -> set[Future[Generation]]:
        """Block until an attempt ends or, with a slot free, the next retry is due; return the attempts that ended."""
        due = None
        if self.waiting and len(self.running) < self.backend.concurrency:
            due = max(0.0, self.waiting[0][0] - time.monotonic())
        if not self.running:
            time.sleep(due or 0.0)
            return set()
        return wait(self.running, timeout=due, return_when=FIRST_COMPLETED).done

    def _collect(self, done: set[Future[Generation]]) -> list[tuple[int, Generation]]:
        """The replies among the ended attempts; the rest are scheduled for a retry or recorded as the failure."""
        replies = []
        for future in sorted(done, key=lambda ended: ended.exception() is not None):  # replies before failures
            request = self.running.pop(future)
            if not self._keeps(request.position) and not (future.exception() is None and not self.ordered):
                continue  # (unordered, a reply already paid for is kept even after another request failed)
            try:
                replies.append((request.position, future.result()))
            except _Retryable as error:
                self._retry_or_fail(request, error)
            except Exception as error:  # refused (4xx), or a bug: fails for good
                self._fail(request, error)
        return replies  # those that came back with a failure are yielded before it is raised

    def _retry_or_fail(self, request: _Request, error: _Retryable) -> None:
        """Put `request` back on the heap after its backoff, or fail it when its attempts are used up."""
        request.last_error = str(error)
        if error.invalid_body is not None:
            request.first_invalid_body = request.first_invalid_body or error.invalid_body or b"(empty body)"
            request.invalid += 1
        if request.attempt >= self.backend.max_retries:
            self._fail(request, self.backend._final_error(request))
            return
        self.backend.retries += 1
        self.backend.invalid_replies_retried += error.invalid_body is not None
        due = time.monotonic() + self.backend._delay(request, error.retry_after)
        request.attempt += 1
        heapq.heappush(self.waiting, (due, request.position, request))

    def _fail(self, request: _Request, error: Exception) -> None:
        """Record a failure for good (the earliest position's error is the one raised); drop retries not kept."""
        if self.failed_at is None or request.position < self.failed_at:
            self.failed_at, self.error = request.position, error
        self.waiting = [entry for entry in self.waiting if self._keeps(entry[1])]
        heapq.heapify(self.waiting)
