"""The transfer state machine (device_agent.uplink.transfer) driven directly: acks in, actions
out. No broker, no threads, no sleeps; the end-to-end behaviour over MQTT is test_uplink's."""

from __future__ import annotations

import hashlib

import pytest

from dermascope_wire import bundle, signing
from dermascope_wire.protocol import (
    MAX_CHUNKS,
    Ack,
    ProtocolError,
    chunk_slice,
    decode_chunk,
)
from device_agent.uplink.transfer import (
    MAX_STALLED_ROUNDS,
    AwaitAck,
    Backoff,
    ChunkSizeLearner,
    CorruptPayload,
    Done,
    SendChunks,
    SendFinal,
    SendManifest,
    Transfer,
    choose_chunk_size,
    verify_ack,
)

DEVICE = "derm-0001"
CAPTURE = "cap-1"
DATA = bytes(range(256)) * 40  # 10240 bytes: 10 chunks of 1024
SHA = hashlib.sha256(DATA).digest()


def transfer(data: bytes = DATA, chunk_size: int = 1024) -> Transfer:
    return Transfer(CAPTURE, data, hashlib.sha256(data).digest(), chunk_size)


def ack(t: Transfer, state: str, missing: tuple[int, ...] = (), **fields) -> Ack:
    """The gateway's answer to the transfer's current request."""
    values = {"req": t.req, "chunk_count": t.chunk_count, "sha256": t.sha256.hex(),
              "device_id": DEVICE, **fields}
    return Ack(CAPTURE, state, missing=missing, **values)  # type: ignore[arg-type]


def kinds(actions: list) -> list[type]:
    return [type(a) for a in actions]


class Gateway:
    """A gateway in memory: keeps the chunks it is sent, answers a manifest with the ones it
    lacks then and a final with the ones it lacks (or commits), dropping those in ``lose``
    the first time they come (as a receiver that had not staged the manifest yet)."""

    def __init__(self, lose: set[int] = frozenset()) -> None:
        self.chunks: dict[int, bytes] = {}
        self.lose = set(lose)
        self.sent: list[tuple[int, ...]] = []

    def answer(self, t: Transfer) -> Ack:
        missing = tuple(i for i in range(t.chunk_count) if i not in self.chunks)
        return ack(t, "incomplete", missing) if missing else ack(t, "committed")

    def run(self, t: Transfer, actions: list) -> Done:
        while True:
            answer = None
            for action in actions:
                if isinstance(action, SendManifest):
                    # Answered as the manifest comes, before any chunk behind it.
                    missing = tuple(i for i in range(t.chunk_count) if i not in self.chunks)
                    answer = ack(t, "incomplete", missing)
                elif isinstance(action, SendFinal):
                    answer = None
                elif isinstance(action, SendChunks):
                    self.sent.append(action.indexes)
                    for index in action.indexes:
                        if index in self.lose:
                            self.lose.discard(index)
                            continue
                        chunk = decode_chunk(t.chunk(index))
                        assert chunk.sha256 == t.sha256
                        self.chunks[chunk.index] = chunk.data
                elif isinstance(action, AwaitAck):
                    answer = answer or self.answer(t)
                    assert t.answers(answer)
                elif isinstance(action, Done):
                    return action
            assert answer is not None, actions
            actions = t.on_ack(answer)


# -- one round at a time ------------------------------------------------------------------


def test_a_fresh_transfer_sends_every_chunk_right_behind_its_manifest_then_a_final():
    t = transfer()
    first = t.start()
    assert kinds(first) == [SendManifest, SendChunks, AwaitAck]
    manifest = first[0].manifest
    assert (manifest.capture_id, manifest.size, manifest.chunk_size, manifest.chunk_count,
            manifest.sha256) == (CAPTURE, len(DATA), 1024, 10, SHA.hex())
    assert manifest.content_type == "application/octet-stream"  # neither bundle nor sealed
    # Before the manifest's answer: the gateway cannot hold any chunk of a new transfer.
    assert first[1] == SendChunks(tuple(range(10)), until_answered=True)
    assert first[2] == AwaitAck(manifest.req)
    for index in first[1].indexes:
        t.chunk(index)
    assert t.exposed  # chunks out, no ack yet

    # The manifest's answer lists what the gateway lacked when the manifest came: all sent.
    actions = t.on_ack(ack(t, "incomplete", tuple(range(10))))
    assert kinds(actions) == [SendFinal, AwaitAck]
    final = actions[0].final
    assert (final.capture_id, final.sha256, final.chunk_count) == (CAPTURE, SHA.hex(), 10)
    assert final.req > manifest.req
    assert actions[0].resent == 0
    assert actions[1] == AwaitAck(final.req)

    assert t.on_ack(ack(t, "committed")) == [Done("committed")]
    assert not t.exposed


def test_an_answer_that_stops_the_early_chunks_gets_the_rest_it_lists_sent():
    t = transfer()
    early = t.start()[1]
    for index in early.indexes[:4]:  # the answer came in after four chunks
        t.chunk(index)
    actions = t.on_ack(ack(t, "incomplete", tuple(range(10))))
    assert actions[0] == SendChunks(tuple(range(4, 10)))
    assert actions[1].resent == 6


def test_early_chunks_a_receiver_dropped_are_sent_after_the_finals_answer():
    """A receiver that had not staged the manifest when the first chunks came drops them
    (docs/protocol.md §3.2) and lists them in its answer to the final."""
    t = transfer()
    gateway = Gateway(lose={0, 1})
    assert gateway.run(t, t.start()) == Done("committed")
    assert gateway.sent == [tuple(range(10)), (0, 1)]
    assert b"".join(gateway.chunks[i] for i in range(10)) == DATA


def test_a_resume_sends_early_only_the_chunks_never_published():
    """After a reconnect the transfer starts again: chunks it published may be at the gateway
    (their answer decides), those it never published cannot be."""
    t = transfer()
    first = t.start()
    for index in first[1].indexes[:6]:
        t.chunk(index)  # then the connection went
    again = t.start()
    assert kinds(again) == [SendManifest, SendChunks, AwaitAck]
    assert again[1] == SendChunks((6, 7, 8, 9), until_answered=True)
    for index in again[1].indexes:
        t.chunk(index)
    actions = t.on_ack(ack(t, "incomplete", (4, 5, 6, 7, 8, 9)))  # 4 and 5 were lost
    assert actions[0] == SendChunks((4, 5))


def test_after_a_failed_round_the_gateway_is_asked_before_any_chunk():
    t = transfer()
    t.start()
    assert t.on_ack(ack(t, "retry", reason="no_key"))[0] == Backoff(0, "gateway: retry no_key")
    assert kinds(t.start()) == [SendManifest, AwaitAck]


def test_a_payload_that_does_not_match_its_sha256_is_caught_before_its_last_chunk():
    bad = bytearray(DATA)
    bad[5000] ^= 1
    t = Transfer(CAPTURE, bytes(bad), SHA, 1024)
    for index in range(9):
        t.chunk(index)
    with pytest.raises(CorruptPayload, match="SHA-256"):
        t.chunk(9)


def test_chunks_sent_again_or_out_of_order_do_not_upset_the_sha256_check():
    t = transfer()
    for index in (0, 1, 1, 0, 2, 5, 3, 4, 5, 6, 7, 8, 9):
        t.chunk(index)  # no CorruptPayload: the in-order pass adds up
    assert t.published == set(range(10))


def test_chunks_are_the_payloads_slices_and_the_last_one_is_short():
    data = DATA + b"tail"
    t = transfer(data)
    assert t.chunk_count == 11
    for index in (0, 5, 10):
        chunk = decode_chunk(t.chunk(index))
        assert chunk.index == index
        assert chunk.data == chunk_slice(data, 1024, index)
    assert decode_chunk(t.chunk(10)).data == b"tail"


def test_the_content_type_is_told_by_the_payloads_magic():
    t = transfer(bundle.MAGIC + DATA)
    assert t.start()[0].manifest.content_type == bundle.CONTENT_TYPE


def test_a_resumed_transfer_sends_only_the_missing_chunks():
    t = transfer()
    t.start()
    actions = t.on_ack(ack(t, "incomplete", (3, 7)))
    assert actions[0] == SendChunks((3, 7))
    assert actions[1].resent == 2


def test_a_gateway_that_has_it_all_already_commits_at_the_manifest():
    t = transfer()
    t.start()
    assert t.on_ack(ack(t, "committed")) == [Done("committed")]
    assert not t.exposed  # no chunk ever left


def test_against_a_gateway_in_memory_lost_chunks_are_sent_again():
    t = transfer()
    t.start()
    t.on_ack(None)  # a failed round: the next one asks before sending
    gateway = Gateway(lose={2, 9})
    assert gateway.run(t, t.start()) == Done("committed")
    assert gateway.sent == [tuple(range(10)), (2, 9)]
    assert b"".join(gateway.chunks[i] for i in range(10)) == DATA


def test_an_empty_payload_is_one_empty_chunk():
    t = transfer(b"")
    gateway = Gateway()
    assert gateway.run(t, t.start()) == Done("committed")
    assert gateway.chunks == {0: b""}


# -- no progress, another transfer, no answer ---------------------------------------------


def test_a_stalled_gateway_is_given_up_on_after_max_stalled_rounds():
    t = transfer()
    t.start()
    finals = 0
    actions = t.on_ack(ack(t, "incomplete", (5,)))
    while kinds(actions) == [SendChunks, SendFinal, AwaitAck]:
        finals += 1
        assert finals <= 10, "never gave up"
        actions = t.on_ack(ack(t, "incomplete", (5,)))  # chunk 5 never arrives
    assert finals == MAX_STALLED_ROUNDS
    assert actions == [Backoff(0, "ack timeout")]


def test_a_gateway_making_progress_is_not_stalled():
    t = transfer()
    t.start()
    missing = tuple(range(10))
    for _ in range(9):
        actions = t.on_ack(ack(t, "incomplete", missing))
        assert kinds(actions) == [SendChunks, SendFinal, AwaitAck]
        missing = missing[1:]  # one more chunk arrived each round
    assert t.on_ack(ack(t, "committed")) == [Done("committed")]


def test_an_ack_for_another_chunk_count_starts_over():
    t = transfer()
    first = t.start()[0].manifest.req
    actions = t.on_ack(ack(t, "incomplete", (0, 1), chunk_count=5))
    assert actions == [Backoff(0, "ack timeout")]
    again = t.start()
    assert kinds(again) == [SendManifest, AwaitAck]
    assert again[0].manifest.req > first
    assert again[0].manifest.chunk_count == 10  # the same transfer, announced afresh


def test_no_ack_in_time_backs_off_longer_each_attempt_then_starts_a_new_round():
    t = transfer()
    t.start()
    assert t.on_ack(None) == [Backoff(0, "ack timeout")]
    t.start()
    assert t.on_ack(None) == [Backoff(1, "ack timeout")]
    assert kinds(t.start()) == [SendManifest, AwaitAck]


def test_no_ack_after_chunks_leaves_them_exposed():
    """A connection lost then may be the broker refusing the chunks' size."""
    t = transfer()
    t.start()
    t.on_ack(ack(t, "incomplete", (0,)))
    assert t.on_ack(None) == [Backoff(0, "ack timeout")]
    assert t.exposed


# -- the gateway's verdicts -----------------------------------------------------------------


def test_rejected_is_final():
    t = transfer()
    t.start()
    t.on_ack(ack(t, "incomplete", (0,)))
    assert t.on_ack(ack(t, "rejected", reason="bad_bundle")) == [Done("rejected", "bad_bundle")]


def test_retry_backs_off_and_says_why():
    t = transfer()
    t.start()
    assert t.on_ack(ack(t, "retry", reason="disk_full")) == [
        Backoff(0, "gateway: retry disk_full")]
    t.start()
    assert t.on_ack(ack(t, "retry", reason="disk_full"))[0].attempt == 1


def test_only_a_verdict_answers_whatever_request_it_names():
    t = transfer()
    t.start()
    t.on_ack(ack(t, "incomplete", (0,)))  # now awaiting the final's ack
    stale = ack(t, "incomplete", (0,), req=t.req - 1)
    assert not t.answers(stale)
    assert not t.answers(ack(t, "retry", req=t.req - 1))
    assert t.answers(ack(t, "incomplete", (0,)))
    assert t.answers(ack(t, "committed", req=0))
    assert t.answers(ack(t, "rejected", req=0))


def test_requests_are_numbered_by_the_uplinks_counter():
    numbers = iter(range(100, 200))
    t = Transfer(CAPTURE, DATA, SHA, 1024, lambda: next(numbers))
    assert t.start()[0].manifest.req == 100
    assert t.on_ack(ack(t, "incomplete", (1,)))[1].final.req == 101


# -- which acks the device acts on ------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway_key():
    return signing.generate_key()


def signed(a: Ack, key) -> bytes:
    return signing.sign(a.encode(), key)


def test_a_signed_committed_ack_for_this_transfer_is_acted_on(gateway_key):
    trust = signing.Trust.of([gateway_key.public_key()])
    t = transfer()
    t.start()
    payload = signed(ack(t, "committed"), gateway_key)
    verified = verify_ack(payload, trust, DEVICE, CAPTURE, SHA.hex())
    assert t.on_ack(verified) == [Done("committed")]


def test_a_committed_ack_with_another_sha256_is_refused(gateway_key):
    """A signed ack of another transfer of this capture, replayed: it means nothing, and
    the transfer times out instead (then starts again)."""
    trust = signing.Trust.of([gateway_key.public_key()])
    t = transfer()
    t.start()
    other = hashlib.sha256(b"another payload").hexdigest()
    for state in ("committed", "incomplete"):
        payload = signed(ack(t, state, (0,) if state == "incomplete" else (), sha256=other),
                         gateway_key)
        with pytest.raises(signing.SignatureError) as refused:
            verify_ack(payload, trust, DEVICE, CAPTURE, SHA.hex())
        assert refused.value.reason == "sha256_mismatch"
    assert t.on_ack(None) == [Backoff(0, "ack timeout")]


def test_rejected_and_retry_need_no_sha256(gateway_key):
    trust = signing.Trust.of([gateway_key.public_key()])
    t = transfer()
    t.start()
    for state in ("rejected", "retry"):
        payload = signed(ack(t, state, sha256="", reason="x"), gateway_key)
        assert verify_ack(payload, trust, DEVICE, CAPTURE, SHA.hex()).state == state


@pytest.mark.parametrize(("fields", "reason"), [
    ({"device_id": "derm-0002"}, "wrong_device"),
    ({"device_id": ""}, "wrong_device"),  # a signed ack must name the device
])
def test_an_ack_for_another_device_is_refused(gateway_key, fields, reason):
    trust = signing.Trust.of([gateway_key.public_key()])
    t = transfer()
    t.start()
    with pytest.raises(signing.SignatureError) as refused:
        verify_ack(signed(ack(t, "committed", **fields), gateway_key), trust, DEVICE, CAPTURE,
                   SHA.hex())
    assert refused.value.reason == reason


def test_an_ack_naming_another_capture_than_its_topic_is_refused(gateway_key):
    trust = signing.Trust.of([gateway_key.public_key()])
    t = transfer()
    t.start()
    with pytest.raises(signing.SignatureError) as refused:
        verify_ack(signed(ack(t, "committed"), gateway_key), trust, DEVICE, "cap-2", SHA.hex())
    assert refused.value.reason == "wrong_capture"


def test_unsigned_acks_pass_only_in_development_mode(gateway_key):
    t = transfer()
    t.start()
    plain = ack(t, "committed").encode()
    with pytest.raises(signing.SignatureError) as refused:
        verify_ack(plain, signing.Trust.of([gateway_key.public_key()]), DEVICE, CAPTURE,
                   SHA.hex())
    assert refused.value.reason == "unsigned"
    bench = signing.Trust(allow_unsigned=True)
    assert verify_ack(plain, bench, DEVICE, CAPTURE, SHA.hex()).state == "committed"
    with pytest.raises(ProtocolError):
        verify_ack(b"not json", bench, DEVICE, CAPTURE, SHA.hex())


# -- the chunk size ----------------------------------------------------------------------------


def test_the_chunk_size_fits_the_brokers_packet_cap():
    assert choose_chunk_size(10_000, 4096, None, 40) == 4096
    capped = choose_chunk_size(10_000, 65536, 8192, 40)
    assert capped is not None
    assert capped < 8192
    with pytest.raises(ProtocolError) as small:
        choose_chunk_size(10_000, 4096, 600, 40)
    assert small.value.reason == "packet_too_small"


def test_a_payload_beyond_max_chunks_gets_bigger_chunks_or_is_refused():
    size = MAX_CHUNKS * 1024 + 1
    assert choose_chunk_size(size, 1024, None, 40) == 1025
    # 1580 bytes a packet leave 1012 for a chunk (and 972 beside a 40-byte topic): too few.
    assert choose_chunk_size(size, 1024, 1580, 40) is None
    assert choose_chunk_size(size, 1024, 1700, 40) == 1025


def test_two_drops_while_chunking_halve_the_chunk_size_over_mqtt311():
    learner = ChunkSizeLearner()
    assert learner.limit(8192) == 8192
    assert learner.dropped(8192, mqtt5=False, packet_too_large=False) is None
    assert learner.dropped(8192, mqtt5=False, packet_too_large=False) == 4096
    assert learner.limit(8192) == 4096
    learner.dropped(4096, mqtt5=False, packet_too_large=False)
    learner.carried()  # an ack came back: the count starts again
    assert learner.dropped(4096, mqtt5=False, packet_too_large=False) is None
    assert learner.limit(8192) == 4096


def test_over_mqtt5_only_packet_too_large_counts_and_never_below_1_kib():
    learner = ChunkSizeLearner()
    for _ in range(4):
        assert learner.dropped(8192, mqtt5=True, packet_too_large=False) is None
    learner.dropped(2048, mqtt5=True, packet_too_large=True)
    assert learner.dropped(2048, mqtt5=True, packet_too_large=True) == 1024
    learner.dropped(1024, mqtt5=True, packet_too_large=True)
    assert learner.dropped(1024, mqtt5=True, packet_too_large=True) is None
    assert learner.limit(8192) == 1024
