"""The demo under load, on loopback: 16 clients at once against `python app.py` with a queue of 8, each sending 4
images (two photos, a truncated JPEG, a PNG whose pixels are over the decode budget; two clients add a file over
the upload limit). Every request must be answered with captions or refused with a message, the server's memory
must stay bounded, and it must still caption afterwards. Prints requests/s and peak memory (docs/reliability.md)."""

import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import PHOTOS, serving_app


gradio_client = pytest.importorskip("gradio_client")

CLIENTS, QUEUE = 16, 8
PHOTO_A, PHOTO_B = sorted(PHOTOS.glob("*.jpg"))[:2]


def memory_mb(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS) and at its peak (VmHWM), in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def request_files(tmp_path: Path) -> dict[str, Path]:
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(PHOTO_A.read_bytes()[:3000])
    huge = tmp_path / "huge.png"  # 16-bit, 8000 × 7999 of one colour: ~100 kB on disk, ~1.8 GB to decode
    Image.new("I;16", (8000, 7999)).save(huge)
    too_big = tmp_path / "too-big.png"  # over --max_request_mb: Gradio refuses it while it arrives
    too_big.write_bytes(PHOTO_B.read_bytes() + bytes(3 * 2**20))
    return {"truncated": truncated, "huge": huge, "too_big": too_big}


def caption_request(url: str, model: str, files: list[Path]) -> dict:
    """One visitor: upload, wait in the queue, read the answer. -> {"answer": (gallery, text, status)} or
    {"refused": message}."""
    try:
        client = gradio_client.Client(url, verbose=False)
        job = client.submit(
            [gradio_client.handle_file(str(path)) for path in files],
            model,
            "Beam search",
            1,
            0.7,
            0.9,
            6,
            "",
            api_name="/caption",
        )
        return {"answer": job.result(timeout=300)}
    except Exception as error:  # noqa: BLE001 - what a visitor's client sees is what is checked
        return {"refused": f"{type(error).__name__}: {error}"}


@pytest.mark.slow
def test_the_demo_answers_every_request_of_a_burst_and_keeps_serving(make_model, processor, tmp_path):
    folder = tmp_path / "clipqwen-tiny"
    make_model().save_pretrained(folder)
    processor.save_pretrained(folder)
    odd = request_files(tmp_path)
    requests = [
        [PHOTO_A, PHOTO_B, odd["truncated"], odd["huge"]] + ([odd["too_big"]] if i in (3, 11) else [])
        for i in range(CLIENTS)
    ]

    with serving_app(
        tmp_path, str(folder), "--max_images", "4", "--max_request_mb", "2", "--max_queue", str(QUEUE)
    ) as (url, server):
        warm = caption_request(url, str(folder), [PHOTO_A])  # the model loads on the first request
        assert "answer" in warm, warm
        before = memory_mb(server.pid)

        results = [None] * CLIENTS

        def visit(i):
            results[i] = caption_request(url, str(folder), requests[i])

        threads = [threading.Thread(target=visit, args=(i,)) for i in range(CLIENTS)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        seconds = time.perf_counter() - start
        after = memory_mb(server.pid)
        again = caption_request(url, str(folder), [PHOTO_B])  # still up and captioning
        assert server.poll() is None

    answered = [r["answer"] for r in results if "answer" in r]
    refused = [r["refused"] for r in results if "refused" in r]
    print(
        f"\n{CLIENTS} clients x 4 images, queue {QUEUE}: {len(answered)} answered, {len(refused)} refused in "
        f"{seconds:.1f} s ({CLIENTS / seconds:.2f} requests/s, {len(answered) / seconds:.2f} answered/s); server "
        f"memory {before['VmRSS']:.0f} MB before, {after['VmRSS']:.0f} MB after, peak {after['VmHWM']:.0f} MB"
    )
    for message in refused:
        print("  refused:", message)
    assert all(results) and len(answered) + len(refused) == CLIENTS  # nobody left without an answer
    assert answered, "the queue took no request"
    for gallery, text, status in answered:  # the two photos captioned, each odd file named with its reason
        assert len(gallery) == len(text.splitlines()) == 2 and all(item["caption"] for item in gallery), status
        assert "truncated.jpg: it is truncated or corrupt" in status, status
        assert "huge.png: decoding it takes about" in status, status
    for message in refused:  # a sentence naming why: the upload limit or the full queue
        assert "queue is full" in message.lower() or "file size" in message.lower(), message
    assert "answer" in again and len(again["answer"][0]) == 1, again
    # the 1.8 GB image is never decoded, and 16 requests' uploads and photos never pile up
    assert after["VmHWM"] - before["VmRSS"] < 1024, (before, after)
