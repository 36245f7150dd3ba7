"""Atomic file writes: concurrent writers of one file never clash, and readers never see half a file."""

from __future__ import annotations

import json
import threading

from clt.files import atomic_path, atomic_write_text


def test_concurrent_writers_and_a_reader_of_one_file(tmp_path):
    path = tmp_path / "manifest.json"
    atomic_write_text(json.dumps({"writer": -1, "pad": "x" * 4096}), path)
    errors: list[BaseException] = []
    done = threading.Event()

    def write(writer: int) -> None:
        try:
            for _ in range(300):
                atomic_write_text(json.dumps({"writer": writer, "pad": "x" * 4096}), path)
        except BaseException as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    def read() -> None:
        while not done.is_set():
            try:
                assert json.loads(path.read_text())["writer"] in (-1, 0, 1)
            except BaseException as err:  # noqa: BLE001
                errors.append(err)
                return

    threads = [threading.Thread(target=write, args=(w,)) for w in (0, 1)]
    reader = threading.Thread(target=read)
    for t in (*threads, reader):
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    assert not errors, errors[:3]
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temporary file left behind


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text("old", path)
    try:
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
