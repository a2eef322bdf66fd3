"""The client side of a gateway session as a pure state machine (no I/O, no clock of its own).

The connection runner feeds it frames, timer ticks and disconnects, with the current time, and
carries out the actions it returns. Everything that decides *what* the client does — identify
or resume, when to heartbeat, when a connection is a zombie, what the app sees, whether to
reconnect — lives here and is unit-tested without sockets.
"""

from __future__ import annotations

import enum
import random
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from ._frames import CloseCode, Frame, Opcode
from ._items import ClientEvent, Dispatch, Ready, Resumed, Resync

__all__ = (
    "AuthenticationFailed",
    "ClientSession",
    "CloseSocket",
    "Deliver",
    "GatewayLimits",
    "Phase",
    "ReconnectPlan",
    "SendFrame",
)

# The client closes with this code when *it* decides to reconnect (zombie, RECONNECT): any code
# other than 1000/1001 keeps the server-side session resumable.
RECONNECT_CLOSE_CODE = 4000

# Consecutive failed attempts (no HELLO) on READY's resume_gateway_url before the client falls
# back to its configured gateway URL for the rest of that session. Two, not one: a node that is
# merely restarting its listener gets a second chance; more would only prolong an outage (a
# wrong or dead resume URL otherwise kept the client away from a healthy gateway for good).
RESUME_URL_ATTEMPTS = 2


class AuthenticationFailed(Exception):
    """The gateway closed with 4004: the token was rejected. The client does not reconnect."""


class Phase(enum.Enum):
    """Where the current connection stands."""

    DISCONNECTED = "disconnected"
    AWAIT_HELLO = "await_hello"
    AWAIT_READY = "await_ready"
    CONNECTED = "connected"
    CLOSING = "closing"


def _redact(d: Any) -> Any:
    # IDENTIFY and RESUME carry the bearer token: keep it out of reprs, logs and tracebacks.
    if isinstance(d, dict) and "token" in d:
        return {**d, "token": "<redacted>"}
    return d


class SendFrame(msgspec.Struct, frozen=True):
    """Action: send this frame to the server.

    Its repr hides ``d["token"]`` (IDENTIFY/RESUME): actions end up in debug logs, assertion
    messages and tracebacks, a credential must not. The encoded frame keeps the real token.
    """

    op: int
    d: Any

    def __repr__(self) -> str:
        return f"SendFrame(op={self.op!r}, d={_redact(self.d)!r})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [("op", self.op), ("d", _redact(self.d))]


class Deliver(msgspec.Struct, frozen=True):
    """Action: hand this item to the app (blocking until it has room: that is the backpressure)."""

    item: ClientEvent


class CloseSocket(msgspec.Struct, frozen=True):
    """Action: close this connection with ``code`` and reconnect (``reason`` for logs)."""

    code: int
    reason: str


class ReconnectPlan(msgspec.Struct, frozen=True):
    """What to do after a connection ended: ``resume`` the session or identify afresh.

    ``resume_url_given_up``: this failure was the last allowed on READY's resume URL; from the
    next attempt on the configured gateway URL is used (still resuming, if ``resume``).
    """

    resume: bool
    resume_url_given_up: bool = False


Action = SendFrame | Deliver | CloseSocket


class GatewayLimits(msgspec.Struct, frozen=True, kw_only=True):
    """The limits the server advertised in HELLO (durations in seconds)."""

    heartbeat_interval: float = 41.25
    max_frame_bytes: int = 4096
    frame_budget: int = 120
    frame_budget_window: float = 60.0
    resume_window: float = 120.0
    identify_timeout: float = 10.0
    max_channels: int = 100
    max_channel_length: int = 200

    @classmethod
    def from_hello(cls, d: Any) -> GatewayLimits:
        """Parse HELLO's ``d`` (milliseconds on the wire); missing or bad fields keep defaults."""
        if not isinstance(d, Mapping):
            return cls()
        kwargs: dict[str, Any] = {}
        for key, scale in (
            ("heartbeat_interval", 1000.0),
            ("frame_budget_window", 1000.0),
            ("resume_window", 1000.0),
            ("identify_timeout", 1000.0),
        ):
            value = d.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
                kwargs[key] = float(value) / scale
        for key in ("max_frame_bytes", "frame_budget", "max_channels", "max_channel_length"):
            value = d.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                kwargs[key] = value
        return cls(**kwargs)


def _str_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(v for v in value if isinstance(v, str))
    return ()


class _RecentIds:
    """A bounded set of recently delivered event ids (oldest forgotten first)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, event_id: str) -> bool:
        """Remember ``event_id``; return ``False`` if it was already known."""
        if event_id in self._ids:
            return False
        self._ids[event_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
        return True


class ClientSession:
    """Sans-I/O client session: decides frames to send, items to deliver, and reconnects.

    Delivery guarantee: within a session a dispatch whose ``s`` is not above the last one
    delivered is a duplicate (replay overlap) and is dropped; across sessions (after a resync)
    an event id seen in the last ``dedupe_window`` events is dropped too.
    """

    def __init__(
        self,
        *,
        token: str,
        subscriptions: Iterable[str] = (),
        properties: Mapping[str, Any] | None = None,
        heartbeat_ack_timeout_factor: float = 0.5,
        dedupe_window: int = 8192,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < heartbeat_ack_timeout_factor <= 1:
            raise ValueError("heartbeat_ack_timeout_factor must be in (0, 1]")
        self._token = token
        self._properties = dict(properties or {})
        self._ack_factor = heartbeat_ack_timeout_factor
        self._rng = rng if rng is not None else random.Random()
        self._recent = _RecentIds(dedupe_window)
        self.desired: dict[str, None] = dict.fromkeys(subscriptions)  # ordered set
        self.granted: set[str] = set()
        self.phase = Phase.DISCONNECTED
        self.limits = GatewayLimits()
        self.session_id: str | None = None
        self.resume_url: str | None = None
        self.seq = 0
        self.established = False  # this connection reached READY/RESUMED
        self.resume_url_failures = 0  # consecutive attempts on resume_url that got no HELLO
        self._via_resume_url = False  # the current/last attempt went to resume_url
        self._ever_ready = False
        self._resync_reason = "not_resumable"
        self._next_beat: float | None = None
        self._ack_deadline: float | None = None

    # -- connection lifecycle -------------------------------------------------------------

    def next_resume_url(self) -> str | None:
        """Where to connect next: READY's resume URL, or ``None`` for the configured gateway URL.

        The resume URL is used while there is a session to resume, and only until it has failed
        :data:`RESUME_URL_ATTEMPTS` times in a row (no HELLO from it); then the configured URL
        takes over, still RESUMEing the same session (the server answers RESUMED or
        INVALID_SESSION). Call it once per connection attempt: it records which URL was chosen.
        """
        use = (
            self.session_id is not None
            and self.resume_url is not None
            and self.resume_url_failures < RESUME_URL_ATTEMPTS
        )
        self._via_resume_url = use
        return self.resume_url if use else None

    def connection_opened(self) -> None:
        """A new WebSocket is open; the server speaks first (HELLO)."""
        self.phase = Phase.AWAIT_HELLO
        self.established = False
        self._next_beat = None
        self._ack_deadline = None

    def connection_lost(self, code: int | None) -> ReconnectPlan:
        """The connection ended with close ``code`` (``None``: no connection was made). Plan the next one.

        Also call it when the connection attempt itself failed. Raises
        :class:`AuthenticationFailed` on 4004: a rejected token never gets better by retrying.
        """
        given_up = False
        if self._via_resume_url and self.phase in (Phase.DISCONNECTED, Phase.AWAIT_HELLO):
            self.resume_url_failures += 1  # the resume URL never said HELLO
            given_up = self.resume_url_failures == RESUME_URL_ATTEMPTS
        self._via_resume_url = False
        self.phase = Phase.DISCONNECTED
        self._next_beat = None
        self._ack_deadline = None
        if code == CloseCode.AUTHENTICATION_FAILED:
            raise AuthenticationFailed("the gateway rejected the token (close code 4004)")
        if code == CloseCode.INVALID_SEQ:
            self._drop_session("invalid_seq")
            given_up = False
        return ReconnectPlan(resume=self.session_id is not None, resume_url_given_up=given_up)

    def _drop_session(self, reason: str) -> None:
        self.session_id = None
        self.resume_url = None
        self.resume_url_failures = 0
        self.seq = 0
        self._resync_reason = reason

    # -- timers ---------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must next be called (``None``: no timer running)."""
        times = [t for t in (self._next_beat, self._ack_deadline) if t is not None]
        return min(times) if times else None

    def tick(self, now: float, *, reader_blocked: bool = False) -> list[Action]:
        """Run due timers: send a heartbeat, or declare the connection a zombie.

        ``reader_blocked`` means the runner has stopped reading the socket because the app is
        slow (backpressure); a HEARTBEAT_ACK may be sitting unread, so no zombie verdict then.
        """
        actions: list[Action] = []
        if self._ack_deadline is not None and now >= self._ack_deadline:
            if reader_blocked:
                self._ack_deadline = None
            else:
                self.phase = Phase.CLOSING
                self._next_beat = None
                self._ack_deadline = None
                return [CloseSocket(RECONNECT_CLOSE_CODE, "no HEARTBEAT_ACK: zombie connection")]
        if self._next_beat is not None and now >= self._next_beat:
            actions.append(self._heartbeat(now))
            interval = self.limits.heartbeat_interval
            # Schedule from the planned time, not `now`, so a late tick does not drift; but never
            # schedule into the past (a long pause would otherwise cause a burst).
            self._next_beat = max(self._next_beat + interval, now + interval / 2)
        return actions

    def _heartbeat(self, now: float) -> SendFrame:
        if self._ack_deadline is None:
            self._ack_deadline = now + self.limits.heartbeat_interval * self._ack_factor
        return SendFrame(Opcode.HEARTBEAT, self.seq if self.seq > 0 else None)

    # -- frames ---------------------------------------------------------------------------

    def receive(self, frame: Frame, now: float) -> list[Action]:
        """Handle one frame from the server."""
        op = frame.op
        if op == Opcode.HELLO:
            return self._on_hello(frame, now)
        if self.phase in (Phase.AWAIT_HELLO, Phase.DISCONNECTED, Phase.CLOSING):
            return []
        if op == Opcode.HEARTBEAT_ACK:
            self._ack_deadline = None
            return []
        if op == Opcode.HEARTBEAT:
            return [self._heartbeat(now)]
        if op == Opcode.DISPATCH:
            return self._on_dispatch(frame)
        if op == Opcode.RECONNECT:
            self.phase = Phase.CLOSING
            return [CloseSocket(RECONNECT_CLOSE_CODE, "server asked to reconnect")]
        if op == Opcode.INVALID_SESSION:
            return self._on_invalid_session(frame.d is True)
        return []  # unknown opcodes from a newer server are ignored

    def _on_invalid_session(self, resumable: bool) -> list[Action]:
        if resumable and self.session_id is not None:
            self.phase = Phase.CLOSING
            return [CloseSocket(RECONNECT_CLOSE_CODE, "invalid session (resumable)")]
        self._drop_session("invalid_session")
        if self.phase == Phase.AWAIT_READY:
            # A RESUME was refused; the server waits for an IDENTIFY on this same connection.
            return [self._identify()]
        self.phase = Phase.CLOSING
        return [CloseSocket(CloseCode.NORMAL, "invalid session")]

    def _identify(self) -> SendFrame:
        self.seq = 0
        subscriptions = self._fitting(self.desired, self.limits.max_channels)
        identify: dict[str, Any] = {"token": self._token, "subscriptions": subscriptions}
        if self._properties:
            identify["properties"] = self._properties
        return SendFrame(Opcode.IDENTIFY, identify)

    def _on_hello(self, frame: Frame, now: float) -> list[Action]:
        if self.phase != Phase.AWAIT_HELLO:
            return []
        self.limits = GatewayLimits.from_hello(frame.d)
        if self._via_resume_url:
            self.resume_url_failures = 0  # the resume URL answers: keep using it
        interval = self.limits.heartbeat_interval
        # First beat after interval x jitter, so clients reconnecting together do not beat together.
        self._next_beat = now + interval * self._rng.random()
        self.phase = Phase.AWAIT_READY
        if self.session_id is not None:
            return [
                SendFrame(
                    Opcode.RESUME, {"token": self._token, "session_id": self.session_id, "seq": self.seq}
                )
            ]
        return [self._identify()]

    def _on_dispatch(self, frame: Frame) -> list[Action]:
        s = frame.s
        if not isinstance(s, int) or frame.t is None:
            return []
        if s <= self.seq:
            return []  # already delivered (replay overlap or a duplicated frame)
        t = frame.t
        d = frame.d
        if t == "READY":
            return self._on_ready(s, d)
        resuming = self.phase == Phase.AWAIT_READY and self.session_id is not None
        if self.phase != Phase.CONNECTED and not resuming:
            return []
        self.seq = s
        if t == "RESUMED" and resuming:
            self.phase = Phase.CONNECTED
            self.established = True
            info = d if isinstance(d, Mapping) else {}
            resumed = Resumed(
                replayed=_int(info.get("replayed")), skipped_ephemeral=_int(info.get("skipped_ephemeral"))
            )
            return [Deliver(resumed), *self._reconcile_subscriptions()]
        if t == "SUBSCRIBED" and isinstance(d, Mapping):
            self.granted.update(_str_tuple(d.get("granted")))
            for channel in _str_tuple(d.get("denied")):
                self.desired.pop(channel, None)
        elif t == "UNSUBSCRIBED" and isinstance(d, Mapping):
            self.granted.difference_update(_str_tuple(d.get("channels")))
        if frame.id is not None and not self._recent.add(frame.id):
            return []  # the same event already reached the app (seen in an earlier session)
        return [Deliver(Dispatch(t=t, d=d, s=s, id=frame.id, channel=frame.channel, nonce=frame.nonce))]

    def _on_ready(self, s: int, d: Any) -> list[Action]:
        info = d if isinstance(d, Mapping) else {}
        session_id = info.get("session_id")
        if not isinstance(session_id, str):
            return []
        self.seq = s
        self.session_id = session_id
        resume_url = info.get("resume_gateway_url")
        self.resume_url = resume_url if isinstance(resume_url, str) and resume_url else None
        self.resume_url_failures = 0  # a new session, a new resume URL to try
        subscriptions = _str_tuple(info.get("subscriptions"))
        denied = _str_tuple(info.get("denied"))
        self.granted = set(subscriptions)
        for channel in denied:
            self.desired.pop(channel, None)
        self.phase = Phase.CONNECTED
        self.established = True
        item: ClientEvent
        if self._ever_ready:
            item = Resync(
                reason=self._resync_reason,
                session_id=session_id,
                user=info.get("user"),
                subscriptions=subscriptions,
                denied=denied,
            )
        else:
            item = Ready(
                session_id=session_id, user=info.get("user"), subscriptions=subscriptions, denied=denied
            )
        self._ever_ready = True
        self._resync_reason = "not_resumable"
        return [Deliver(item), *self._reconcile_subscriptions()]

    # -- subscriptions --------------------------------------------------------------------

    def subscribe(self, channels: Iterable[str]) -> list[Action]:
        """The app wants ``channels``; send SUBSCRIBE now if connected, else at the next session."""
        new = [c for c in channels if c not in self.desired]
        self.desired.update(dict.fromkeys(new))
        fitting = self._fitting(new, self.limits.max_channels - len(self.granted))
        if self.phase == Phase.CONNECTED and fitting:
            return [SendFrame(Opcode.SUBSCRIBE, {"channels": fitting})]
        return []

    def unsubscribe(self, channels: Iterable[str]) -> list[Action]:
        """The app no longer wants ``channels``."""
        gone = [c for c in channels if c in self.desired]
        for channel in gone:
            self.desired.pop(channel, None)
        if self.phase == Phase.CONNECTED and gone:
            return [SendFrame(Opcode.UNSUBSCRIBE, {"channels": gone})]
        return []

    def _fitting(self, channels: Iterable[str], room: int) -> list[str]:
        """The channels the server's limits (HELLO) can grant: names within
        ``max_channel_length``, at most ``room`` of them. The rest stay desired but unsent: the
        server would only deny them (older servers closed the connection 4002 instead)."""
        limit = self.limits.max_channel_length
        return [c for c in channels if 0 < len(c) <= limit][: max(room, 0)]

    def _reconcile_subscriptions(self) -> list[Action]:
        """After READY/RESUMED, send what changed while the socket was down."""
        actions: list[Action] = []
        extra = sorted(self.granted - set(self.desired))
        room = self.limits.max_channels - len(self.granted) + len(extra)
        missing = self._fitting([c for c in self.desired if c not in self.granted], room)
        if extra:  # first: the room it frees counts for the SUBSCRIBE below
            actions.append(SendFrame(Opcode.UNSUBSCRIBE, {"channels": extra}))
        if missing:
            actions.append(SendFrame(Opcode.SUBSCRIBE, {"channels": missing}))
        return actions


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
