"""sim.netfault: the fault proxy itself, then the uplink through it (stall, cut, throttle)
against a real Mosquitto and the reference gateway."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from device_agent.uplink.client import Uplink
from sim.netfault import FaultProxy, mqtt_packet_length
from tests.test_uplink import (
    DEVICE,
    assert_each_stored_once,
    put,
    uplink_config,
)

# ------------------------------------------------------------------------------ the proxy


@pytest.fixture
def target() -> Iterator[socket.socket]:
    """A bare TCP server on loopback standing in for the broker."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(5)
        yield server


@pytest.fixture
def proxy(target: socket.socket) -> Iterator[FaultProxy]:
    with FaultProxy(*target.getsockname()[:2]) as p:
        yield p


@contextlib.contextmanager
def connected(proxy: FaultProxy, target: socket.socket) -> Iterator[tuple[socket.socket,
                                                                          socket.socket]]:
    """A client connection through the proxy and the target's end of it."""
    client = socket.create_connection((proxy.host, proxy.port), timeout=5)
    server, _ = target.accept()  # the proxy connects on as soon as it accepts
    server.settimeout(5)
    with client, server:
        yield client, server


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            break
        data += more
    return data


def assert_nothing_arrives(sock: socket.socket, within: float = 0.3) -> None:
    """Absence cannot be waited for by an event: a bounded read that must time out."""
    sock.settimeout(within)
    with pytest.raises(TimeoutError):
        sock.recv(1)
    sock.settimeout(5)


def test_bytes_pass_both_ways_and_are_counted(proxy, target) -> None:
    assert proxy.host == "127.0.0.1"
    with connected(proxy, target) as (client, server):
        client.sendall(b"x" * 100_000)
        assert recv_exactly(server, 100_000) == b"x" * 100_000
        server.sendall(b"pong")
        assert recv_exactly(client, 4) == b"pong"
        assert proxy.live() == 1
    assert (proxy.accepted, proxy.bytes_to_server, proxy.bytes_to_client) == (1, 100_000, 4)


def test_stall_forwards_nothing_either_way_until_resume(proxy, target) -> None:
    with connected(proxy, target) as (client, server):
        proxy.stall()
        client.sendall(b"up")
        server.sendall(b"down")
        assert_nothing_arrives(server)
        assert_nothing_arrives(client)
        assert proxy.live() == 1  # held open, like a half-open connection
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as late:
            target.settimeout(0.3)
            with pytest.raises(TimeoutError):
                target.accept()  # a new connection waits too: nothing reaches the broker
            target.settimeout(5)
            proxy.resume()
            assert recv_exactly(server, 2) == b"up"
            assert recv_exactly(client, 4) == b"down"
            late_server, _ = target.accept()
            late_server.settimeout(5)
            with late_server:
                late.sendall(b"late")
                assert recv_exactly(late_server, 4) == b"late"


def test_stall_after_bytes_strikes_at_that_byte(proxy, target) -> None:
    data = bytes(range(256)) * 40
    with connected(proxy, target) as (client, server):
        proxy.stall(after_bytes=1000)
        client.sendall(data)
        assert recv_exactly(server, 1000) == data[:1000]
        assert_nothing_arrives(server)
        proxy.resume()
        assert recv_exactly(server, len(data) - 1000) == data[1000:]


def test_cut_resets_both_sides_and_new_connections_work(proxy, target) -> None:
    with connected(proxy, target) as (client, server):
        proxy.cut()
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        with pytest.raises(ConnectionResetError):
            server.recv(1)
    assert (proxy.resets, proxy.live()) == (1, 0)
    with connected(proxy, target) as (client, server):
        client.sendall(b"again")
        assert recv_exactly(server, 5) == b"again"


def test_refuse_resets_new_connections_only(proxy, target) -> None:
    with connected(proxy, target) as (client, server):
        proxy.refuse()
        with pytest.raises(ConnectionResetError), \
                socket.create_connection((proxy.host, proxy.port), timeout=5) as refused:
            refused.recv(1)  # (or the connect itself already saw the reset)
        client.sendall(b"still")
        assert recv_exactly(server, 5) == b"still"
        proxy.refuse(False)
    assert proxy.refused == 1
    with connected(proxy, target) as (client, server):
        client.sendall(b"open")
        assert recv_exactly(server, 4) == b"open"


def test_throttle_paces_each_direction(proxy, target) -> None:
    with connected(proxy, target) as (client, server):
        proxy.throttle(50_000)
        start = time.monotonic()
        client.sendall(b"t" * 25_000)
        assert recv_exactly(server, 25_000) == b"t" * 25_000
        # The first 50 ms worth may pass at once; the rest at 50 kB/s: at least 0.45 s.
        assert time.monotonic() - start >= 0.4
        proxy.unthrottle()
        server.sendall(b"u" * 25_000)
        assert recv_exactly(client, 25_000) == b"u" * 25_000


def test_delay_holds_each_direction_for_its_own_one_way_time(proxy, target) -> None:
    with connected(proxy, target) as (client, server):
        proxy.delay(to_server=0.3, to_client=0.0)
        start = time.monotonic()
        client.sendall(b"d" * 100_000)
        assert recv_exactly(server, 100_000) == b"d" * 100_000
        assert time.monotonic() - start >= 0.3  # a lower bound: the injector's promise
        proxy.delay(to_server=0.0, to_client=0.4)
        start = time.monotonic()
        server.sendall(b"e" * 10)
        assert recv_exactly(client, 10) == b"e" * 10
        assert time.monotonic() - start >= 0.4
        proxy.delay()
        client.sendall(b"f")
        assert recv_exactly(server, 1) == b"f"


def test_delay_keeps_the_order_of_bytes_and_a_cut_drops_what_is_held(proxy, target) -> None:
    with connected(proxy, target) as (client, server):
        proxy.delay(to_server=0.2)
        client.sendall(b"1" * 1000)
        proxy.delay(to_server=0.0)  # later bytes never overtake held ones
        client.sendall(b"2" * 1000)
        assert recv_exactly(server, 2000) == b"1" * 1000 + b"2" * 1000
        proxy.delay(to_server=5.0)
        client.sendall(b"lost")
        proxy.cut()
        with pytest.raises(ConnectionResetError):
            server.recv(10)  # reset, and the held bytes never came


def test_delay_refuses_a_negative_time(proxy) -> None:
    with pytest.raises(ValueError, match="delays"):
        proxy.delay(to_client=-0.1)


def test_first_packet_hook_answers_for_the_broker(target) -> None:
    seen: list[bytes] = []

    def refuse_all(packet: bytes) -> bytes | None:
        seen.append(packet)
        return b"\x20\x02\x00\x05"  # a CONNACK "not authorised"

    connect = b"\x10\x82\x01" + b"c" * 130  # Remaining Length 130, in two bytes
    assert mqtt_packet_length(connect[:2]) is None
    assert mqtt_packet_length(connect) == len(connect)
    with FaultProxy(*target.getsockname()[:2], first_packet=refuse_all) as proxy, \
            connected(proxy, target) as (client, server):
        client.sendall(connect[:2])  # split inside the length field: the proxy must wait
        assert_nothing_arrives(client)
        client.sendall(connect[2:])
        assert recv_exactly(client, 4) == b"\x20\x02\x00\x05"
        assert client.recv(1) == b""  # then closed
        assert server.recv(1) == b""  # and the broker never saw the packet
    assert seen == [connect]
    assert proxy.refused == 1


def test_close_stops_the_thread_and_resets_connections(target) -> None:
    proxy = FaultProxy(*target.getsockname()[:2])
    with connected(proxy, target) as (client, _server):
        proxy.close()
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    assert not any(t.name == f"netfault-{proxy.port}" for t in threading.enumerate())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((proxy.host, proxy.port), timeout=5)
    proxy.stall()  # controls after close are no-ops, not hangs


# ------------------------------------------------------------------------------ the uplink


def uplink_via(proxy: FaultProxy, broker, outbox_, **over: object) -> Uplink:
    return Uplink(uplink_config(broker, host=proxy.host, port=proxy.port, **over), DEVICE,
                  outbox_, "test-1.0")


def strike_mid_transfer(events, fault) -> threading.Event:
    """As cap-1's manifest goes out, its chunks right behind it (they no longer wait for
    its answer), run ``fault`` (on the uplink's sender thread, at exactly that step): a
    fault armed for some bytes later then lands among the chunks, whatever the machine's
    speed (armed at the manifest's answer, a fast machine had sent every chunk by then)."""
    struck = threading.Event()

    def strike(record: dict) -> None:
        if record.get("capture_id") == "cap-1" and not struck.is_set():
            struck.set()
            fault()

    events.on("uplink.manifest_sent", strike)
    return struck


def assert_resumed_not_restarted(events, capture_id: str) -> None:
    """After the fault the gateway still held the chunks that got through: the transfer
    went on from there instead of starting over."""
    manifests = events.named("gateway.manifest", capture_id=capture_id)
    assert len(manifests) >= 2
    assert all(m["resumed"] for m in manifests[1:])
    (sent,) = events.named("uplink.manifest_sent", capture_id=capture_id)[-1:]
    assert events.named("uplink.final_sent", capture_id=capture_id)[-1]["resent"] < sent["chunks"]


def test_stall_mid_transfer_is_detected_then_resumed_and_stored_once(
    broker, gateway, outbox, store, events
) -> None:
    # 49 chunks each: with 40 kB through, a window of 16 cannot carry cap-1's final out, so
    # even what the dead connection still held when the link came back cannot finish it.
    items = [put(outbox, n, size=400_000) for n in range(3)]
    with FaultProxy(broker.host, broker.port) as proxy:
        # 40 kB of cap-1's chunks reach the broker, then the link goes dead without a word.
        struck = strike_mid_transfer(events, lambda: proxy.stall(after_bytes=40_000))
        up = uplink_via(proxy, broker, outbox, chunk_size=8192, keepalive=5)
        with up:
            assert struck.wait(20)
            # Unanswered: first the ack timeout notices (and retries, into the void), then
            # the MQTT keepalive gives the connection up (~2 keepalives).
            events.wait_for("uplink.retry", capture_id="cap-1", reason="ack timeout")
            events.wait_for("uplink.disconnected", timeout=20)
            assert outbox.depth() == 2
            proxy.resume()
            assert up.wait_idle(30)
        assert proxy.accepted >= 2  # it came back over a new connection
    assert_each_stored_once(store, events, items)
    assert_resumed_not_restarted(events, "cap-1")


def test_cut_mid_transfer_reconnects_and_stores_once(
    broker, gateway, outbox, store, events
) -> None:
    items = [put(outbox, n, size=400_000) for n in range(3)]
    with FaultProxy(broker.host, broker.port) as proxy:
        struck = strike_mid_transfer(events, lambda: proxy.cut(after_bytes=40_000))
        up = uplink_via(proxy, broker, outbox, chunk_size=8192)
        with up:
            assert struck.wait(20)
            events.wait_for("uplink.disconnected")
            assert up.wait_idle(30)
        assert proxy.resets == 1
        assert proxy.accepted >= 2
    assert_each_stored_once(store, events, items)
    assert_resumed_not_restarted(events, "cap-1")


def test_throttled_link_delivers_a_multi_chunk_capture_intact(
    broker, gateway, outbox, store, events
) -> None:
    rate = 200_000
    items = [put(outbox, 30, size=400_000)]
    with FaultProxy(broker.host, broker.port) as proxy:
        proxy.throttle(rate)
        # The final queues behind a window of chunks (16 x 16 KiB = 1.3 s at this rate):
        # the ack timeout must leave room for that.
        up = uplink_via(proxy, broker, outbox, chunk_size=16 * 1024, ack_timeout=5.0)
        start = time.monotonic()
        up.start()
        try:
            assert up.wait_idle(30)
        finally:
            elapsed = time.monotonic() - start
            up.stop()
        assert proxy.bytes_to_server >= 400_000
    assert elapsed >= 0.8 * 400_000 / rate  # the throttle really held it back
    (delivered,) = events.named("capture.delivered")
    assert delivered["chunks"] >= 25
    assert not events.named("uplink.retry")
    assert not events.named("uplink.disconnected", levelname="WARNING")  # only the stop's
    assert_each_stored_once(store, events, items)


def test_cuts_during_chunks_keep_the_chunk_size_on_mqtt5(
    broker, gateway, outbox, store, events
) -> None:
    # Over MQTT 5 the broker states its packet cap, so a lost connection says nothing about
    # the chunk size: halving it would only make the gateway start the capture over.
    items = [put(outbox, n, size=400_000) for n in range(2)]
    cuts: list[int] = []
    with FaultProxy(broker.host, broker.port) as proxy:

        def cut_twice(record: dict) -> None:
            # At cap-1's first two manifests: a fresh round's chunks follow its manifest at
            # once, a resumed round's follow its answer; either way they are still to come
            # (armed at the answer, a fast machine had sent every chunk of the first round).
            if record.get("capture_id") == "cap-1" and len(cuts) < 2:
                cuts.append(1)
                proxy.cut(after_bytes=30_000)

        events.on("uplink.manifest_sent", cut_twice)
        up = uplink_via(proxy, broker, outbox, chunk_size=8192)
        with up:
            assert up.wait_idle(30)
        assert proxy.resets == 2
    assert not events.named("uplink.chunk_size_reduced")
    assert {d["chunk_size"] for d in events.named("capture.delivered")} == {8192}
    assert_each_stored_once(store, events, items)
    assert_resumed_not_restarted(events, "cap-1")
