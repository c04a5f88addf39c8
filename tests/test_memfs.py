"""The memory store on its own: versions, rollback, recall, quota, crash rules, cache."""

from __future__ import annotations

import datetime as dt
import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest
from mounting import wait_for

from kernel import params
from kernel.errors import KernelError
from kernel.memory.store import RENAME_EXCHANGE, MemoryStore, split_passages
from kernel.types import Caller

AGENT = 7


@pytest.fixture
def store(tmp_path):
    made = MemoryStore(tmp_path / "memory.db", quota=1_000_000)
    yield made
    made.close()


def refused(code: int, fn, *args, **kwargs) -> KernelError:
    with pytest.raises(KernelError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value}"
    return info.value


def save(store: MemoryStore, ino: int, data: bytes) -> None:
    """open(O_TRUNC) + write + close, as `echo data > file` does."""
    store.open(ino, truncate=True)
    store.write(ino, 0, data)
    store.flush(ino)
    store.release(ino)


def new_file(store: MemoryStore, name: bytes = b"notes.md") -> int:
    root = store.root(AGENT, 1000, 1000)
    return store.create(root, name, 0o644, 1000, 1000).ino


def test_each_closed_session_is_one_version_and_rollback_adds_one(store):
    ino = new_file(store)
    for text in (b"one\n", b"two\n", b"three\n"):
        save(store, ino, text)
    assert [(v.path, v.n, v.size) for v in store.versions(AGENT)] == [("notes.md", 1, 4), ("notes.md", 2, 4), ("notes.md", 3, 6)]
    assert store.rollback(AGENT, "notes.md", "1") == 1
    assert store.read(ino, 0, 100) == b"one\n"
    assert [v.n for v in store.versions(AGENT)] == [1, 2, 3, 4]
    assert store.rollback(AGENT, "notes.md", "") == 3  # the one before the current
    assert store.read(ino, 0, 100) == b"three\n"


def test_flush_commits_without_a_version_until_the_last_close(store):
    ino = new_file(store)
    store.open(ino, truncate=False)
    store.write(ino, 0, b"draft")
    store.flush(ino)  # bash's dup2 close: durable, but the session goes on
    store.write(ino, 5, b" final")
    store.flush(ino)
    assert store.versions(AGENT) == []
    store.release(ino)
    assert [(v.n, v.size) for v in store.versions(AGENT)] == [(1, 11)]


def test_versions_are_bounded_and_unchanged_content_adds_none(store, monkeypatch):
    monkeypatch.setattr(params, "MEMORY_VERSIONS", 3)
    ino = new_file(store)
    for i in range(6):
        save(store, ino, f"v{i}".encode())
    save(store, ino, b"v5")  # the same content again
    assert [v.n for v in store.versions(AGENT)] == [4, 5, 6]
    refused(errno.ENOENT, store.rollback, AGENT, "notes.md", "1")


def test_rollback_by_time_and_bad_requests(store):
    ino = new_file(store)
    save(store, ino, b"old")
    before_second = dt.datetime.now().isoformat()
    save(store, ino, b"new")
    assert store.rollback(AGENT, "notes.md", "@" + before_second) == 1
    assert store.read(ino, 0, 10) == b"old"
    refused(errno.EINVAL, store.rollback, AGENT, "notes.md", "@yesterday")
    refused(errno.EINVAL, store.rollback, AGENT, "notes.md", "x")
    refused(errno.ENOENT, store.rollback, AGENT, "nothing.md", "1")
    refused(errno.ENOENT, store.rollback, AGENT, "../../etc/passwd", "1")  # `..` stops at memory/
    store.open(ino, truncate=False)
    store.write(ino, 0, b"unsaved")
    refused(errno.EBUSY, store.rollback, AGENT, "notes.md", "1")
    assert store.read(ino, 0, 10) == b"unsaved"  # the overlay is untouched


def test_paths_here_never_follow_symlinks(store):
    root = store.root(AGENT, 1000, 1000)
    store.mkdir(root, b"real", 0o755, 1000, 1000)
    store.symlink(root, b"alias", b"real", 1000, 1000)
    inner = store.lookup(root, b"real").ino
    ino = store.create(inner, b"f", 0o644, 1000, 1000).ino
    save(store, ino, b"x")
    assert store.walk(AGENT, "real/f") == ino
    refused(errno.ELOOP, store.walk, AGENT, "alias/f")


def test_quota_refuses_the_whole_write_and_frees_on_unlink(store):
    store.quota = 10_000
    root = store.root(AGENT, 1000, 1000)
    ino = store.create(root, b"a", 0o644, 1000, 1000).ino
    save(store, ino, b"x" * 6000)
    store.open(ino, truncate=False)
    refused(errno.EDQUOT, store.write, ino, 6000, b"y" * 5000)
    assert store.getattr(ino).size == 6000 and store.read(ino, 5990, 100) == b"x" * 10
    refused(errno.EDQUOT, store.setattr, ino, size=20_000, commit=False)
    store.write(ino, 6000, b"y" * 4000)  # exactly up to the quota
    store.release(ino)
    assert store.usage(AGENT) == 10_000
    other = store.create(root, b"b", 0o644, 1000, 1000).ino
    store.open(other, truncate=False)
    refused(errno.EDQUOT, store.write, other, 0, b"z")
    store.release(other)
    store.unlink(root, b"a")
    assert store.usage(AGENT) == 0
    save(store, other, b"z" * 9000)


def test_uncommitted_writes_are_lost_in_a_crash_committed_ones_are_not(tmp_path):
    first = MemoryStore(tmp_path / "m.db")
    root = first.root(AGENT, 0, 0)
    ino = first.create(root, b"f", 0o644, 0, 0).ino
    save(first, ino, b"kept")
    first.open(ino, truncate=True)  # `>` truncation is part of the overlay
    first.write(ino, 0, b"lost in the crash")
    first.db.conn.close()  # the daemon dies: no flush, no release
    again = MemoryStore(tmp_path / "m.db")
    assert again.read(ino, 0, 100) == b"kept"
    again.close()


def test_a_file_unlinked_while_open_lives_until_closed_and_is_collected_after_a_crash(tmp_path):
    store = MemoryStore(tmp_path / "m.db")
    root = store.root(AGENT, 0, 0)
    ino = store.create(root, b"tmp", 0o644, 0, 0).ino
    store.open(ino, truncate=False)
    store.write(ino, 0, b"scratch")
    store.unlink(root, b"tmp")
    assert store.read(ino, 0, 10) == b"scratch"
    store.flush(ino)
    store.db.conn.close()  # dies with the file open
    again = MemoryStore(tmp_path / "m.db")
    refused(errno.ENOENT, again.getattr, ino)
    assert again.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 0
    again.close()


def test_sparse_writes_truncate_and_chunk_boundaries(store):
    ino = new_file(store)
    chunk = params.MEMORY_CHUNK_BYTES
    store.open(ino, truncate=False)
    store.write(ino, chunk - 2, b"abcd")  # straddles two chunks
    store.write(ino, 3 * chunk + 5, b"z")
    store.flush(ino)
    assert store.getattr(ino).size == 3 * chunk + 6
    assert store.read(ino, 0, 4) == b"\0" * 4
    assert store.read(ino, chunk - 2, 4) == b"abcd"
    store.setattr(ino, size=chunk, commit=False)  # ftruncate: cuts into the overlay
    store.write(ino, 2 * chunk, b"q")  # grows again: the cut part must read as zeros
    store.flush(ino)
    store.release(ino)
    data = store.read(ino, 0, 4 * chunk)
    assert len(data) == 2 * chunk + 1 and data[chunk - 2 : chunk] == b"ab" and data[chunk:-1] == bytes(chunk) and data[-1:] == b"q"


def test_rename_rules(store):
    root = store.root(AGENT, 0, 0)
    a = store.mkdir(root, b"a", 0o755, 0, 0).ino
    b = store.mkdir(a, b"b", 0o755, 0, 0).ino
    store.create(root, b"f", 0o644, 0, 0)
    refused(errno.EINVAL, store.rename, root, b"a", b, b"a2")
    refused(errno.ENOTDIR, store.rename, root, b"a", root, b"f")
    refused(errno.EISDIR, store.rename, root, b"f", root, b"a")
    store.mkdir(root, b"empty", 0o755, 0, 0)
    store.rename(a, b"b", root, b"empty")  # a directory over an empty one, across parents
    assert store.getattr(a).nlink == 2 and store.getattr(root).nlink == 4
    assert store.lookup(root, b"empty").ino == b
    refused(errno.ENOENT, store.rename, root, b"f", a, b"missing", RENAME_EXCHANGE)
    store.create(a, b"g", 0o600, 0, 0)
    store.rename(root, b"f", a, b"g", RENAME_EXCHANGE)
    assert stat.S_IMODE(store.lookup(root, b"f").mode) == 0o600 and stat.S_IMODE(store.lookup(a, b"g").mode) == 0o644


def test_rename_and_link_never_cross_agents(store):
    mine, theirs = store.root(AGENT, 0, 0), store.root(AGENT + 1, 0, 0)
    f = store.create(mine, b"f", 0o644, 0, 0).ino
    refused(errno.EXDEV, store.rename, mine, b"f", theirs, b"f")
    refused(errno.EXDEV, store.link, f, theirs, b"f")


def test_setgid_directories_pass_their_group_on(store):
    root = store.root(AGENT, 0, 0)
    shared = store.mkdir(root, b"shared", 0o2775, 0, 50).ino
    assert store.create(shared, b"f", 0o644, 1000, 1000).gid == 50
    sub = store.mkdir(shared, b"sub", 0o755, 1000, 1000)
    assert sub.gid == 50 and sub.mode & stat.S_ISGID


def test_names_are_checked(store):
    root = store.root(AGENT, 0, 0)
    refused(errno.ENAMETOOLONG, store.create, root, b"x" * 256, 0o644, 0, 0)
    refused(errno.EINVAL, store.mkdir, root, b"a/b", 0o755, 0, 0)
    refused(errno.EINVAL, store.create, root, b"dir", stat.S_IFDIR | 0o644, 0, 0)  # mkdir makes directories
    dev = store.create(root, b"dev", stat.S_IFCHR | 0o644, 0, 0, rdev=os.makedev(1, 3))
    assert stat.S_ISCHR(dev.mode) and dev.rdev == os.makedev(1, 3)  # kept with its number, as tmpfs does
    store.create(root, b"x" * 255, 0o644, 0, 0)


def test_recall_ranks_the_agents_own_passages(store):
    root = store.root(AGENT, 0, 0)
    notes = store.create(root, b"notes.md", 0o644, 0, 0).ino
    save(store, notes, b"Shopping list: apples, bread.\n\nThe llama is a camelid from the Andes.\n\nMeeting on Friday.\n")
    other = store.create(store.root(AGENT + 1, 0, 0), b"x.md", 0o644, 0, 0).ino
    save(store, other, b"llama llama llama andes")
    found = store.search(AGENT, "Where do llamas and the llama live? Andes?", 3)
    assert [(p.path, p.line) for p in found] == [("notes.md", 3)]
    assert "camelid" in found[0].text
    assert store.search(AGENT, '"; DROP TABLE passages; --', 3) == []  # query words only, quoted
    save(store, notes, b"now about goats")
    assert store.search(AGENT, "llama", 3) == []  # re-indexed at commit


def test_split_passages_keeps_paragraphs_and_line_numbers(monkeypatch):
    monkeypatch.setattr(params, "MEMORY_PASSAGE_CHARS", 20)
    text = "title\n\n\nfirst paragraph\nstill first\n\n" + "word " * 10
    parts = split_passages(text)
    assert parts[0] == (1, "title")
    assert parts[1:3] == [(4, "first paragraph"), (5, "still first")]  # cut at whitespace
    assert all(len(p) <= 20 for _, p in parts)
    assert " ".join(p for _, p in parts[3:]).split() == ["word"] * 10 and parts[3][0] == 7


def test_hot_chunks_are_cached_with_lru_eviction(tmp_path):
    store = MemoryStore(tmp_path / "m.db", cache_bytes=2 * params.MEMORY_CHUNK_BYTES)
    root = store.root(AGENT, 0, 0)
    inos = [store.create(root, f"f{i}".encode(), 0o644, 0, 0).ino for i in range(3)]
    for ino in inos:
        save(store, ino, bytes([65 + ino % 26]) * params.MEMORY_CHUNK_BYTES)
    stats = store.statistics()
    assert stats["memory_cache_evictions"] >= 1 and stats["memory_cache_bytes"] <= 2 * params.MEMORY_CHUNK_BYTES
    hits = stats["memory_cache_hits"]
    store.read(inos[-1], 0, 10)
    assert store.statistics()["memory_cache_hits"] == hits + 1
    misses = store.statistics()["memory_cache_misses"]
    store.read(inos[0], 0, 10)  # evicted: read from SQLite
    assert store.statistics()["memory_cache_misses"] == misses + 1
    store.close()


def test_the_inode_limit_counts_what_an_agent_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(params, "MEMORY_MAX_INODES", 3)
    store = MemoryStore(tmp_path / "m.db")
    root = store.root(AGENT, 0, 0)  # memory/ itself is one
    store.create(root, b"a", 0o644, 0, 0)
    store.mkdir(root, b"d", 0o755, 0, 0)
    refused(errno.ENOSPC, store.create, root, b"b", 0o644, 0, 0)
    store.unlink(root, b"a")
    store.create(root, b"b", 0o644, 0, 0)
    store.close()
    again = MemoryStore(tmp_path / "m.db")  # the count is rebuilt at open
    refused(errno.ENOSPC, again.symlink, again.root(AGENT, 0, 0), b"s", b"b", 0, 0)
    other = again.root(AGENT + 1, 0, 0)  # another agent has its own count
    again.create(other, b"x", 0o644, 0, 0)
    again.close()


def test_set_id_bits_after_a_users_truncate_or_chown(store):
    """open(O_TRUNC) and chown(-1, -1), which names nothing to change, clear the set-id bits as a
    write does; set-group-id stays only without group-execute and for a member of the file's
    group, a supplementary one included (looked up through the caller's pid)."""
    ino = new_file(store)
    holder = subprocess.Popen(["setpriv", "--groups", "4242", "sleep", "60"])  # a process in supplementary group 4242
    try:
        wait_for(lambda: "\t4242" in Path(f"/proc/{holder.pid}/status").read_text(), timeout=10)
        me = Caller(1000, 1000, holder.pid)
        store.setattr(ino, mode=0o6744, gid=4242)
        store.open(ino, truncate=True, writer=me)
        store.release(ino)
        assert stat.S_IMODE(store.getattr(ino).mode) == 0o2744
    finally:
        holder.kill()
        holder.wait()
    store.setattr(ino, mode=0o6754)
    before = store.getattr(ino).ctime_ns
    assert stat.S_IMODE(store.setattr(ino, chown=True).mode) == 0o754  # root: set-group-id goes with group-execute
    assert store.getattr(ino).ctime_ns > before
    store.setattr(ino, mode=0o2744, gid=54321)  # a group the caller is not in
    assert stat.S_IMODE(store.setattr(ino, chown=True, writer=me).mode) == 0o744


def test_times_beyond_64_bit_nanoseconds_are_clamped(store):
    ino = new_file(store)
    attr = store.setattr(ino, atime_ns=-(2**70), mtime_ns=2**70)
    assert (attr.atime_ns, attr.mtime_ns) == (-(2**63), 2**63 - 1)
