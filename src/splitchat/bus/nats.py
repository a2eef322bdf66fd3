"""The NATS bus: one JetStream stream for durable events, core NATS for ephemeral ones.

Needs the ``nats`` extra (nats-py, asyncio only). Design (details and reasons in
docs/backends.md):

* One stream (default ``SPLITCHAT``) over the subjects ``<prefix>.ch.>``; channel ``c`` is the
  subject ``<prefix>.ch.c<base64url(c)>`` (any channel name, no subject-syntax surprises).
  ``max_msgs_per_subject`` bounds each channel's history exactly.
* JetStream sequences are per *stream*, so the per-channel offset travels in a header
  (``Splitchat-Offset``) and contiguity is enforced by an optimistic-concurrency publish:
  ``Nats-Expected-Last-Subject-Sequence`` = stream sequence of the channel's last message.
  A publisher that lost the race re-reads the channel's last message and retries.
* Epoch = the stream's creation time: a deleted and recreated stream gets a new epoch.
* ONE ordered push consumer per process over ``<prefix>.ch.>`` feeds the local bounded
  subscriptions; nats-py recreates it from the last stream sequence after a reconnect or a
  missed heartbeat, so nothing retained is lost. A hole in a channel's offsets (trimmed
  before it was read, stream recreated) becomes a :class:`~splitchat.bus.Gap`.
* Ephemeral events: core NATS publish on ``<prefix>.eph.<token>`` (not captured by the stream).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import anyio

try:
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js.api import DeliverPolicy, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
except ImportError as exc:  # pragma: no cover - exercised via bus_from_url
    raise ImportError(f"splitchat.bus.nats needs nats-py: pip install 'splitchat[nats]' ({exc})") from exc

from ._base import BusUnavailable, Delivery, Gap, HistoryGone, Position, Subscription
from ._local import LocalSubscription
from ._remote import RemoteBus

__all__ = ("NatsBus",)

logger = logging.getLogger("splitchat.bus.nats")

OFFSET_HEADER = "Splitchat-Offset"
EPOCH_HEADER = "Splitchat-Epoch"
_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST_SEQUENCE = 10071  # JSStreamWrongLastSequenceErrF
_PUBLISH_ATTEMPTS = 50
_LOCK_STRIPES = 64
_LAST_CACHE_SIZE = 10_000


def channel_token(channel: str) -> str:
    """The subject token of ``channel``: ``c`` + unpadded base64url of its UTF-8 (injective, subject-safe)."""
    return "c" + base64.urlsafe_b64encode(channel.encode()).decode().rstrip("=")


def token_channel(token: str) -> str | None:
    """Inverse of :func:`channel_token` (``None`` for a token it did not produce)."""
    if not token.startswith("c"):
        return None
    body = token[1:]
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
        return raw.decode() if channel_token(raw.decode()) == token else None
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


class _ChannelState:
    __slots__ = ("epoch", "offset", "subs")

    def __init__(self) -> None:
        self.epoch: str | None = None  # None: nothing read yet since attached
        self.offset = 0
        self.subs: set[LocalSubscription] = set()


class _Last:
    """The newest message of a channel as this process last saw it (publish cache)."""

    __slots__ = ("epoch", "offset", "seq")

    def __init__(self, seq: int, offset: int, epoch: str) -> None:
        self.seq, self.offset, self.epoch = seq, offset, epoch


class NatsBus(RemoteBus):
    """A :class:`~splitchat.bus.Bus` on NATS JetStream (history, positions) and core NATS (ephemeral).

    Args:
        servers: NATS URL(s), e.g. ``nats://127.0.0.1:4222``.
        stream: JetStream stream name (created if missing; an existing one is used as is).
        subject_prefix: first subject token(s) of every splitchat subject.
        history_size: events kept per channel (``max_msgs_per_subject``, exact).
        max_age: seconds an event is kept (``None``: no age limit); see docs/backends.md for
            why an age limit can make an idle channel restart its offsets.
        storage: ``"file"`` (survives a server restart) or ``"memory"``.
        timeout: seconds before a publish/history call raises
            :class:`~splitchat.bus.BusUnavailable`.
        buffer_size: items buffered per local subscription before it gets a ``Gap``.
        idle_heartbeat: seconds between consumer heartbeats; two missed ones make the
            ordered consumer recreate itself from the last sequence it saw.
    """

    supports_history = True
    default_port = 4222

    def __init__(
        self,
        servers: str | list[str] = "nats://127.0.0.1:4222",
        *,
        stream: str = "SPLITCHAT",
        subject_prefix: str = "splitchat",
        history_size: int = 2000,
        max_age: float | None = None,
        storage: str = "file",
        timeout: float = 2.0,
        buffer_size: int = 1000,
        idle_heartbeat: float = 1.0,
        connect_options: dict[str, Any] | None = None,
    ) -> None:
        if history_size < 1:
            raise ValueError("history_size must be >= 1")
        if storage not in {"file", "memory"}:
            raise ValueError("storage must be 'file' or 'memory'")
        super().__init__()
        self._channels: dict[str, _ChannelState] = {}
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.history_size = history_size
        self.max_age = max_age
        self.storage = storage
        self.timeout = timeout
        self.buffer_size = buffer_size
        self.idle_heartbeat = idle_heartbeat
        self.connect_options = dict(connect_options or {})
        self.epoch = ""  # of the stream, set by start()
        self._nc: NatsClient | None = None
        self._js: Any = None
        self._jsm: Any = None
        self._last: OrderedDict[str, _Last] = OrderedDict()
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]
        self._nats_subs: list[Any] = []

    def __repr__(self) -> str:
        return f"NatsBus(stream={self.stream!r}, subject_prefix={self.subject_prefix!r})"

    @classmethod
    def from_url(cls, url: str) -> NatsBus:
        """Build from a URL; options in the query: ``stream``, ``subject_prefix``, ``history_size``,
        ``max_age`` (seconds), ``storage`` (file/memory), ``timeout``, ``buffer_size``.

        Example: ``nats://127.0.0.1:4222?stream=CHAT&history_size=5000``.
        """
        parts = urlsplit(url)
        options = dict(parse_qsl(parts.query))
        kwargs: dict[str, Any] = {}
        for key in ("stream", "subject_prefix", "storage"):
            if key in options:
                kwargs[key] = options[key]
        for key in ("history_size", "buffer_size"):
            if key in options:
                kwargs[key] = int(options[key])
        for key in ("max_age", "timeout"):
            if options.get(key):
                kwargs[key] = float(options[key])
        return cls(urlunsplit(parts._replace(query="")), **kwargs)

    # -- subjects ------------------------------------------------------------------------------

    def subject(self, channel: str) -> str:
        """The JetStream subject of ``channel``'s durable events."""
        return f"{self.subject_prefix}.ch.{channel_token(channel)}"

    def ephemeral_subject(self, channel: str) -> str:
        """The core NATS subject of ``channel``'s ephemeral events."""
        return f"{self.subject_prefix}.eph.{channel_token(channel)}"

    # -- lifecycle -----------------------------------------------------------------------------

    def _urls(self) -> list[str]:
        return self.servers

    async def _connect(self) -> None:
        options: dict[str, Any] = {
            "connect_timeout": self.timeout,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "allow_reconnect": True,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        options.update(self.connect_options)
        nc = self._nc = NatsClient()
        try:
            # nats-py retries the first connect forever when reconnects are unlimited: bound it.
            with anyio.fail_after(self.timeout * 2):
                await nc.connect(self.servers, **options)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            with anyio.move_on_after(self.timeout, shield=True):
                await nc.close()
            raise BusUnavailable(f"NATS at {self._where()} is unreachable: {self._describe(exc)}") from exc
        try:
            self._js = self._nc.jetstream(timeout=self.timeout)
            self._jsm = self._nc.jsm(timeout=self.timeout)
            await self._ensure_stream()
            self._nats_subs.append(
                await self._js.subscribe(
                    f"{self.subject_prefix}.ch.>",
                    stream=self.stream,
                    cb=self._on_message,
                    ordered_consumer=True,
                    idle_heartbeat=self.idle_heartbeat,
                    deliver_policy=DeliverPolicy.NEW,
                    pending_msgs_limit=self.buffer_size * 4,
                    pending_bytes_limit=64 * 1024 * 1024,
                )
            )
            self._nats_subs.append(
                await self._nc.subscribe(
                    f"{self.subject_prefix}.eph.>",
                    cb=self._on_ephemeral,
                    pending_msgs_limit=self.buffer_size * 4,
                    pending_bytes_limit=16 * 1024 * 1024,
                )
            )
        except BaseException as exc:
            await nc.close()
            if isinstance(exc, nats.errors.Error | OSError | TimeoutError):
                raise BusUnavailable(f"NATS JetStream setup failed: {self._describe(exc)}") from exc
            raise

    async def _disconnect(self) -> None:
        if self._nc is not None:
            with anyio.move_on_after(self.timeout * 2, shield=True):
                await self._nc.close()

    async def _ensure_stream(self) -> None:
        try:
            info = await self._jsm.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            config = StreamConfig(
                name=self.stream,
                subjects=[f"{self.subject_prefix}.ch.>"],
                retention=RetentionPolicy.LIMITS,
                max_msgs_per_subject=self.history_size,
                max_age=self.max_age,
                discard=DiscardPolicy.OLD,
                storage=StorageType.FILE if self.storage == "file" else StorageType.MEMORY,
            )
            info = await self._jsm.add_stream(config)  # idempotent if another process raced us
        subjects = info.config.subjects or []
        if f"{self.subject_prefix}.ch.>" not in subjects:
            raise BusUnavailable(
                f"JetStream stream {self.stream!r} exists but does not capture "
                f"'{self.subject_prefix}.ch.>' (its subjects: {subjects}); use another stream name"
            )
        created = info.created
        stamp = int(created.timestamp() * 1_000_000) if created is not None else 0
        self.epoch = f"{self.stream}.{stamp:x}"

    # nats-py connection callbacks: log at WARNING, the client reconnects by itself.
    async def _on_error(self, exc: Exception) -> None:
        logger.warning("NATS bus error: %s", self._describe(exc))

    async def _on_disconnected(self) -> None:
        if not self._closed:
            logger.warning("NATS bus disconnected from %s; reconnecting", self._where())

    async def _on_reconnected(self) -> None:
        logger.warning("NATS bus reconnected to %s", self._where())

    def _check_running(self) -> NatsClient:
        if not self._running or self._nc is None:
            raise BusUnavailable("the NATS bus is not running (`async with bus:` or `await bus.start()`)")
        if not self._nc.is_connected:
            # Fail now instead of letting nats-py buffer the request for after a reconnect.
            raise BusUnavailable(f"NATS at {self._where()} is unreachable (reconnecting)")
        return self._nc

    # -- publish -------------------------------------------------------------------------------

    def _remember(self, channel: str, last: _Last) -> None:
        self._last[channel] = last
        self._last.move_to_end(channel)
        while len(self._last) > _LAST_CACHE_SIZE:
            self._last.popitem(last=False)

    async def _fetch_last(self, channel: str) -> _Last | None:
        """The channel's newest retained message, or ``None`` if it has none."""
        try:
            msg = await self._jsm.get_last_msg(self.stream, self.subject(channel))
        except nats.js.errors.NotFoundError:
            return None
        return _Last(msg.seq, *self._read_headers(msg.headers))

    def _read_headers(self, headers: dict[str, str] | None) -> tuple[int, str]:
        headers = headers or {}
        try:
            return int(headers[OFFSET_HEADER]), headers.get(EPOCH_HEADER, self.epoch)
        except (KeyError, ValueError):
            raise BusUnavailable(
                f"a message in stream {self.stream} lacks the {OFFSET_HEADER} header"
            ) from None

    async def publish(self, channel: str, payload: bytes) -> Position:
        nc = self._check_running()
        if len(payload) + 512 > nc.max_payload:
            raise ValueError(f"payload of {len(payload)} bytes exceeds the NATS max_payload {nc.max_payload}")
        subject = self.subject(channel)
        # One publisher per channel per process at a time: they would only race each other.
        async with self._locks[hash(channel) % _LOCK_STRIPES]:
            try:
                with anyio.fail_after(self.timeout * 4):
                    return await self._publish_locked(channel, subject, payload)
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                self._last.pop(channel, None)
                raise BusUnavailable(
                    f"NATS did not accept the publish to {channel!r}: {self._describe(exc)}"
                ) from exc

    async def _publish_locked(self, channel: str, subject: str, payload: bytes) -> Position:
        for attempt in range(_PUBLISH_ATTEMPTS):
            last = self._last.get(channel)
            if last is None:
                last = await self._fetch_last(channel)
                if last is None:
                    # A new run of the channel starts in the current epoch of the stream.
                    await self._ensure_stream()
                    last = _Last(0, 0, self.epoch)
            offset = last.offset + 1
            headers = {
                _EXPECTED_LAST_SUBJECT_SEQ: str(last.seq),
                OFFSET_HEADER: str(offset),
                EPOCH_HEADER: last.epoch,
            }
            try:
                ack = await self._js.publish(subject, payload, headers=headers, stream=self.stream)
            except nats.js.errors.APIError as exc:
                if exc.err_code != _WRONG_LAST_SEQUENCE:
                    raise
                # Another process published to this channel since we looked: re-read, retry.
                self._last.pop(channel, None)
                await anyio.sleep(random.random() * 0.002 * min(attempt + 1, 10))
                continue
            except nats.js.errors.NoStreamResponseError:
                self._last.pop(channel, None)
                await self._ensure_stream()  # the stream was deleted: recreate it (new epoch)
                continue
            self._remember(channel, _Last(ack.seq, offset, last.epoch))
            return Position(last.epoch, offset)
        raise BusUnavailable(f"too much contention publishing to {channel!r}; retry")

    async def publish_ephemeral(self, channel: str, payload: bytes) -> None:
        nc = self._check_running()
        try:
            await nc.publish(self.ephemeral_subject(channel), payload)
        except (nats.errors.Error, OSError) as exc:
            raise BusUnavailable(f"NATS did not accept the ephemeral publish: {self._describe(exc)}") from exc

    # -- history -------------------------------------------------------------------------------

    async def current_position(self, channel: str) -> Position:
        self._check_running()
        try:
            with anyio.fail_after(self.timeout * 2):
                last = await self._fetch_last(channel)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise BusUnavailable(f"NATS is unreachable: {self._describe(exc)}") from exc
        return Position(self.epoch, 0) if last is None else Position(last.epoch, last.offset)

    async def _next_on_subject(self, subject: str, seq: int) -> Any:
        return await self._jsm.get_msg(self.stream, seq=seq, subject=subject, next=True)

    async def history(self, channel: str, since: Position, limit: int = 100) -> Sequence[Delivery]:
        self._check_running()
        try:
            with anyio.fail_after(self.timeout * 4):
                return await self._history(channel, since, limit)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise BusUnavailable(f"NATS is unreachable: {self._describe(exc)}") from exc

    async def _history(self, channel: str, since: Position, limit: int) -> Sequence[Delivery]:
        subject = self.subject(channel)
        last = await self._fetch_last(channel)
        if last is None:
            if since == Position(self.epoch, 0):
                return []
            raise HistoryGone(f"channel {channel!r} has no retained events after {since}")
        if since.epoch != last.epoch:
            raise HistoryGone(f"position {since} is not of the current epoch of {channel!r}")
        if since.offset > last.offset or since.offset < 0:
            raise HistoryGone(f"position {since} is not in channel {channel!r}")
        if since.offset == last.offset or limit <= 0:
            return []
        target = since.offset + 1
        first = await self._next_on_subject(subject, 1)
        first_offset, first_epoch = self._read_headers(first.headers)
        if first_epoch != last.epoch or first_offset > target:
            raise HistoryGone(f"history of {channel!r} after {since} was trimmed")
        # Offsets grow with stream sequences: binary-search the sequence of `target`.
        found, lo, hi = (first if first_offset == target else None), first.seq + 1, last.seq
        while found is None and lo <= hi:
            mid = (lo + hi) // 2
            msg = await self._next_on_subject(subject, mid)
            offset, _ = self._read_headers(msg.headers)
            if offset == target:
                found = msg
            elif offset < target:
                lo = msg.seq + 1
            else:
                hi = mid - 1
        if found is None:
            raise HistoryGone(f"event {target} of {channel!r} is missing")
        result: list[Delivery] = []
        msg = found
        while True:
            offset, epoch = self._read_headers(msg.headers)
            if offset != target + len(result) or epoch != since.epoch:
                raise HistoryGone(f"history of {channel!r} after {since} has a hole")
            result.append(Delivery(channel, Position(epoch, offset), msg.data or b""))
            if len(result) >= limit or msg.seq >= last.seq:
                return result
            msg = await self._next_on_subject(subject, msg.seq + 1)

    # -- subscriptions ---------------------------------------------------------------------------

    def subscribe(self, channels: Iterable[str] = ()) -> Subscription:
        self._check_running()
        sub = LocalSubscription(self, channels, self.buffer_size)
        self._subscriptions.add(sub)
        return sub

    async def _attach(self, sub: LocalSubscription, channels: list[str]) -> None:
        if not self._running:
            raise BusUnavailable("the NATS bus is not running")
        # The process-wide consumer may still be behind the stream: an event accepted before this
        # call may not have been read yet. For a channel the consumer does not track yet, ask the
        # server for its newest message, so such earlier events are not handed to this subscriber.
        floors: dict[str, Position | None] = {}
        for name in channels:
            state = self._channels.get(name)
            if state is not None and state.epoch is not None:
                floors[name] = Position(state.epoch, state.offset)
                continue
            try:
                with anyio.fail_after(self.timeout * 2):
                    last = await self._fetch_last(name)
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                raise BusUnavailable(f"NATS is unreachable: {exc!r}") from exc
            floors[name] = None if last is None else Position(last.epoch, last.offset)
        for name in channels:
            state = self._channels.get(name)
            if state is None:
                state = self._channels[name] = _ChannelState()
            sub.floor[name] = floors[name]
            state.subs.add(sub)

    def _channel_of(self, subject: str) -> str | None:
        return token_channel(subject.rsplit(".", 1)[-1])

    async def _on_message(self, msg: Msg) -> None:
        name = self._channel_of(msg.subject)
        state = self._channels.get(name) if name is not None else None
        if state is None or name is None:
            return
        try:
            offset, epoch = self._read_headers(msg.headers)
        except BusUnavailable:
            logger.warning("NATS bus ignored a message without splitchat headers on %s", msg.subject)
            return
        if state.epoch is not None:
            if epoch == state.epoch and offset <= state.offset:
                return  # redelivered after a consumer reset: already delivered
            if epoch != state.epoch or offset != state.offset + 1:
                gap = Gap(
                    name, Position(state.epoch, state.offset), "events missing (trimmed or stream reset)"
                )
                for sub in state.subs:
                    sub.push_gap(gap)
        state.epoch, state.offset = epoch, offset
        position = Position(epoch, offset)
        delivery = Delivery(name, position, msg.data)
        for sub in state.subs:
            if sub.wants(name, position):
                sub.push(delivery)

    async def _on_ephemeral(self, msg: Msg) -> None:
        name = self._channel_of(msg.subject)
        state = self._channels.get(name) if name is not None else None
        if state is None or name is None:
            return
        delivery = Delivery(name, None, msg.data)
        for sub in state.subs:
            sub.push_ephemeral(delivery)
