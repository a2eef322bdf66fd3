"""Session continuity across connections and nodes, orchestrated over a :class:`Gateway`.

* :func:`resume` answers a RESUME: on the node that hosts the session, the new connection takes
  the (detached or superseded) session's place in one step; on any other node, the record is
  claimed and taken from the session store, the channels are routed live (the machine holds those
  deliveries), what was missed is rebuilt from bus history after the record's positions, and
  the held deliveries follow. A failure on the way puts the record back for the next RESUME.
* :func:`checkpoint_loop` writes the connected sessions' crash checkpoints in batches, so that a
  node that never saw a session can rebuild it if its host dies.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from ._frames import Dispatch
from ._local import _Local
from ._protocol import ConnectionState, ResumeLookup, SessionState
from ._sessions import SessionRecord
from .bus._base import HistoryGone

if TYPE_CHECKING:
    from ._gateway import Gateway

__all__ = ("checkpoint_loop", "resume")

logger = logging.getLogger("splitchat.gateway")

_HISTORY_PAGE = 100


async def resume(gateway: Gateway, local: _Local, request: ResumeLookup) -> None:
    """Answer a :class:`ResumeLookup`: same node (swap the host), or rebuild from the store and bus
    history (another node hosted the session, drained or died)."""
    core = local.core
    principal = await gateway._authenticate(request.token)
    if principal is None:
        await gateway._apply(local, core.resume_rejected(False, gateway._clock()))
        return
    host = gateway._sessions.get(request.session_id)
    if host is not None and host is not local:
        old = host.core
        if old.session is None or old.session.principal.id != principal.id:
            await gateway._apply(local, core.resume_rejected(True, gateway._clock()))
            return
        if not await _still_owner(gateway, request.session_id):
            # Another node hosted the session since (the client resumed there and came
            # back): our copy is stale. Drop it and resume from the store like any node.
            if old.state is not ConnectionState.CLOSED:
                gateway._after(host, old.force_close(4000, "session resumed elsewhere", resumable=False))
                host.attached = False
                await gateway._hub.presence_leave(host, old.session.channels)
            if gateway._sessions.get(request.session_id) is host and old.session is not None:
                await gateway._drop_session(host, request.session_id, old.session.channels)
            old.session = None
            old.resumable = False
            host = None
    if host is not None and host is not local:
        old = host.core
        assert old.session is not None
        if old.state is not ConnectionState.CLOSED:
            # The client came back before we noticed it left: the old socket is superseded.
            gateway._after(host, old.force_close(4000, "session resumed elsewhere", resumable=True))
            host.attached = False
            await gateway._hub.presence_leave(host, old.session.channels)
            if gateway._sessions.get(request.session_id) is not host or old.session is None:
                await gateway._apply(local, core.resume_rejected(True, gateway._clock()))
                return  # someone else resumed it meanwhile
        if not old.resumable:
            await gateway._apply(local, core.resume_rejected(True, gateway._clock()))
            return
        # Same node: the detached session kept collecting events; swap hosts atomically
        # (no await between) so no delivery falls between the two machines.
        session = old.session
        old.session = None
        old.resumable = False
        gateway._sessions[request.session_id] = local
        gateway._hub.move(host, local, session.channels)
        now = gateway._clock()
        actions = list(core.resume_begin(session, now))
        if core.state is ConnectionState.RESUMING:
            actions += core.resume_complete((), now)
            await gateway._hub.presence_join(local, session.channels)
        else:
            await gateway._drop_session(local, session.session_id, session.channels)
        await gateway._apply(local, actions)
        return
    # Claim first: from now on the previous host (a zombie, or a detached copy) can no longer
    # overwrite the record, so what we take is the newest it will ever be.
    await gateway.session_store.claim(request.session_id, gateway.node_id, gateway._record_expiry())
    record = await gateway.session_store.take(request.session_id)
    if record is None or record.principal.id != principal.id:
        if record is not None:
            await gateway.session_store.save(record)  # not theirs: leave it for its owner
        await gateway._apply(local, core.resume_rejected(True, gateway._clock()))
        return
    # Other node: subscribe live first (deliveries are held by the machine), then rebuild what
    # was missed from bus history after the snapshot's positions, then flush the held ones.
    session = record.to_state(gateway._clock())
    actions = list(core.resume_begin(session, gateway._clock(), from_checkpoint=record.checkpoint))
    if core.state is not ConnectionState.RESUMING:
        await gateway._apply(local, actions)
        return
    gateway._sessions[session.session_id] = local
    completed = False
    try:
        await gateway._hub.add(local, tuple(session.channels), announce=False)
        missed = await _missed_since(gateway, session.positions, session.channels)
        if core.state is ConnectionState.RESUMING:
            actions += core.resume_complete(missed, gateway._clock())
            completed = True
    except HistoryGone:
        if core.state is ConnectionState.RESUMING:
            # The gap cannot be rebuilt: the session is over (INVALID_SESSION, IDENTIFY again).
            actions += core.resume_rejected(True, gateway._clock())
            completed = True  # nothing to put back
            await gateway._drop_session(local, session.session_id, session.channels)
            await gateway._apply(local, actions)
            return
        # (the machine closed meanwhile: put the record back, the next RESUME decides)
    except Exception:
        logger.warning("resuming %s failed; its record is put back", session.session_id, exc_info=True)
    finally:
        if not completed:
            # A dependency failed (hub.add, history: BusUnavailable...), the machine gave the
            # session up (too many live events held during the catch-up: 4010), or we were
            # cancelled. The session must not stay hosted here on a machine that cannot serve
            # it: deliveries would advance its positions past what the client never got. Unroute
            # it and put the record we took back (claimed by us, so the store accepts it); the
            # client's next RESUME (4000/4010 say RESUME) starts over from it.
            with anyio.CancelScope(shield=True):
                await _abandon_resume(gateway, local, session, record)
    if not completed:
        # (a no-op when the machine closed itself already, e.g. 4010)
        actions += core.force_close(4000, "resume failed; resume again", resumable=False)
        await gateway._apply(local, actions)
        return
    await gateway._hub.presence_join(local, session.channels)
    await gateway._apply(local, actions)


async def _abandon_resume(
    gateway: Gateway, local: _Local, session: SessionState, record: SessionRecord
) -> None:
    await gateway._drop_session(local, session.session_id, session.channels)
    local.core.session = None  # (a detach of this connection then has nothing to save)
    local.core.resumable = False
    with anyio.move_on_after(gateway.drain_timeout):
        try:
            await gateway.session_store.save(msgspec.structs.replace(record, owner=gateway.node_id))
        except Exception:
            logger.warning("putting session %s back failed", session.session_id, exc_info=True)


async def _missed_since(
    gateway: Gateway, positions: dict[str, Any], channels: Iterable[str]
) -> list[Dispatch]:
    missed: list[Dispatch] = []
    budget = gateway.config.replay_frames
    for channel in sorted(channels):
        since = positions.get(channel)
        if since is None:
            continue  # nothing delivered before the snapshot: nothing to compare against
        while True:
            page = await gateway.bus.history(channel, since, limit=_HISTORY_PAGE)
            for delivery in page:
                dispatch = gateway._hub.decode(delivery)
                if dispatch is not None:
                    missed.append(dispatch)
            if len(missed) > budget:
                raise HistoryGone("more missed events than a replay may hold")
            if len(page) < _HISTORY_PAGE:
                break
            last = page[-1].position
            assert last is not None
            since = last
    return missed


async def _still_owner(gateway: Gateway, session_id: str) -> bool:
    """Claim ``session_id`` for this node; ``False`` if another node held it meanwhile."""
    try:
        previous = await gateway.session_store.claim(session_id, gateway.node_id, gateway._record_expiry())
    except Exception:
        # Store down: serve the local copy (availability); ownership is rechecked on the
        # next checkpoint write, which a node that lost the session gets refused.
        logger.warning("session store unavailable; resuming %s from memory", session_id)
        return True
    return previous is None or previous == gateway.node_id


async def checkpoint_loop(gateway: Gateway) -> None:
    """Write the checkpoints of connected sessions in batches: the dirty ones every
    ``checkpoint_interval``, and every session at least every third of the resume window
    (so its record outlives it). Never one store write per dispatch."""
    refresh = gateway.config.resume_window / 3
    while True:
        await anyio.sleep(gateway.checkpoint_interval)
        now = gateway._clock()
        due = {
            local
            for local in gateway._sessions.values()
            if local.attached and now - local.checkpointed_at >= refresh
        }
        due |= gateway._dirty
        gateway._dirty = set()
        expires_at = gateway._record_expiry()
        batch: list[_Local] = []
        records: list[SessionRecord] = []
        for local in due:
            session = local.core.session
            if local.attached and session is not None and local.core.state is ConnectionState.CONNECTED:
                batch.append(local)
                records.append(SessionRecord.checkpoint_of(session, expires_at, gateway.node_id))
        if not batch:
            continue
        try:
            with anyio.fail_after(max(gateway.checkpoint_interval, 2.0)):
                saved = await gateway.session_store.save_many(records)
        except Exception:
            logger.warning("checkpoint of %d sessions failed; retrying", len(batch), exc_info=True)
            gateway._dirty.update(batch)
            continue
        for local, ok in zip(batch, saved, strict=True):
            local.checkpointed_at = now
            if not ok and local.core.session is not None:
                # Another node took the session over (this connection is a zombie).
                session = local.core.session
                gateway._after(
                    local, local.core.force_close(4000, "session resumed elsewhere", resumable=False)
                )
                await gateway._drop_session(local, session.session_id, session.channels)
