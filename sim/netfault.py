"""Network fault injection: a TCP proxy between the agent and the broker that can stall, cut,
throttle and refuse, at a moment a test chooses.

Why: killing or restarting the broker (sim.broker) closes connections cleanly or refuses
them. The faults a device meets in a clinic are quieter: Wi-Fi that drops out leaves a
half-open connection that carries nothing, and only a keepalive or an ack timeout notices;
a NAT or firewall resets a connection mid-transfer; a weak link crawls. ::

    with FaultProxy(broker.host, broker.port) as proxy:
        ...  # point the uplink at proxy.host, proxy.port
        proxy.stall()            # or stall(after_bytes=40_000): at a byte-exact point
        proxy.resume()
        proxy.cut()              # RST both ways
        proxy.throttle(200_000)  # bytes per second, each direction
        proxy.delay(to_server=0.02, to_client=0.02)  # one-way seconds: a 40 ms RTT

One thread (``netfault-<port>``) owns every socket and moves the bytes with select(). The
controls change its state under a lock, wake it and wait (bounded) until it has taken the
change in, so when ``stall()`` returns not one more byte moves. Loopback only: it listens on
127.0.0.1 and nowhere else.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

_BUF = 64 * 1024  # bytes held per direction of a connection; beyond that TCP pushes back
_PACE = 0.05  # a throttled direction reads at most this many seconds' worth at once
_TICK = 1.0  # the thread also wakes this often, although every change wakes it at once
#: Bytes a direction's delay line may hold: at least a link's bandwidth-delay product (a
#: cap of _BUF would cap a delayed link's rate at _BUF per delay), still bounded.
_HELD = 32 * 1024 * 1024


def mqtt_packet_length(data: bytes | bytearray) -> int | None:
    """Length of the MQTT packet at the start of ``data`` (fixed header included), or None
    while its Remaining Length field is still incomplete."""
    length = 0
    for i in range(1, min(len(data), 5)):
        length |= (data[i] & 0x7F) << (7 * (i - 1))
        if not data[i] & 0x80:
            return 1 + i + length
    return None


def _reset(sock: socket.socket) -> None:
    """Close with a RST instead of a FIN (SO_LINGER 0), as a NAT that forgot the connection."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass(eq=False)
class _Link:
    """One proxied connection: the agent's socket, the broker's, and what each still owes
    the other."""

    client: socket.socket
    server: socket.socket
    greeting: bool  # the first packet is still arriving (``first_packet`` hook)
    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    ending: bool = False  # a side closed (or we answered for the broker): flush, then close
    closed: bool = False
    ready_at: dict[socket.socket, float] = field(default_factory=dict)  # throttle: next read
    #: delay: per destination, (due time, bytes) read but not yet passed on, oldest first
    held: dict[socket.socket, deque[tuple[float, bytes]]] = field(default_factory=dict)
    held_bytes: dict[socket.socket, int] = field(default_factory=dict)

    def peer(self, sock: socket.socket) -> socket.socket:
        return self.server if sock is self.client else self.client

    def owed(self, dst: socket.socket) -> bytearray:
        """The bytes waiting to be written to ``dst``."""
        return self.to_client if dst is self.client else self.to_server

    def hold(self, dst: socket.socket, due: float, data: bytes) -> None:
        """Pass ``data`` on to ``dst`` at ``due`` (never before what was held earlier)."""
        line = self.held.setdefault(dst, deque())
        if line:
            due = max(due, line[-1][0])
        line.append((due, data))
        self.held_bytes[dst] = self.held_bytes.get(dst, 0) + len(data)

    def release(self, now: float) -> float | None:
        """Move what is due into the write buffers; when the next held bytes are due."""
        nxt = None
        for dst, line in self.held.items():
            while line and line[0][0] <= now:
                _due, data = line.popleft()
                self.owed(dst).extend(data)
                self.held_bytes[dst] -= len(data)
            if line:
                nxt = line[0][0] if nxt is None else min(nxt, line[0][0])
        return nxt


class FaultProxy:
    """Forwards every connection to 127.0.0.1:``port`` on to the target, with faults on demand.

    ``first_packet(packet) -> bytes | None``, if given, sees each connection's first MQTT
    packet (the CONNECT) before the broker does: None lets it through, bytes are sent back
    instead and the connection is closed (a broker front that refuses). It runs on the proxy
    thread, under its lock: it must be quick and must not call the proxy's controls.

    Counters, written by the proxy thread only: ``accepted``, ``refused`` (by ``refuse`` or
    ``first_packet``), ``resets`` (connections cut), ``bytes_to_server``, ``bytes_to_client``.
    """

    host = "127.0.0.1"

    def __init__(self, target_host: str, target_port: int, *,
                 first_packet: Callable[[bytes], bytes | None] | None = None,
                 connect_timeout: float = 2.0) -> None:
        self.target = (target_host, target_port)
        self.first_packet = first_packet
        self.connect_timeout = connect_timeout
        self.accepted = self.refused = self.resets = 0
        self.bytes_to_server = self.bytes_to_client = 0
        self._lock = threading.Lock()
        self._stalled = False
        self._rate: float | None = None
        self._delay_to_server = 0.0
        self._delay_to_client = 0.0
        self._refusing = False
        self._strike: tuple[str, int] | None = None  # ("stall" | "cut", bytes still let through)
        self._taken: list[threading.Event] = []  # controls waiting for the thread to see them
        self._closing = threading.Event()
        self._links: list[_Link] = []
        self._listener = socket.create_server((self.host, 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._owner: dict[socket.socket, _Link] = {}  # each link's sockets, as last watched
        self._thread = threading.Thread(target=self._run, name=f"netfault-{self.port}",
                                        daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------- controls

    def stall(self, after_bytes: int = 0) -> None:
        """Forward nothing either way but keep every connection open: Wi-Fi gone without a
        goodbye (half-open TCP). New connections wait in the listen backlog. With
        ``after_bytes``, first let that many more bytes through towards the broker, to strike
        at a byte-exact point mid-transfer; then this returns once the fault is armed."""
        self._set(strike=("stall", after_bytes))

    def cut(self, after_bytes: int = 0) -> None:
        """Reset every live connection, both sides (RST), as a NAT or firewall that drops
        them; ``after_bytes`` as for :meth:`stall`. New connections are not affected."""
        self._set(strike=("cut", after_bytes))

    def resume(self) -> None:
        """Forward again (and disarm a pending strike). What stalled connections held goes
        through, as TCP delivers it once a link is back."""
        self._set(stalled=False, strike=None)

    def throttle(self, bytes_per_second: float | None) -> None:
        """Limit each direction of each connection to ``bytes_per_second`` (a weak link);
        None lifts the limit."""
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive (or None)")
        self._set(rate=bytes_per_second)

    def delay(self, to_server: float = 0.0, to_client: float = 0.0) -> None:
        """Hold each byte this many seconds before passing it on, per direction (a link's
        one-way delays; their sum is its round-trip time). With :meth:`throttle`, bytes are
        paced as they are read and then delayed: a link of that rate and that latency. A
        cut loses what is held; a stall keeps it. The first packet of a connection seen by
        ``first_packet`` is not delayed."""
        if to_server < 0 or to_client < 0:
            raise ValueError("delays must be >= 0 seconds")
        self._set(delay_to_server=float(to_server), delay_to_client=float(to_client))

    def unthrottle(self) -> None:
        self.throttle(None)

    def refuse(self, on: bool = True) -> None:
        """Reset new connections at once, as a closed or firewalled port; live ones go on."""
        self._set(refusing=on)

    def live(self) -> int:
        """Connections open right now."""
        with self._lock:
            return len(self._links)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (bounded) and close every socket; live connections are reset."""
        self._closing.set()
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"{self._thread.name} did not stop within {timeout}s")

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wake-up is pending anyway; closed: done
            self._wake_w.send(b"\0")

    def _set(self, **state: object) -> None:
        """Change the thread's state (``_stalled``, ``_rate``, ...), wake it and wait until
        it has taken the change in: the caller's next step meets the link in its new state."""
        if self._closing.is_set():
            return
        taken = threading.Event()
        with self._lock:
            for name, value in state.items():
                setattr(self, f"_{name}", value)
            self._taken.append(taken)
        self._wake()
        if not taken.wait(5.0) and not self._closing.is_set():
            raise RuntimeError(f"{self._thread.name} did not take the change in")

    # ------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                readers, writers, timeout = self._arrange()
                readable, writable, _ = select.select(readers, writers, [], timeout)
                with self._lock:
                    for sock in writable:
                        self._on_writable(sock)
                    for sock in readable:
                        self._on_readable(sock)
        finally:
            with self._lock:
                for link in list(self._links):
                    self._drop(link, reset=True)
                for taken in self._taken:
                    taken.set()
            for sock in (self._listener, self._wake_r, self._wake_w):
                sock.close()

    def _arrange(self) -> tuple[list[socket.socket], list[socket.socket], float]:
        """Apply pending controls, then say which sockets to watch for reading and writing,
        and for how long at most (until the next throttled read is due)."""
        with self._lock:
            if self._strike is not None and self._strike[1] <= 0:
                self._strike_now()
            for taken in self._taken:
                taken.set()
            self._taken.clear()
            now = time.monotonic()
            due = now + _TICK
            readers, writers = [self._wake_r], []
            self._owner = {}
            if not self._stalled:
                readers.append(self._listener)
                for link in self._links:
                    held = link.release(now)
                    if held is not None:
                        due = min(due, held)
                    for sock in (link.client, link.server):
                        self._owner[sock] = link
                        if link.owed(sock) and not (sock is link.server and link.greeting):
                            writers.append(sock)
                        at = link.ready_at.get(sock, now)
                        dst = link.peer(sock)
                        if (link.ending or len(link.owed(dst)) >= _BUF
                                or link.held_bytes.get(dst, 0) >= _HELD):
                            continue
                        if at <= now:
                            readers.append(sock)
                        else:
                            due = min(due, at)  # throttled: wake when it may read again
            return readers, writers, due - now

    def _on_writable(self, sock: socket.socket) -> None:
        link = self._owner.get(sock)
        if link is not None and not link.closed and not self._stalled:
            self._write(link, sock)
            self._end_if_done(link)

    def _on_readable(self, sock: socket.socket) -> None:
        if sock is self._wake_r:
            with contextlib.suppress(OSError):
                self._wake_r.recv(4096)
        elif self._stalled:
            return  # a strike earlier in this round: nothing more moves
        elif sock is self._listener:
            self._accept()
        elif (link := self._owner.get(sock)) is not None and not link.closed:
            self._read(link, sock)
            self._end_if_done(link)

    def _end_if_done(self, link: _Link) -> None:
        if (link.ending and not link.closed and not link.to_server and not link.to_client
                and not any(link.held.values())):
            self._drop(link, reset=False)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:  # e.g. the agent gave up before we got to it
            return
        self.accepted += 1
        if self._refusing:
            self.refused += 1
            _reset(client)
            return
        try:
            server = socket.create_connection(self.target, timeout=self.connect_timeout)
        except OSError:
            _reset(client)  # broker down: the agent sees its connection reset
            return
        for sock in (client, server):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # do not add latency
        self._links.append(_Link(client, server, greeting=self.first_packet is not None))

    def _read(self, link: _Link, src: socket.socket) -> None:
        dst = link.peer(src)
        buf = link.owed(dst)
        size = _BUF - len(buf)
        if self._rate:
            size = min(size, max(1, int(self._rate * _PACE)))
        try:
            data = src.recv(size)
        except BlockingIOError:
            return
        except OSError:  # reset by the peer: pass the reset on
            self._drop(link, reset=True)
            return
        if not data:
            link.ending = True
            return
        delay = self._delay_to_server if dst is link.server else self._delay_to_client
        if link.greeting and src is link.client:
            buf += data
        elif delay > 0 or link.held.get(dst):
            link.hold(dst, time.monotonic() + delay, data)
        else:
            buf += data
        if self._rate:
            now = time.monotonic()
            link.ready_at[src] = max(now, link.ready_at.get(src, now)) + len(data) / self._rate
        if link.greeting and src is link.client:
            self._greet(link)

    def _greet(self, link: _Link) -> None:
        total = mqtt_packet_length(link.to_server)
        if len(link.to_server) < min(total or _BUF, _BUF):
            return  # more to come
        link.greeting = False
        if total is None or self.first_packet is None:
            return  # not MQTT as we know it: let it through untouched
        answer = self.first_packet(bytes(link.to_server[:total]))
        if answer is not None:
            self.refused += 1
            link.to_server.clear()
            link.to_client += answer
            link.ending = True

    def _write(self, link: _Link, dst: socket.socket) -> None:
        buf = link.owed(dst)
        limit = len(buf)
        if dst is link.server and self._strike is not None:
            limit = min(limit, self._strike[1])
        try:
            sent = dst.send(buf[:limit])
        except BlockingIOError:
            return
        except OSError:
            self._drop(link, reset=True)
            return
        del buf[:sent]
        if dst is link.client:
            self.bytes_to_client += sent
            return
        self.bytes_to_server += sent
        if self._strike is not None:
            self._strike = (self._strike[0], self._strike[1] - sent)
            if self._strike[1] <= 0:
                self._strike_now()

    def _strike_now(self) -> None:
        assert self._strike is not None
        kind, self._strike = self._strike[0], None
        if kind == "stall":
            self._stalled = True
            return
        self.resets += len(self._links)
        for link in list(self._links):
            self._drop(link, reset=True)

    def _drop(self, link: _Link, *, reset: bool) -> None:
        link.closed = True
        self._links.remove(link)
        for sock in (link.client, link.server):
            if reset:
                _reset(sock)
            else:
                sock.close()
