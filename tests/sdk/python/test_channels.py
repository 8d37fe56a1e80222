"""Channels between SDK workers (spec §2.3, §7): refs travel inside invocation payloads, the
SDK turns them into live readers and writers, and 100 MiB of binary data with interleaved text
messages crosses intact (SHA-256 compared) in both directions; ``read_all`` gets everything."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading

from iii.helpers import create_channel

from conftest import call_when_registered

MIB = 1024 * 1024
TOTAL_MIB = int(os.environ.get("RINGCAST_CHANNEL_TEST_MIB", "100"))
TEXT_EVERY_MIB = 5
CALL_TIMEOUT_MS = 110_000


async def produce(writer) -> dict:
    """Writes TOTAL_MIB of random bytes (1 MiB writes; the SDK cuts them into 64 KiB frames)
    with a text message after every TEXT_EVERY_MIB, then closes. Returns what it sent."""
    digest = hashlib.sha256()
    texts = []
    for i in range(1, TOTAL_MIB + 1):
        chunk = os.urandom(MIB)
        digest.update(chunk)
        await writer.write(chunk)
        if i % TEXT_EVERY_MIB == 0:
            text = f'{{"type":"progress","mib":{i},"note":"déjà ✓"}}'
            texts.append(text)
            await writer.send_message_async(text)
    await writer.close_async()
    return {"sha256": digest.hexdigest(), "length": TOTAL_MIB * MIB, "texts": texts}


async def consume(reader) -> dict:
    """Reads a channel to its end: length and SHA-256 of the bytes, the text messages in order."""
    texts: list[str] = []
    reader.on_message(texts.append)
    digest = hashlib.sha256()
    length = 0
    async for chunk in reader:
        digest.update(chunk)
        length += len(chunk)
    return {"sha256": digest.hexdigest(), "length": length, "texts": texts}


def registered(caller, owner) -> None:
    """Waits until the functions ``owner`` registered so far are callable from ``caller``: the
    engine applies a connection's frames in order, so once a function registered after them
    answers, they are in place."""
    owner.register_function("chan::ready", lambda data: "ready")
    assert call_when_registered(caller, "chan::ready", {}) == "ready"


def call_in_thread(worker, function_id: str, payload: dict):
    """Starts a synchronous call on a thread; returns a function that joins it."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = worker.trigger(
                {"function_id": function_id, "payload": payload, "timeout_ms": CALL_TIMEOUT_MS}
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join():
        thread.join(CALL_TIMEOUT_MS / 1000 + 5)
        assert not thread.is_alive(), f"{function_id} did not answer"
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    return join


def test_channel_refs_have_one_id_and_key(make_worker):
    a = make_worker("a")
    ch = create_channel(a, 8)
    assert ch.writer_ref.direction == "write" and ch.reader_ref.direction == "read"
    assert ch.writer_ref.channel_id == ch.reader_ref.channel_id
    assert ch.writer_ref.access_key == ch.reader_ref.access_key


def test_a_writes_100_mib_and_texts_that_b_reads_from_a_ref_in_the_payload(make_worker):
    a = make_worker("a")
    b = make_worker("b")

    async def chan_consume(data):
        return await consume(data["input"])

    b.register_function("chan::consume", chan_consume)
    registered(a, b)
    ch = create_channel(a)
    wait = call_in_thread(a, "chan::consume", {"input": ch.reader_ref.model_dump()})
    sent = asyncio.run(produce(ch.writer))
    got = wait()
    assert got["length"] == sent["length"]
    assert got["sha256"] == sent["sha256"], "the bytes B read are the bytes A wrote"
    assert got["texts"] == sent["texts"], "every text message, in order"


def test_b_writes_100_mib_and_texts_that_a_reads_from_a_ref_in_the_payload(make_worker):
    a = make_worker("a")
    b = make_worker("b")

    async def chan_produce(data):
        return await produce(data["output"])

    b.register_function("chan::produce", chan_produce)
    registered(a, b)
    ch = create_channel(a)
    wait = call_in_thread(a, "chan::produce", {"output": ch.writer_ref.model_dump()})
    got = asyncio.run(consume(ch.reader))
    sent = wait()
    assert got["length"] == sent["length"]
    assert got["sha256"] == sent["sha256"], "the bytes A read are the bytes B wrote"
    assert got["texts"] == sent["texts"], "every text message, in order"


def test_read_all_gets_everything_the_writer_sent(make_worker):
    a = make_worker("a")
    b = make_worker("b")

    async def chan_read_all(data):
        everything = await data["input"].read_all()
        return {"sha256": hashlib.sha256(everything).hexdigest(), "length": len(everything)}

    b.register_function("chan::read_all", chan_read_all)
    registered(a, b)
    ch = create_channel(a)
    wait = call_in_thread(a, "chan::read_all", {"input": ch.reader_ref.model_dump()})

    async def write_all() -> dict:
        digest = hashlib.sha256()
        length = 0
        for i in range(40):
            chunk = os.urandom(100_000 + i * 777)
            digest.update(chunk)
            length += len(chunk)
            await ch.writer.write(chunk)
        await ch.writer.close_async()
        return {"sha256": digest.hexdigest(), "length": length}

    sent = asyncio.run(write_all())
    assert wait() == sent
