"""In-memory message storage for the example chat app (bounded per channel).

Pure data structures, no I/O: the HTTP handlers in ``app.py`` call these and publish events.
Each channel keeps at most ``max_messages`` messages; the oldest are evicted first, so memory
stays bounded however long the demo runs.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Channel:
    """A chat channel; its id is also the splitchat bus channel name."""

    id: str
    name: str

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name}


@dataclass
class Message:
    """A stored message (Discord's message shape, trimmed)."""

    id: str
    channel_id: str
    author: dict[str, str]
    content: str
    timestamp: str
    nonce: str | None = None
    edited_timestamp: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "channel_id": self.channel_id,
            "author": dict(self.author),
            "content": self.content,
            "timestamp": self.timestamp,
            "edited_timestamp": self.edited_timestamp,
            "nonce": self.nonce,
        }


@dataclass
class _ChannelLog:
    messages: OrderedDict[int, Message] = field(default_factory=OrderedDict)


class MessageStore:
    """Messages per channel, keyed by snowflake id (ids grow with time, so id order = time order)."""

    def __init__(self, channels: list[Channel], *, max_messages: int = 1000) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self.channels = {channel.id: channel for channel in channels}
        self.max_messages = max_messages
        self._logs = {channel.id: _ChannelLog() for channel in channels}

    def has_channel(self, channel_id: str) -> bool:
        return channel_id in self._logs

    def add(self, message: Message) -> None:
        log = self._logs[message.channel_id].messages
        log[int(message.id)] = message
        while len(log) > self.max_messages:
            log.popitem(last=False)

    def get(self, channel_id: str, message_id: str) -> Message | None:
        if not message_id.isdigit():
            return None
        return self._logs[channel_id].messages.get(int(message_id))

    def delete(self, channel_id: str, message_id: str) -> Message | None:
        if not message_id.isdigit():
            return None
        return self._logs[channel_id].messages.pop(int(message_id), None)

    def page(
        self, channel_id: str, *, before: int | None = None, after: int | None = None, limit: int = 50
    ) -> list[Message]:
        """Up to ``limit`` messages with ``after < id < before``, newest first.

        With only ``after``, the ``limit`` messages right after it (paging forward); otherwise
        the newest ``limit`` below ``before`` (paging back), like Discord's message history.
        """
        ids = [
            key
            for key in self._logs[channel_id].messages
            if (before is None or key < before) and (after is None or key > after)
        ]
        ids.sort()
        chosen = ids[:limit] if after is not None and before is None else ids[-limit:]
        log = self._logs[channel_id].messages
        return [log[key] for key in reversed(chosen)]


@dataclass(frozen=True)
class DemoUser:
    id: str
    name: str


class DemoTokens:
    """DEMO ONLY: hands out a random bearer token to anyone who names themselves.

    Bounded (oldest tokens are forgotten first). A real app plugs its own authenticator into
    splitchat instead (sessions, JWT, OAuth...).
    """

    def __init__(self, *, max_tokens: int = 10_000) -> None:
        self.max_tokens = max_tokens
        self._tokens: OrderedDict[str, DemoUser] = OrderedDict()

    def issue(self, user: DemoUser) -> str:
        token = secrets.token_urlsafe(24)
        self._tokens[token] = user
        while len(self._tokens) > self.max_tokens:
            self._tokens.popitem(last=False)
        return token

    def lookup(self, token: str) -> DemoUser | None:
        return self._tokens.get(token)
