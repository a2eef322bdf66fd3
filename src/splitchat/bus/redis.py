"""The Redis bus: Redis Streams for durable events, Redis pub/sub for ephemeral ones.

Needs the ``redis`` extra (redis-py, asyncio only). Design (details and reasons in
docs/backends.md):

* One stream per channel, ``<prefix>s:<channel>``, whose entry ids are ``<offset>-0``: the id
  *is* the position's offset, so live reads (XREAD) and history (XRANGE) agree by
  construction and "was this trimmed?" is one comparison with the first retained id.
* A meta hash per channel, ``<prefix>m:<channel>`` = ``{epoch, offset}``. A Lua script bumps
  the offset and XADDs with the explicit id atomically, so offsets are contiguous integers
  even with many publishers, and starts a fresh epoch when the stream vanished (deleted,
  expired, Redis restarted without persistence).
* ONE reader task per process: a blocking XREAD over the streams of every locally subscribed
  channel, from the last offset seen per channel, feeding bounded local subscriptions. After a
  lost connection it reconnects with backoff and continues from those offsets, which refills
  the hole from the stream; if the entries were trimmed meanwhile, or the epoch changed, the
  subscribers get a :class:`~splitchat.bus.Gap`.
* Ephemeral events: PUBLISH on ``<prefix>e:<channel>``; each process holds one pub/sub
  connection with one pattern subscription ``<prefix>e:*``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Iterable, Sequence
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import (
        ConnectionError as RedisConnectionError,
        RedisError,
        TimeoutError as RedisTimeoutError,
    )
except ImportError as exc:  # pragma: no cover - exercised via bus_from_url
    raise ImportError(f"splitchat.bus.redis needs redis-py: pip install 'splitchat[redis]' ({exc})") from exc

from ._base import BusUnavailable, Delivery, Gap, HistoryGone, Position, Subscription
from ._local import LocalSubscription
from ._remote import RemoteBus

__all__ = ("RedisBus",)

logger = logging.getLogger("splitchat.bus.redis")

# Starts a fresh epoch when the channel has none, or when events were published but the
# stream is gone (deleted, expired, or lost in a Redis restart): old positions then fail
# loudly with HistoryGone instead of silently matching new offsets.
_ENSURE_EPOCH = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local offset = tonumber(redis.call('HGET', KEYS[2], 'offset') or '0')
if (not epoch) or (offset > 0 and redis.call('EXISTS', KEYS[1]) == 0) then
  -- 'first': the channel had no meta at all, so this epoch holds every event published
  -- since a reader saw the channel empty (see EMPTY_EPOCH in redis.py).
  local origin = 'first'
  if epoch then origin = 'reset' end
  epoch = ARGV[1]
  offset = 0
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0, 'origin', origin)
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
"""

# KEYS: stream, meta. ARGV: fresh epoch, ttl ms, payload, maxlen, trim mode ('~' or '=').
_PUBLISH = (
    _ENSURE_EPOCH
    + """
offset = offset + 1
redis.call('HSET', KEYS[2], 'offset', offset)
local id = string.format('%d-0', offset)
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[5], ARGV[4], id, 'p', ARGV[3], 'e', epoch)
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return {epoch, offset}
"""
)

#: Epoch of the position of a channel that has no meta hash (never published, or forgotten).
#: Reading a position must not write (channel names are client-chosen: a write per name would
#: grow Redis without bound), so an empty channel has no real epoch yet; this constant never
#: equals a real one (12 hex chars). ``history`` accepts it as "since the channel was empty".
EMPTY_EPOCH = "empty"

_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class _ChannelState:
    """What the process-wide reader knows of one locally subscribed channel."""

    __slots__ = ("epoch", "offset", "subs")

    def __init__(self, epoch: str | None, offset: int) -> None:
        self.epoch = epoch  # None: the channel had no epoch when first attached
        self.offset = offset  # last offset read (XREAD continues after it)
        self.subs: set[LocalSubscription] = set()


async def _cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    # Re-cancel until done (bounded): a cancellation landing while a client library's own
    # timeout expires can be swallowed, and close() must not hang on it.
    pending = {t for t in tasks if not t.done()}
    for _ in range(100):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            logger.error("bus background task failed", exc_info=task.exception())


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBus(RemoteBus):
    """A :class:`~splitchat.bus.Bus` on Redis Streams (history, positions) and pub/sub (ephemeral).

    Args:
        url: ``redis://[user:password@]host:port/db`` or ``rediss://`` (passed to redis-py).
        prefix: prefix of every key and pub/sub channel (several apps can share a Redis).
        maxlen: events kept per channel (``XADD MAXLEN``). Trimming is approximate by default
            (``~``, cheap): Redis may keep somewhat more, never fewer; ``HistoryGone`` is
            exact either way because it compares with the first entry actually retained.
        exact_trim: trim to exactly ``maxlen`` (``MAXLEN =``, costlier) instead.
        history_ttl: seconds after the channel's *last* publish at which its stream and epoch
            expire (Redis TTLs are per key, not per entry); ``None`` keeps them.
        timeout: seconds before a publish/history/attach call against an unreachable Redis
            raises :class:`~splitchat.bus.BusUnavailable` (no retry: a retried publish could
            be applied twice).
        buffer_size: items buffered per local subscription before it gets a ``Gap``.
        block_ms: how long one blocking XREAD waits before it is reissued.
        read_count: entries read per stream per XREAD (bounds one reply: read_count x streams x payload).
        resync_interval: seconds between checks that the read channels' epochs did not change
            under the reader (a stream deleted or expired and recreated while subscribed).
        reconnect_delay: (first, max) seconds of the reader's exponential reconnect backoff.
    """

    supports_history = True
    default_port = 6379

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "splitchat:",
        maxlen: int = 2000,
        exact_trim: bool = False,
        history_ttl: float | None = None,
        timeout: float = 2.0,
        buffer_size: int = 1000,
        block_ms: int = 5000,
        read_count: int = 100,
        resync_interval: float = 10.0,
        reconnect_delay: tuple[float, float] = (0.05, 2.0),
    ) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be >= 1")
        if buffer_size < 1:
            raise ValueError("buffer_size must be >= 1")
        self.url = url
        self.prefix = prefix
        self.maxlen = maxlen
        self.exact_trim = exact_trim
        self.history_ttl = history_ttl
        self.timeout = timeout
        self.buffer_size = buffer_size
        self.block_ms = block_ms
        self.read_count = read_count
        self.resync_interval = resync_interval
        self.reconnect_delay = reconnect_delay
        super().__init__()
        self._channels: dict[str, _ChannelState] = {}
        self._stack: AsyncExitStack | None = None
        self._client: aioredis.Redis | None = None
        self._reader: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._reader_id: int | None = None
        self._generation = 0  # bumped when the set of read channels grows
        self._inflight: int | None = None  # generation of the XREAD in flight, if any
        self._reader_wakeup = anyio.Event()

    def __repr__(self) -> str:
        return f"RedisBus(prefix={self.prefix!r}, maxlen={self.maxlen}, history_ttl={self.history_ttl})"

    @classmethod
    def from_url(cls, url: str) -> RedisBus:
        """Build from a URL; bus options ride in the query and the rest goes to redis-py.

        Options: ``maxlen``, ``exact_trim`` (0/1), ``history_ttl`` (seconds), ``prefix``,
        ``timeout`` (seconds), ``buffer_size``. Example:
        ``redis://127.0.0.1:6379/0?maxlen=5000&history_ttl=3600&prefix=myapp:``.
        """
        parts = urlsplit(url)
        options: dict[str, str] = {}
        passthrough: list[tuple[str, str]] = []
        ours = {"maxlen", "exact_trim", "history_ttl", "prefix", "timeout", "buffer_size"}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in ours:
                options[key] = value
            else:
                passthrough.append((key, value))
        clean = urlunsplit(parts._replace(query=urlencode(passthrough)))
        kwargs: dict[str, Any] = {}
        if "maxlen" in options:
            kwargs["maxlen"] = int(options["maxlen"])
        if "exact_trim" in options:
            kwargs["exact_trim"] = options["exact_trim"].lower() in {"1", "true", "yes"}
        if options.get("history_ttl"):
            kwargs["history_ttl"] = float(options["history_ttl"])
        if "prefix" in options:
            kwargs["prefix"] = options["prefix"]
        if "timeout" in options:
            kwargs["timeout"] = float(options["timeout"])
        if "buffer_size" in options:
            kwargs["buffer_size"] = int(options["buffer_size"])
        return cls(clean, **kwargs)

    # -- keys ----------------------------------------------------------------------------------

    def stream_key(self, channel: str) -> str:
        """The Redis stream holding ``channel``'s events."""
        return f"{self.prefix}s:{channel}"

    def meta_key(self, channel: str) -> str:
        """The Redis hash holding ``channel``'s epoch and last offset."""
        return f"{self.prefix}m:{channel}"

    def ephemeral_key(self, channel: str) -> str:
        """The Redis pub/sub channel carrying ``channel``'s ephemeral events."""
        return f"{self.prefix}e:{channel}"

    @property
    def _ttl_ms(self) -> int:
        return int(self.history_ttl * 1000) if self.history_ttl else 0

    # -- lifecycle -----------------------------------------------------------------------------

    def _new_client(self, **overrides: Any) -> aioredis.Redis:
        options: dict[str, Any] = {
            "socket_connect_timeout": self.timeout,
            "socket_timeout": self.timeout,
            # No transparent retries: a publish retried after its reply was lost would be
            # applied twice; the caller gets BusUnavailable and decides (idempotency keys).
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": False,
        }
        options.update(overrides)
        return aioredis.Redis.from_url(self.url, **options)

    def _urls(self) -> list[str]:
        return [self.url]

    async def _connect(self) -> None:
        stack = AsyncExitStack()
        try:
            self._client = self._new_client()
            stack.push_async_callback(self._client.aclose)
            # The reader blocks in XREAD for up to block_ms: its socket timeout must be longer.
            self._reader = self._new_client(
                single_connection_client=True, socket_timeout=self.block_ms / 1000 + self.timeout
            )
            stack.push_async_callback(self._reader.aclose)
            self._pubsub = self._client.pubsub()
            stack.push_async_callback(self._pubsub.aclose)
            try:
                await self._client.ping()
                await self._pubsub.psubscribe(self._escape_pattern(self.ephemeral_key("")) + "*")
                self._reader_id = int(await self._reader.client_id())
            except RedisError as exc:
                raise BusUnavailable(
                    f"Redis at {self._where()} is unreachable: {self._describe(exc)}"
                ) from exc
            self._publish_script = self._client.register_script(_PUBLISH)
            # Plain asyncio tasks, not a task group: redis-py is asyncio-only anyway, and
            # close() must work from any task (a task group must be exited where it was entered).
            tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._ephemeral_loop())]
            stack.push_async_callback(_cancel_and_wait, tasks)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack

    async def _disconnect(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    @staticmethod
    def _escape_pattern(text: str) -> str:
        return "".join("\\" + c if c in "*?[]\\" else c for c in text)

    def _check_running(self) -> aioredis.Redis:
        if not self._running or self._client is None:
            raise BusUnavailable(
                "the Redis bus is not running (use `async with bus:` or `await bus.start()`)"
            )
        return self._client

    # -- publish and history ---------------------------------------------------------------------

    async def publish(self, channel: str, payload: bytes) -> Position:
        self._check_running()
        args: list[bytes | str | int] = [
            secrets.token_hex(6),
            self._ttl_ms,
            payload,
            self.maxlen,
            "=" if self.exact_trim else "~",
        ]
        try:
            with anyio.fail_after(self.timeout * 2):
                epoch, offset = await self._publish_script(
                    keys=[self.stream_key(channel), self.meta_key(channel)], args=args
                )
        except (RedisError, OSError, TimeoutError) as exc:
            raise BusUnavailable(
                f"Redis at {self._where()} did not accept the publish: {self._describe(exc)}"
            ) from exc
        return Position(_text(epoch), int(offset))

    async def publish_ephemeral(self, channel: str, payload: bytes) -> None:
        client = self._check_running()
        try:
            with anyio.fail_after(self.timeout * 2):
                await client.publish(self.ephemeral_key(channel), payload)
        except (RedisError, OSError, TimeoutError) as exc:
            raise BusUnavailable(f"Redis at {self._where()} is unreachable: {self._describe(exc)}") from exc

    async def current_position(self, channel: str) -> Position:
        client = self._check_running()
        try:
            with anyio.fail_after(self.timeout * 2):
                epoch_raw, offset_raw = await client.hmget(self.meta_key(channel), ["epoch", "offset"])
        except (RedisError, OSError, TimeoutError) as exc:
            raise BusUnavailable(f"Redis at {self._where()} is unreachable: {self._describe(exc)}") from exc
        if epoch_raw is None:
            return Position(EMPTY_EPOCH, 0)
        return Position(_text(epoch_raw), int(offset_raw or 0))

    async def history(self, channel: str, since: Position, limit: int = 100) -> Sequence[Delivery]:
        client = self._check_running()
        if since.offset < 0:
            raise HistoryGone(f"position {since} is not in channel {channel!r}")
        try:
            with anyio.fail_after(self.timeout * 2):
                async with client.pipeline(transaction=True) as pipe:
                    pipe.hmget(self.meta_key(channel), ["epoch", "offset", "origin"])
                    pipe.xrange(self.stream_key(channel), min=f"{since.offset + 1}-0", count=max(limit, 1))
                    (epoch_raw, offset_raw, origin_raw), entries = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise BusUnavailable(f"Redis at {self._where()} is unreachable: {self._describe(exc)}") from exc
        if since.epoch == EMPTY_EPOCH and since.offset == 0:
            if epoch_raw is None:
                return []  # still empty
            if origin_raw is None or _text(origin_raw) != "first":
                # The epoch was restarted (stream lost): events of the one before are gone.
                raise HistoryGone(f"channel {channel!r} was reset since {since}")
            since = Position(_text(epoch_raw), 0)  # everything of the channel's first epoch
        if epoch_raw is None or _text(epoch_raw) != since.epoch:
            raise HistoryGone(f"position {since} is not of the current epoch of {channel!r}")
        last = int(offset_raw or 0)
        if since.offset > last:
            raise HistoryGone(f"position {since} is after the newest event of {channel!r}")
        if since.offset == last or limit <= 0:
            return []
        if not entries or int(entries[0][0].split(b"-", 1)[0]) != since.offset + 1:
            raise HistoryGone(f"history of {channel!r} after {since} was trimmed")
        return [
            Delivery(channel, Position(_text(fields[b"e"]), int(entry_id.split(b"-", 1)[0])), fields[b"p"])
            for entry_id, fields in entries
        ]

    # -- subscriptions ---------------------------------------------------------------------------

    def subscribe(self, channels: Iterable[str] = ()) -> Subscription:
        """A new subscription; its initial channels are attached on ``async with`` or first use."""
        self._check_running()
        sub = LocalSubscription(self, channels, self.buffer_size)
        self._subscriptions.add(sub)
        return sub

    async def _attach(self, sub: LocalSubscription, channels: list[str]) -> None:
        client = self._check_running()
        try:
            with anyio.fail_after(self.timeout * 2):
                async with client.pipeline(transaction=False) as pipe:
                    for name in channels:
                        pipe.hmget(self.meta_key(name), ["epoch", "offset"])
                    metas = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise BusUnavailable(f"Redis at {self._where()} is unreachable: {self._describe(exc)}") from exc
        grew = False
        for name, (epoch_raw, offset_raw) in zip(channels, metas, strict=True):
            epoch = _text(epoch_raw) if epoch_raw is not None else None
            offset = int(offset_raw or 0) if epoch is not None else 0
            # Events up to `offset` were published before this attach: not for this subscriber.
            sub.floor[name] = Position(epoch, offset) if epoch is not None else None
            state = self._channels.get(name)
            if state is None:
                state = self._channels[name] = _ChannelState(epoch, offset)
                grew = True
            state.subs.add(sub)
        if grew:
            await self._wake_reader()

    async def _wake_reader(self) -> None:
        """Make the reader include newly attached channels now rather than after its block."""
        self._generation += 1
        generation = self._generation
        self._reader_wakeup.set()
        for _ in range(50):  # bounded: the XREAD may be in flight but not yet blocked
            inflight, reader_id = self._inflight, self._reader_id
            if inflight is None or inflight >= generation or reader_id is None or self._client is None:
                return
            try:
                if await self._client.client_unblock(reader_id):
                    return
            except (RedisError, OSError):
                return  # the reader is reconnecting anyway and will pick the channel up
            await anyio.sleep(0.002)

    # -- the process-wide reader -----------------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self._reader is not None
        failures = 0
        next_resync = anyio.current_time() + self.resync_interval
        # `while not closed` rather than `while True`: redis-py's internal timeouts can swallow
        # a cancellation that lands while they expire (Python 3.11 asyncio.timeout).
        while not self._closed:
            try:
                if self._reader_id is None:
                    self._reader_id = int(await self._reader.client_id())
                    await self._resync()
                    logger.warning(
                        "Redis bus reader reconnected to %s after %d attempt(s)", self._where(), failures
                    )
                    failures = 0
                elif anyio.current_time() >= next_resync:
                    next_resync = anyio.current_time() + self.resync_interval
                    await self._resync()
                wakeup = self._reader_wakeup = anyio.Event()
                if not self._channels:
                    with anyio.move_on_after(self.block_ms / 1000):
                        await wakeup.wait()
                    continue
                keys = {self.stream_key(name).encode(): name for name in self._channels}
                streams = {key: f"{self._channels[name].offset}-0" for key, name in keys.items()}
                self._inflight = self._generation
                try:
                    response = await self._reader.xread(
                        streams,  # type: ignore[arg-type]
                        count=self.read_count,
                        block=self.block_ms,
                    )
                finally:
                    self._inflight = None
                # RESP2 reply: [[stream key, [(entry id, {field: value}), ...]], ...]
                reply: list[Any] = list(response or ())
                for key, entries in reply:
                    name = keys.get(key)
                    if name is not None:
                        self._dispatch(name, entries)
            except _CONNECTION_ERRORS as exc:
                failures += 1
                self._reader_id = None
                low, high = self.reconnect_delay
                delay = min(high, low * 2 ** min(failures - 1, 16)) * (0.5 + random.random() / 2)
                logger.warning(
                    "Redis bus reader lost %s (%s); reconnecting in %.2fs (attempt %d)",
                    self._where(),
                    self._describe(exc),
                    delay,
                    failures,
                )
                await anyio.sleep(delay)

    async def _resync(self) -> None:
        """After a reconnect: channels whose epoch changed lost events we cannot refill."""
        assert self._reader is not None
        names = list(self._channels)
        if not names:
            return
        async with self._reader.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hget(self.meta_key(name), "epoch")
            epochs = await pipe.execute()
        for name, epoch_raw in zip(names, epochs, strict=True):
            state = self._channels.get(name)
            if state is None:
                continue
            epoch = _text(epoch_raw) if epoch_raw is not None else None
            if state.epoch is not None and epoch != state.epoch:
                gap = Gap(name, Position(state.epoch, state.offset), "stream lost or recreated in Redis")
                for sub in state.subs:
                    sub.push_gap(gap)
                state.epoch, state.offset = epoch, 0

    def _dispatch(self, name: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        state = self._channels.get(name)
        if state is None:
            return
        for entry_id, fields in entries:
            offset = int(entry_id.split(b"-", 1)[0])
            epoch = _text(fields[b"e"])
            same_epoch = epoch == state.epoch
            if same_epoch and offset <= state.offset:
                continue  # already delivered (cannot happen with XREAD, cheap to guard)
            if (state.epoch is None and offset != 1) or (state.epoch is not None and not same_epoch):
                after: Position | None = None if state.epoch is None else Position(state.epoch, state.offset)
                self._gap(state, name, after, Position(epoch, offset), "stream recreated or trimmed")
            elif same_epoch and offset != state.offset + 1:
                after = Position(epoch, state.offset)
                self._gap(state, name, after, Position(epoch, offset), "trimmed before it was read")
            state.epoch, state.offset = epoch, offset
            position = Position(epoch, offset)
            delivery = Delivery(name, position, fields[b"p"])
            for sub in state.subs:
                if sub.wants(name, position):
                    sub.push(delivery)

    @staticmethod
    def _gap(state: _ChannelState, name: str, after: Position | None, next_: Position, reason: str) -> None:
        gap = Gap(name, after, reason)
        missing_before = Position(next_.epoch, next_.offset - 1)
        for sub in state.subs:
            # Only subscribers that wanted something before `next_` lost anything.
            if sub.wants(name, missing_before):
                sub.push_gap(gap)

    async def _ephemeral_loop(self) -> None:
        prefix = self.ephemeral_key("").encode()
        failures = 0
        while not self._closed:
            try:
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                failures = 0
            except _CONNECTION_ERRORS as exc:
                failures += 1
                low, high = self.reconnect_delay
                delay = min(high, low * 2 ** min(failures - 1, 16))
                logger.warning(
                    "Redis bus pub/sub lost %s (%s); retrying in %.2fs",
                    self._where(),
                    self._describe(exc),
                    delay,
                )
                await anyio.sleep(delay)
                continue
            if not message or message.get("type") != "pmessage":
                continue
            raw_channel: bytes = message["channel"]
            if not raw_channel.startswith(prefix):
                continue
            name = raw_channel[len(prefix) :].decode("utf-8", "replace")
            state = self._channels.get(name)
            if state is not None:
                delivery = Delivery(name, None, message["data"])
                for sub in state.subs:
                    sub.push_ephemeral(delivery)
