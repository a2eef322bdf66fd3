"""The gateway session as a pure, sans-I/O state machine.

No I/O, no clock, no task library: the caller feeds in decoded client frames, bus deliveries
(as shared :class:`~splitchat._frames.Dispatch` objects), answers to the requests the machine
made (authentication, channel authorization, session lookup) and the current time as a float;
the machine queues outgoing frames in its own bounded outbox and returns *actions* for the
I/O layer (:class:`Close`, :class:`Authenticate`, :class:`AuthorizeChannels`,
:class:`Subscribe`, :class:`Unsubscribe`, :class:`ResumeLookup`).

Every (connection state, opcode) transition is in one table, :data:`TRANSITIONS`, in the style
of h11's ``_state.py``. The machine owns the handshake, identify timeout, heartbeat deadline,
per-session sequence numbers, the replay buffer, the inbound frame budget and the outbox
bounds with their overflow policy.

The protocol's vocabulary (opcodes, close codes, states, :class:`GatewayConfig`, the actions) is in
:mod:`splitchat._protocol_types`, the session that outlives a connection (:class:`SessionState`,
its :class:`ReplayBuffer` and crash checkpoint) in :mod:`splitchat._session_state`; both are
re-exported here.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._auth import Principal
from ._frames import (
    ClientFrame,
    Dispatch,
    Encoding,
    FrameError,
    OutFrame,
    decode_client_frame,
    encode_control,
)
from ._payloads import (
    RateLimitedPayload,
    ReadyPayload,
    ResumedPayload,
    SubscribedPayload,
    UnsubscribedPayload,
)
from ._protocol_types import (
    RESUMABLE_CLOSES,
    Action,
    Authenticate,
    AuthorizeChannels,
    Checkpoint,
    Close,
    CloseCode,
    ConnectionState,
    GatewayConfig,
    Op,
    ResumeLookup,
    Subscribe,
    Unsubscribe,
)
from ._session_state import ReplayBuffer, SessionState

# The vocabulary and the session state live in their own modules; they are re-exported here,
# where the machine's users (and tests) have always imported them from.
__all__ = (
    "RESUMABLE_CLOSES",
    "Action",
    "Authenticate",
    "AuthorizeChannels",
    "Checkpoint",
    "Close",
    "CloseCode",
    "ConnectionState",
    "GatewayConfig",
    "GatewayConnection",
    "Op",
    "ReplayBuffer",
    "ResumeLookup",
    "SessionState",
    "Subscribe",
    "Unsubscribe",
)


# Heartbeats answered per heartbeat interval without charging the frame budget: the regular one,
# one the server asked for (op 1) and one of jitter. A client that sends more is flooding: each
# further heartbeat counts against the frame budget (RATE_LIMITED, then 4008 like any frame).
FREE_HEARTBEATS_PER_INTERVAL = 3


class _Out:
    """A queued frame. A dispatch is kept as (shared ``Dispatch``, seq) and rendered only when the
    writer takes it: a queue of N recipients costs N small objects, not N copies of the frame."""

    __slots__ = ("ephemeral", "item", "seq", "size")

    def __init__(self, item: OutFrame | Close | Dispatch, seq: int, size: int, ephemeral: bool) -> None:
        self.item = item
        self.seq = seq
        self.size = size
        self.ephemeral = ephemeral


Handler = Callable[["GatewayConnection", ClientFrame, float], None]


class GatewayConnection:
    """One WebSocket connection's protocol state (and, once identified, its session's).

    Call :meth:`start` first (queues HELLO). Then feed :meth:`receive_data` (or
    :meth:`receive_frame`), :meth:`deliver`, :meth:`tick` and the answers to requested actions;
    each returns the list of actions to perform. Take frames to send with :meth:`next_outgoing`.
    After the connection ends, :meth:`connection_lost` keeps the session accumulating
    deliveries in its replay buffer (same-node resume) until the I/O layer drops it.
    """

    def __init__(self, config: GatewayConfig, encoding: Encoding = "json") -> None:
        self.config = config
        self.encoding: Encoding = encoding
        self.state = ConnectionState.AWAITING_IDENTIFY
        self.session: SessionState | None = None
        self.close_code: int | None = None
        self.resumable = False
        self._identify_deadline = 0.0
        self._heartbeat_deadline = 0.0
        self._budget_start = 0.0
        self._budget_count = 0
        self._heartbeat_window_start = 0.0
        self._heartbeat_count = 0
        self._pending_identify: tuple[str, ...] | None = None  # channels asked in IDENTIFY
        self._pending_denied: list[str] = []  # refused by the limits before authorization
        self._resume_seq = 0
        self._duplicates_possible = False  # the resume rebuilt a crash checkpoint
        self._catch_up: list[Dispatch] = []  # live deliveries held while a resume catches up
        self._outbox: deque[_Out] = deque()
        self.outbox_bytes = 0
        # Frames admitted beyond the outbox bound (READY, a resume's replay + RESUMED + held
        # events) and not yet taken: the bound is raised by them until the writer takes them.
        self._admitted_frames = 0
        self._admitted_bytes = 0
        self.outbox_peak_frames = 0
        self._actions: list[Action] = []

    # ---- inputs ----------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """The connection was accepted: queue HELLO and arm the deadlines."""
        cfg = self.config
        self._identify_deadline = now + cfg.identify_timeout
        self._heartbeat_deadline = now + 1.5 * cfg.heartbeat_interval
        self._budget_start = self._heartbeat_window_start = now
        self._control(Op.HELLO, cfg.hello())
        return self._take()

    def receive_data(self, data: str | bytes, now: float) -> list[Action]:
        """A raw client frame: decode (size limit first) and handle it."""
        if self.state is ConnectionState.CLOSED:
            return []
        try:
            frame = decode_client_frame(data, self.encoding, self.config.max_frame_bytes)
        except FrameError as exc:
            self._close(CloseCode.DECODE_ERROR, str(exc)[:100])
            return self._take()
        return self.receive_frame(frame, now)

    def receive_frame(self, frame: ClientFrame, now: float) -> list[Action]:
        """A decoded client frame."""
        if self.state is ConnectionState.CLOSED:
            return []
        handler = TRANSITIONS.get((self.state, frame.op))
        if handler is None:
            if frame.op not in _CLIENT_OPS:
                self._close(CloseCode.UNKNOWN_OPCODE, f"unknown opcode {frame.op}")
            return self._take()
        if (frame.op != Op.HEARTBEAT or not self._free_heartbeat(now)) and not self._charge_budget(
            frame.op, now
        ):
            return self._take()
        handler(self, frame, now)
        return self._take()

    def tick(self, now: float) -> list[Action]:
        """Time passed: enforce the identify and heartbeat deadlines."""
        if self.state is ConnectionState.CLOSED:
            return []
        if (
            self.session is None
            and self.state is not ConnectionState.CONNECTED
            and now >= self._identify_deadline
        ):
            self._close(CloseCode.NOT_AUTHENTICATED, "identify timeout")
        elif now >= self._heartbeat_deadline:
            self._close(CloseCode.SESSION_TIMED_OUT, "no heartbeat")
        elif self.session is not None:
            self.session.trim(now, self.config)
        return self._take()

    def next_deadline(self) -> float | None:
        """When :meth:`tick` must be called next (``None`` once closed)."""
        if self.state is ConnectionState.CLOSED:
            return None
        if self.session is None and self.state is not ConnectionState.CONNECTED:
            return min(self._identify_deadline, self._heartbeat_deadline)
        return self._heartbeat_deadline

    def deliver(self, dispatch: Dispatch, now: float) -> list[Action]:
        """A bus event (or a presence update) for one of this session's channels."""
        session = self.session
        if session is None or dispatch.channel not in session.channels:
            return []
        if self.state is ConnectionState.RESUMING:
            if len(self._catch_up) >= self.config.send_queue_frames:
                # Resumable like every 4010: this machine gives the session up untouched (the held
                # events were never numbered) and the I/O layer puts the session's record back
                # (Gateway: the store record it took), so the client's next RESUME still works.
                self._catch_up = []
                self._close(CloseCode.SLOW_CONSUMER, "too many events during resume", resumable=True)
                self.session = None
            else:
                self._catch_up.append(dispatch)
            return self._take()
        if session.is_duplicate(dispatch):
            return []
        self._dispatch(dispatch, now)
        return self._take()

    def invalidate(self, now: float) -> list[Action]:
        """The bus lost events of a channel of this session (a ``Gap``): it cannot continue gap-free."""
        if self.session is None:
            return []
        if self.state is not ConnectionState.CLOSED:
            self._control(Op.INVALID_SESSION, False)
            self._close(CloseCode.INVALID_SEQ, "events were lost; identify again", resumable=False)
        self.resumable = False
        return self._take()

    def reconnect(self, now: float) -> list[Action]:
        """The gateway is draining: ask the client to RESUME elsewhere (session kept)."""
        if self.state is ConnectionState.CLOSED:
            return []
        self._control(Op.RECONNECT, None)
        resumable = self.session is not None and self.state is ConnectionState.CONNECTED
        self._close(1012, "gateway restarting: resume", resumable=resumable)
        return self._take()

    def force_close(self, code: int, reason: str, *, resumable: bool) -> list[Action]:
        """Close for a reason outside the protocol (superseded by a RESUME elsewhere, server error)."""
        self._close(code, reason, resumable=resumable and self.session is not None)
        return self._take()

    def connection_lost(self, client_code: int | None) -> None:
        """The socket is gone. A client close 1000/1001 ends the session; anything else keeps it."""
        if self.state is not ConnectionState.CLOSED:
            connected = self.state is ConnectionState.CONNECTED
            self.state = ConnectionState.CLOSED
            self.resumable = connected and client_code not in (1000, 1001)
        elif client_code in (1000, 1001):
            self.resumable = False
        self._clear_outbox()

    # ---- answers to actions ----------------------------------------------------------------

    def identified(self, principal: Principal | None, session_id: str, now: float) -> list[Action]:
        """Answer to :class:`Authenticate`: ``None`` rejects (close 4004)."""
        if self.state is not ConnectionState.AUTHENTICATING:
            return []
        if principal is None:
            self._close(CloseCode.AUTHENTICATION_FAILED, "authentication failed", resumable=False)
            return self._take()
        self.session = SessionState(session_id, principal)
        channels = self._pending_identify or ()
        self._pending_identify = None
        if channels:
            self._actions.append(AuthorizeChannels(channels))
        else:
            self._ready([], self._take_denied(), now)
        return self._take()

    def authorized(self, granted: Sequence[str], denied: Sequence[str], now: float) -> list[Action]:
        """Answer to :class:`AuthorizeChannels`."""
        session = self.session
        if session is None or self.state is ConnectionState.CLOSED:
            return []
        room = self.config.max_channels - len(session.channels)
        accepted = [c for c in granted if c not in session.channels][: max(room, 0)]
        denied = (
            self._take_denied()
            + list(denied)
            + [c for c in granted if c not in accepted and c not in session.channels]
        )
        session.channels.update(accepted)
        if accepted:
            self._actions.append(Subscribe(tuple(accepted)))
            if self.state is not ConnectionState.AUTHENTICATING:
                self._actions.append(Checkpoint())  # (READY below adds its own)
        if self.state is ConnectionState.AUTHENTICATING:
            self._ready(accepted, denied, now)
        else:
            self._dispatch(
                Dispatch.of("SUBSCRIBED", SubscribedPayload(granted=accepted, denied=list(denied))), now
            )
        return self._take()

    def resume_begin(
        self, session: SessionState, now: float, *, from_checkpoint: bool = False
    ) -> list[Action]:
        """Answer to :class:`ResumeLookup`: the session was found and the token matches it.

        From now on live deliveries are held until :meth:`resume_complete` (the seam).

        ``from_checkpoint``: ``session`` is a crash checkpoint (its host died), whose ``seq`` is
        the seq the client had acknowledged (``A``) and whose positions are those at ``A``. The
        client may have received more (up to its ``seq`` ``N >= A``) from the dead node: the
        session continues numbering at ``N + 1`` and everything after the checkpoint positions
        is re-sent, so events between ``A`` and ``N`` arrive twice (same event ``id``; clients
        dedupe by id) and RESUMED says ``"duplicates_possible": true``.
        """
        if self.state is not ConnectionState.RESUMING:
            return []
        self.session = session
        self._catch_up = []
        self._duplicates_possible = False
        if from_checkpoint and self._resume_seq >= session.seq >= 0:
            session.seq = session.buffer_floor = self._resume_seq
            session.buffer.clear()
            session.buffer_bytes = 0
            self._duplicates_possible = True
        if from_checkpoint and not self._duplicates_possible:
            self._invalid_session(now)  # the client is behind what it acknowledged: not resumable
        elif self._resume_seq > session.seq:
            self._close(CloseCode.INVALID_SEQ, "seq is ahead of the session", resumable=False)
        elif self._resume_seq < session.buffer_floor or self._resume_seq < 1:
            self._invalid_session(now)
        return self._take()

    def resume_complete(self, missed: Iterable[Dispatch], now: float) -> list[Action]:
        """Replay the buffer after the client's seq, then ``missed`` (rebuilt from bus history by
        another node), then RESUMED, then the live deliveries held since :meth:`resume_begin`."""
        session = self.session
        if self.state is not ConnectionState.RESUMING or session is None:
            return self._take()
        replay = session.replay_after(self._resume_seq)
        skipped = session.seq - self._resume_seq - len(replay)
        # The client has everything up to its seq: that is the new host's first checkpoint.
        session.acknowledge(self._resume_seq)
        self._actions.append(Checkpoint())
        self.state = ConnectionState.CONNECTED
        # Everything below is admitted beyond the outbox bound: a full replay must never overflow
        # (4010 -> RESUME with the same seq -> 4010 ... forever) nor lose RESUMED, which the
        # client waits for. The total is bounded: replay buffer + history budget + held + 1.
        for seq, dispatch in replay:
            self._push(dispatch, seq, dispatch.approximate_size(), False, admit=True)
        replayed = len(replay)
        for dispatch in missed:
            if dispatch.channel in session.channels and not session.is_duplicate(dispatch):
                self._dispatch(dispatch, now, admit=True)
                replayed += 1
        resumed = ResumedPayload(
            replayed=replayed, skipped_ephemeral=skipped, duplicates_possible=self._duplicates_possible
        )
        self._dispatch(Dispatch.of("RESUMED", resumed, ephemeral=True), now, admit=True)
        held, self._catch_up = self._catch_up, []
        for dispatch in held:
            if not session.is_duplicate(dispatch):
                self._dispatch(dispatch, now, admit=True)
        return self._take()

    def resume_rejected(self, authenticated: bool, now: float) -> list[Action]:
        """Answer to :class:`ResumeLookup`: bad token (4004) or no resumable session (INVALID_SESSION)."""
        if self.state is not ConnectionState.RESUMING:
            return []
        if not authenticated:
            self._close(CloseCode.AUTHENTICATION_FAILED, "authentication failed", resumable=False)
        else:
            self._invalid_session(now)
        return self._take()

    # ---- outbox ----------------------------------------------------------------------------

    def next_outgoing(self) -> OutFrame | Close | None:
        """The next frame to send (or the final :class:`Close`), ``None`` when nothing is queued."""
        if not self._outbox:
            return None
        out = self._taken()
        item = out.item
        if isinstance(item, Dispatch):
            return item.render(self.encoding, out.seq)
        return item

    def next_outgoing_unrendered(self) -> tuple[OutFrame | Close | Dispatch, int] | None:
        """Like :meth:`next_outgoing` but a dispatch comes back as ``(Dispatch, seq)``, for an I/O
        layer that renders it straight into its own buffer (``Dispatch.json_prefix_bytes``)."""
        if not self._outbox:
            return None
        out = self._taken()
        return out.item, out.seq

    def _taken(self) -> _Out:
        out = self._outbox.popleft()
        self.outbox_bytes -= out.size
        if self._admitted_frames:
            # FIFO: whichever frame leaves, the admitted ones are one frame closer to the door.
            self._admitted_frames -= 1
            self._admitted_bytes = max(self._admitted_bytes - out.size, 0)
        return out

    @property
    def outbox_frames(self) -> int:
        """Frames queued and not yet taken by the writer."""
        return len(self._outbox)

    @property
    def outbox_limit_frames(self) -> int:
        """The outbox's current frame bound: ``send_queue_frames`` plus the admitted frames
        (READY, a resume's replay, RESUMED and held events) still queued."""
        return self.config.send_queue_frames + self._admitted_frames

    # ---- handlers (the transition table's targets) ---------------------------------------

    def _on_heartbeat(self, frame: ClientFrame, now: float) -> None:
        self._heartbeat_deadline = now + 1.5 * self.config.heartbeat_interval
        self._control(Op.HEARTBEAT_ACK, None)
        # ``d`` is the last seq the client received: the crash checkpoint may move up to it.
        session = self.session
        if (
            session is not None
            and self.state is ConnectionState.CONNECTED
            and type(frame.d) is int
            and session.acknowledge(frame.d)
        ):
            self._actions.append(Checkpoint())

    def _on_identify(self, frame: ClientFrame, now: float) -> None:
        d = frame.d
        token = d.get("token") if isinstance(d, dict) else None
        asked = self._channels_of(d.get("subscriptions", []) if isinstance(d, dict) else None)
        if not isinstance(token, str) or asked is None:
            self._close(CloseCode.DECODE_ERROR, "invalid IDENTIFY payload")
            return
        self.state = ConnectionState.AUTHENTICATING
        self._pending_identify, self._pending_denied = asked
        self._actions.append(Authenticate(token))

    def _on_resume(self, frame: ClientFrame, now: float) -> None:
        d = frame.d
        if not isinstance(d, dict):
            self._close(CloseCode.DECODE_ERROR, "invalid RESUME payload")
            return
        token, session_id, seq = d.get("token"), d.get("session_id"), d.get("seq")
        if not isinstance(token, str) or not isinstance(session_id, str) or type(seq) is not int or seq < 0:
            self._close(CloseCode.DECODE_ERROR, "invalid RESUME payload")
            return
        self.state = ConnectionState.RESUMING
        self._resume_seq = seq
        self._actions.append(ResumeLookup(token, session_id, seq))

    def _on_subscribe(self, frame: ClientFrame, now: float) -> None:
        asked = self._channels_of(frame.d.get("channels") if isinstance(frame.d, dict) else None)
        if asked is None:
            self._close(CloseCode.DECODE_ERROR, "invalid SUBSCRIBE payload")
            return
        channels, self._pending_denied = asked
        assert self.session is not None
        new = tuple(c for c in channels if c not in self.session.channels)
        if new:
            self._actions.append(AuthorizeChannels(new))
        else:
            denied = self._take_denied()
            self._dispatch(Dispatch.of("SUBSCRIBED", SubscribedPayload(granted=[], denied=denied)), now)

    def _on_unsubscribe(self, frame: ClientFrame, now: float) -> None:
        asked = self._channels_of(frame.d.get("channels") if isinstance(frame.d, dict) else None)
        if asked is None:
            self._close(CloseCode.DECODE_ERROR, "invalid UNSUBSCRIBE payload")
            return
        channels = asked[0]  # (a name over the limits cannot be subscribed: nothing to leave)
        assert self.session is not None
        gone = tuple(c for c in channels if c in self.session.channels)
        self.session.channels.difference_update(gone)
        for channel in gone:
            self.session.forget_channel(channel)
        if gone:
            self._actions.append(Unsubscribe(gone))
            self._actions.append(Checkpoint())
        self._dispatch(Dispatch.of("UNSUBSCRIBED", UnsubscribedPayload(channels=list(gone))), now)

    def _not_authenticated(self, frame: ClientFrame, now: float) -> None:
        self._close(CloseCode.NOT_AUTHENTICATED, "identify first", resumable=False)

    def _already_authenticated(self, frame: ClientFrame, now: float) -> None:
        self._close(CloseCode.ALREADY_AUTHENTICATED, "already authenticated")

    # ---- internals -------------------------------------------------------------------------

    def _channels_of(self, value: Any) -> tuple[tuple[str, ...], list[str]] | None:
        """A channel list from a client: ``None`` if malformed (not a list of strings: 4002);
        else the usable channels (deduplicated, at most ``max_channels``) and the refused ones
        (empty, longer than ``max_channel_length``, or beyond ``max_channels``), which are
        answered in ``denied`` like an authorization refusal: the limits are in HELLO, and a
        client over them must not be closed into an endless retry of the same request."""
        cfg = self.config
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            return None
        usable: list[str] = []
        denied: list[str] = []
        for channel in dict.fromkeys(value):
            if 0 < len(channel) <= cfg.max_channel_length and len(usable) < cfg.max_channels:
                usable.append(channel)
            else:
                denied.append(channel)
        return tuple(usable), denied

    def _take_denied(self) -> list[str]:
        denied, self._pending_denied = self._pending_denied, []
        return denied

    def _free_heartbeat(self, now: float) -> bool:
        """Whether this heartbeat is within the free allowance of its (fixed) interval window."""
        if now >= self._heartbeat_window_start + self.config.heartbeat_interval:
            self._heartbeat_window_start, self._heartbeat_count = now, 0
        self._heartbeat_count += 1
        return self._heartbeat_count <= FREE_HEARTBEATS_PER_INTERVAL

    def _charge_budget(self, op: int, now: float) -> bool:
        cfg = self.config
        if now >= self._budget_start + cfg.frame_budget_window:
            self._budget_start, self._budget_count = now, 0
        self._budget_count += 1
        if self._budget_count <= cfg.frame_budget:
            return True
        if self._budget_count > 2 * cfg.frame_budget:
            self._close(CloseCode.RATE_LIMITED, "frame budget exceeded")
        elif self.session is not None and self.state is ConnectionState.CONNECTED:
            retry_after = round(max(self._budget_start + cfg.frame_budget_window - now, 0.0), 3)
            self._dispatch(
                Dispatch.of(
                    "RATE_LIMITED", RateLimitedPayload(retry_after=retry_after, op=op), ephemeral=True
                ),
                now,
            )
        return False

    def _ready(self, granted: list[str], denied: list[str], now: float) -> None:
        assert self.session is not None
        self.state = ConnectionState.CONNECTED
        ready = ReadyPayload(
            session_id=self.session.session_id,
            resume_gateway_url=self.config.resume_gateway_url,
            user=self.session.principal.identity(),
            subscriptions=granted,
            denied=denied,
        )
        self._dispatch(Dispatch.of("READY", ready), now, admit=True)
        self._actions.append(Checkpoint())

    def _invalid_session(self, now: float) -> None:
        self.session = None
        self._catch_up = []
        self.state = ConnectionState.AWAITING_IDENTIFY
        # The client is told to IDENTIFY on this socket: it gets a full identify timeout for it.
        self._identify_deadline = now + self.config.identify_timeout
        self._control(Op.INVALID_SESSION, False)

    def _dispatch(self, dispatch: Dispatch, now: float, *, admit: bool = False) -> None:
        session = self.session
        assert session is not None
        seq = session.assign(dispatch, now, self.config)
        if self.state is ConnectionState.CONNECTED:
            self._push(dispatch, seq, dispatch.approximate_size(), dispatch.ephemeral, admit=admit)

    def _control(self, op: int, d: Any) -> None:
        frame = encode_control(self.encoding, op, d)
        self._push(frame, 0, len(frame), False)

    def _push(
        self, item: OutFrame | Dispatch, seq: int, size: int, ephemeral: bool, *, admit: bool = False
    ) -> None:
        """Queue a frame within the outbox bounds. ``admit``: a frame the client waits for
        (READY, a resume's replay, RESUMED, the held live events) is never dropped and never
        overflows: it is queued beyond the bound, which it raises until the writer takes it. Its
        count is bounded anyway (replay buffer + history budget + held events + 1)."""
        if self.state is ConnectionState.CLOSED:
            return  # nothing goes out after the Close
        cfg = self.config
        outbox = self._outbox
        if admit:
            outbox.append(_Out(item, seq, size, False))
            self.outbox_bytes += size
            self._admitted_frames += 1
            self._admitted_bytes += size
            if len(outbox) > self.outbox_peak_frames:
                self.outbox_peak_frames = len(outbox)
            return
        max_frames = cfg.send_queue_frames + self._admitted_frames
        max_bytes = cfg.send_queue_bytes + self._admitted_bytes
        if len(outbox) + 1 > max_frames or self.outbox_bytes + size > max_bytes:
            # Overflow policy: drop queued ephemeral frames first, then this one if ephemeral,
            # and only then give up on the consumer (4010, resumable).
            kept = deque(o for o in outbox if not o.ephemeral)
            if len(kept) != len(outbox):
                self._outbox = outbox = kept
                self.outbox_bytes = sum(o.size for o in kept)
            if len(outbox) + 1 > max_frames or self.outbox_bytes + size > max_bytes:
                if not ephemeral:
                    self._close(CloseCode.SLOW_CONSUMER, "slow consumer", flush=False)
                return
        outbox.append(_Out(item, seq, size, ephemeral))
        self.outbox_bytes += size
        if len(outbox) > self.outbox_peak_frames:
            self.outbox_peak_frames = len(outbox)

    def _close(self, code: int, reason: str, *, resumable: bool | None = None, flush: bool = True) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        connected = self.session is not None and self.state is ConnectionState.CONNECTED
        if resumable is None:
            resumable = connected and code in RESUMABLE_CLOSES
        self.state = ConnectionState.CLOSED
        self.close_code = code
        self.resumable = resumable
        if not flush:
            self._clear_outbox()
        close = Close(code, reason, resumable)
        self._outbox.append(_Out(close, 0, 0, False))
        self._actions.append(close)

    def _clear_outbox(self) -> None:
        self._outbox.clear()
        self.outbox_bytes = self._admitted_frames = self._admitted_bytes = 0

    def _take(self) -> list[Action]:
        actions, self._actions = self._actions, []
        return actions


_CLIENT_OPS = frozenset({Op.HEARTBEAT, Op.IDENTIFY, Op.RESUME, Op.SUBSCRIBE, Op.UNSUBSCRIBE})

_S = ConnectionState
_C = GatewayConnection
TRANSITIONS: dict[tuple[ConnectionState, int], Handler] = {
    (_S.AWAITING_IDENTIFY, Op.HEARTBEAT): _C._on_heartbeat,
    (_S.AWAITING_IDENTIFY, Op.IDENTIFY): _C._on_identify,
    (_S.AWAITING_IDENTIFY, Op.RESUME): _C._on_resume,
    (_S.AWAITING_IDENTIFY, Op.SUBSCRIBE): _C._not_authenticated,
    (_S.AWAITING_IDENTIFY, Op.UNSUBSCRIBE): _C._not_authenticated,
    (_S.AUTHENTICATING, Op.HEARTBEAT): _C._on_heartbeat,
    (_S.AUTHENTICATING, Op.IDENTIFY): _C._already_authenticated,
    (_S.AUTHENTICATING, Op.RESUME): _C._already_authenticated,
    (_S.AUTHENTICATING, Op.SUBSCRIBE): _C._not_authenticated,
    (_S.AUTHENTICATING, Op.UNSUBSCRIBE): _C._not_authenticated,
    (_S.RESUMING, Op.HEARTBEAT): _C._on_heartbeat,
    (_S.RESUMING, Op.IDENTIFY): _C._already_authenticated,
    (_S.RESUMING, Op.RESUME): _C._already_authenticated,
    (_S.RESUMING, Op.SUBSCRIBE): _C._not_authenticated,
    (_S.RESUMING, Op.UNSUBSCRIBE): _C._not_authenticated,
    (_S.CONNECTED, Op.HEARTBEAT): _C._on_heartbeat,
    (_S.CONNECTED, Op.IDENTIFY): _C._already_authenticated,
    (_S.CONNECTED, Op.RESUME): _C._already_authenticated,
    (_S.CONNECTED, Op.SUBSCRIBE): _C._on_subscribe,
    (_S.CONNECTED, Op.UNSUBSCRIBE): _C._on_unsubscribe,
}
"""Every allowed (state, client opcode) pair and its handler; a client opcode missing here for the
current state is impossible by construction (CLOSED accepts nothing)."""
