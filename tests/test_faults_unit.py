"""Fault handling without a launcher: shards that fail to open or read are retried, then skipped and
counted."""

import errno
import io
import os
import tarfile
from collections import Counter

from webdataset.tariterators import gopen as wds_gopen  # the module url_opener calls

from mogan_ds.data.shard_build import write_tar_atomic
from mogan_ds.data.streaming import Slot, resumable_samples, shard_samples


def write_shard(path, n, tag):
    samples = [{"__key__": f"{tag}{j:03d}", "json": b"{}", "txt": f"{tag} {j}".encode() * 9000} for j in range(n)]
    write_tar_atomic(str(path), samples)
    return str(path)


class Flaky:
    """webdataset's gopen for one url: fails as scripted ('open' or 'read'), then opens normally."""

    def __init__(self, url, script, code=errno.EIO):
        self.url, self.script, self.code, self.opens = url, list(script), code, 0
        self.real = wds_gopen.gopen

    def __call__(self, url, *args, **kwargs):
        if url != self.url:
            return self.real(url, *args, **kwargs)
        self.opens += 1
        what = self.script.pop(0) if self.script else None
        if what == "open":
            raise OSError(self.code, os.strerror(self.code), url)
        stream = self.real(url, *args, **kwargs)
        if what == "read":  # fails in the middle of the shard, after a sample's first member was read
            data = stream.read()
            stream.close()
            code = self.code
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                cut = next(m.offset_data for m in tar.getmembers() if m.name.endswith("005.txt")) + 30000

            class Broken(io.RawIOBase):
                pos = 0

                def readable(self):
                    return True

                def readinto(self, b):
                    if self.pos >= cut:
                        raise OSError(code, os.strerror(code))
                    n = min(len(b), cut - self.pos)
                    b[:n] = data[self.pos : self.pos + n]
                    self.pos += n
                    return n

            return io.BufferedReader(Broken())
        return stream


def test_a_shard_that_fails_to_open_and_then_mid_read_is_reread_once_whole(tmp_path, monkeypatch):
    url = write_shard(tmp_path / "a.tar", 10, "a")
    flaky = Flaky(url, ["open", "read"])
    monkeypatch.setattr(wds_gopen, "gopen", flaky)
    stats = Counter()
    got = list(shard_samples(url, 0, stats, retries=3, wait=0.01))
    assert [j for j, _ in got] == list(range(10))  # every sample once, in order
    assert [s["__key__"] for _, s in got] == [f"a{j:03d}" for j in range(10)]
    # none cut short by the broken read: the sample it broke in is read again, whole
    assert all(s.get("txt") == f"a {j}".encode() * 9000 and s.get("json") == b"{}" for j, s in got)
    assert flaky.opens == 3 and stats["shard_retries"] == 2 and stats["shard_errors"] == 0
    # resuming inside the shard (start=4) re-reads from there, retries included
    flaky = Flaky(url, ["read"])
    monkeypatch.setattr(wds_gopen, "gopen", flaky)
    assert [j for j, _ in shard_samples(url, 4, Counter(), retries=1, wait=0.01)] == list(range(4, 10))


def test_a_vanished_shard_is_retried_then_skipped_and_counted(tmp_path, caplog):
    a, b = write_shard(tmp_path / "a.tar", 4, "a"), write_shard(tmp_path / "b.tar", 4, "b")
    stats = Counter()
    stream = resumable_samples(
        Slot([a, b], 1, 0, [0, 0]), (1, 0, 0, 7), [0, 0, 0, 0], 2, stats, retries=2, retry_wait=0.01
    )
    first = [next(stream)["__key__"] for _ in range(2)]
    os.remove(a)  # gone mid-run (a network filesystem's hiccup that did not heal)
    caplog.set_level("WARNING", logger="mogan_ds.data")
    later = [next(stream)["__key__"] for _ in range(12)]
    assert all(k.startswith("b") for k in later[-8:])  # the stream goes on with the shard it can read
    assert stats["shard_errors"] >= 1 and stats["shard_retries"] == 2 * stats["shard_errors"]
    assert "a.tar" in caplog.text and "retry 2 of 2" in caplog.text and "skipping" in caplog.text
    assert first  # (read before the deletion)


def test_corrupt_tar_content_is_not_retried(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is no tar" * 100)
    stats = Counter()
    assert list(shard_samples(str(bad), 0, stats, retries=3, wait=0.01)) == []
    assert stats["shard_retries"] == 0 and stats["shard_errors"] == 1
