"""The bounded local fan-out used by the distributed buses: never unbounded, never silent loss."""

from __future__ import annotations

from collections.abc import Iterable

import anyio
from hypothesis import given, settings, strategies as st

from splitchat import Delivery, Gap, Position
from splitchat.bus._local import LocalSubscription


class _Hub:
    def __init__(self) -> None:
        self.attached: set[str] = set()

    async def _attach(self, sub: LocalSubscription, channels: list[str]) -> None:
        self.attached.update(channels)

    def _detach(self, sub: LocalSubscription, channels: Iterable[str]) -> None:
        self.attached.difference_update(channels)


# An op is ("push", channel, skip) - publish the channel's next event, `skip` of them lost
# upstream first (the backend then reports a gap) - or ("recv",) or ("eph", channel).
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.sampled_from("ab"), st.sampled_from([0, 0, 0, 2])),
        st.tuples(st.just("recv")),
        st.tuples(st.just("eph"), st.sampled_from("ab")),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, size=st.integers(1, 6))
async def test_bounded_buffer_reports_every_loss_with_a_gap(ops: list[tuple[object, ...]], size: int) -> None:
    hub = _Hub()
    sub = LocalSubscription(hub, ["a", "b"], size)
    await sub._ensure_started()
    assert hub.attached == {"a", "b"}
    offsets = {"a": 0, "b": 0}
    received: list[Delivery | Gap] = []
    for op in ops:
        if op[0] == "push":
            ch, skip = str(op[1]), int(op[2])  # type: ignore[call-overload]
            if skip:
                after = Position("e", offsets[ch]) if offsets[ch] else None
                sub.push_gap(Gap(ch, after, "lost upstream"))
                offsets[ch] += skip
            offsets[ch] += 1
            sub.push(Delivery(ch, Position("e", offsets[ch]), b"%d" % offsets[ch]))
        elif op[0] == "eph":
            sub.push_ephemeral(Delivery(str(op[1]), None, b"typing"))
        else:
            with anyio.move_on_after(0):
                received.append(await sub.receive())
        assert len(sub._buffer) <= size + 2, "buffer exceeded its bound (+1 gap per channel)"
    while True:  # drain
        with anyio.move_on_after(0) as scope:
            received.append(await sub.receive())
        if scope.cancelled_caught:
            break

    for ch in "ab":
        last = 0
        gap_pending = False
        for item in (i for i in received if i.channel == ch):
            if isinstance(item, Gap):
                assert item.after == (Position("e", last) if last else None), "gap after the wrong position"
                gap_pending = True
            elif item.position is not None:
                assert item.position.offset > last, "out of order or duplicate"
                if item.position.offset != last + 1:
                    assert gap_pending, f"silent loss before {item.position} on {ch}"
                last, gap_pending = item.position.offset, False
        if last < offsets[ch]:
            assert gap_pending, f"events after {last} of {offsets[ch]} on {ch} lost without a gap"


async def test_remove_discards_buffered_items_and_close_ends_iteration() -> None:
    hub = _Hub()
    sub = LocalSubscription(hub, ["a", "b"], 10)
    async with sub:
        sub.push(Delivery("a", Position("e", 1), b"a"))
        sub.push(Delivery("b", Position("e", 1), b"b"))
        await sub.remove(["a"])
        assert hub.attached == {"b"} and sub.channels == {"b"}
        with anyio.fail_after(5):
            item = await sub.receive()
        assert isinstance(item, Delivery) and item.channel == "b"
    assert hub.attached == set()
    with anyio.fail_after(5):
        items = [i async for i in sub]
    assert items == []
