"""The SQLite storage manager: agents, conversations and the job journal."""

import errno
import sqlite3

import pytest

from kernel.storage.database import MIGRATIONS, Storage


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "aiosfs.db"


@pytest.fixture
def storage(db_path):
    store = Storage(db_path)
    yield store
    store.close()


def test_migrations_set_user_version(db_path):
    store = Storage(db_path)
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert {"agents", "messages", "jobs"} <= set(store.db.table_names())
        assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        store.close()
    again = Storage(db_path)  # a second open must not run the migrations again
    try:
        assert again.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        again.close()


def test_create_and_list_agents(storage):
    a = storage.create_agent("alice", 1000, 100, 0o750)
    b = storage.create_agent("bob", 1001, 101, 0o700)
    assert (a.name, a.uid, a.gid, a.mode, a.file_modes, a.config) == ("alice", 1000, 100, 0o750, {}, "")
    assert a.created > 0 and a.changed == a.created
    assert b.id > a.id
    assert [row.name for row in storage.agents()] == ["alice", "bob"]


def test_update_agent(storage):
    row = storage.create_agent("alice", 1000, 100, 0o755)
    storage.update_agent(row.id, mode=0o700, uid=5, file_modes={"prompt": 0o600}, config="max_tokens=3\n")
    (updated,) = storage.agents()
    assert updated.mode == 0o700
    assert updated.uid == 5
    assert updated.file_modes == {"prompt": 0o600}
    assert updated.config == "max_tokens=3\n"
    assert updated.changed >= row.changed


def test_delete_agent_removes_its_messages_and_jobs(storage):
    keep = storage.create_agent("keep", 1, 1, 0o755)
    gone = storage.create_agent("gone", 1, 1, 0o755)
    for agent_id in (keep.id, gone.id):
        storage.append_messages(agent_id, [{"role": "user", "content": "hi"}])
        storage.journal_job(agent_id, 1, "prompt", "hi", 1.0, "hi")
    storage.delete_agent(gone.id)
    assert [row.name for row in storage.agents()] == ["keep"]
    assert storage.messages(gone.id) == []
    assert storage.latest_job(gone.id, 1) is None
    assert storage.messages(keep.id) == [{"role": "user", "content": "hi"}]
    assert storage.latest_job(keep.id, 1) is not None


def test_agent_ids_are_never_reused(storage):
    storage.create_agent("a", 1, 1, 0o755)
    newest = storage.create_agent("b", 1, 1, 0o755)
    storage.delete_agent(newest.id)
    again = storage.create_agent("b", 1, 1, 0o755)
    assert again.id > newest.id


def test_agent_ids_are_never_reused_across_reopen(db_path):
    store = Storage(db_path)
    newest = store.create_agent("a", 1, 1, 0o755)
    store.delete_agent(newest.id)
    store.close()
    store = Storage(db_path)
    try:
        assert store.create_agent("a", 1, 1, 0o755).id > newest.id
    finally:
        store.close()


def test_messages_append_and_replace(storage):
    a = storage.create_agent("a", 1, 1, 0o755)
    b = storage.create_agent("b", 1, 1, 0o755)
    storage.append_messages(a.id, [{"role": "system", "content": "be nice"}, {"role": "user", "content": "héllo\nthere"}])
    storage.append_messages(b.id, [{"role": "user", "content": "other"}])
    storage.append_messages(a.id, [{"role": "assistant", "content": "hi"}])
    assert storage.messages(a.id) == [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "héllo\nthere"},
        {"role": "assistant", "content": "hi"},
    ]
    storage.replace_messages(a.id, [{"role": "user", "content": "fresh"}])
    assert storage.messages(a.id) == [{"role": "user", "content": "fresh"}]
    storage.replace_messages(a.id, [])
    assert storage.messages(a.id) == []
    assert storage.messages(b.id) == [{"role": "user", "content": "other"}]


def test_atomic_rolls_back_on_error(storage):
    a = storage.create_agent("a", 1, 1, 0o755)
    storage.append_messages(a.id, [{"role": "user", "content": "kept"}])
    with pytest.raises(RuntimeError), storage.atomic():
        storage.replace_messages(a.id, [{"role": "user", "content": "lost"}])
        raise RuntimeError("boom")
    assert storage.messages(a.id) == [{"role": "user", "content": "kept"}]


def test_job_journal(storage):
    agent = storage.create_agent("a", 1, 1, 0o755)
    first = storage.journal_job(agent.id, 1000, "prompt", "one", 10.0, "one\n")
    second = storage.journal_job(agent.id, 1000, "call", "two", 11.0, '{"prompt": "two"}')
    other_uid = storage.journal_job(agent.id, 2000, "prompt", "three", 12.0, "three")
    assert first < second < other_uid

    row = storage.latest_job(agent.id, 1000)
    assert row is not None
    assert (row["id"], row["source"], row["state"], row["user_message"], row["request"], row["output"], row["queued_at"], row["restarts"]) == (
        second,
        "call",
        "queued",
        "two",
        '{"prompt": "two"}',
        b"",
        11.0,
        0,
    )
    assert storage.latest_job(agent.id, 2000)["id"] == other_uid
    assert storage.latest_job(agent.id, 3000) is None

    storage.finish_job(second, "done", "ünïcode ✓".encode(), 0, "", 20.0)
    row = storage.latest_job(agent.id, 1000)
    assert (row["state"], row["output"], row["errno"], row["finished_at"]) == ("done", "ünïcode ✓".encode(), 0, 20.0)

    storage.finish_job(first, "cancelled", b"part", errno.ECANCELED, "cancelled", 21.0)
    running = storage.journal_job(agent.id, 3000, "prompt", "four", 13.0, "four")
    storage.db.execute("UPDATE jobs SET state = 'running' WHERE id = ?", [running])
    # `other_uid` (queued) and `running` are still unfinished now
    assert [row["id"] for row in storage.unfinished_jobs()] == [other_uid, running]


def test_requeue_job_starts_it_over(storage):
    agent = storage.create_agent("a", 1, 1, 0o755)
    job = storage.journal_job(agent.id, 1000, "prompt", "q", 10.0, "q")
    storage.finish_job(job, "running", b"partial", errno.EIO, "stale", 20.0)  # every column requeue_job resets
    storage.requeue_job(job)
    storage.requeue_job(job)
    row = storage.latest_job(agent.id, 1000)
    assert (row["id"], row["state"], row["output"], row["errno"], row["message"], row["finished_at"]) == (job, "queued", b"", 0, "", 0)
    assert (row["restarts"], row["request"], row["queued_at"]) == (2, "q", 10.0)


def test_migration_3_keeps_older_jobs(db_path):
    """A database of schema 2 gets the request and restart columns; its rows have no request."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    for script in MIGRATIONS[:2]:
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("PRAGMA user_version=2")
    conn.execute("INSERT INTO agents(name, uid, gid, mode, created, changed) VALUES ('a', 1, 1, 493, 0, 0)")
    conn.execute("INSERT INTO jobs(agent_id, uid, source, state, user_message, queued_at) VALUES (1, 1, 'prompt', 'queued', 'old', 5.0)")
    conn.close()
    store = Storage(db_path)
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS) >= 3
        (row,) = store.unfinished_jobs()
        assert (row["user_message"], row["request"], row["restarts"]) == ("old", None, 0)
    finally:
        store.close()


def test_data_survives_reopen(db_path):
    store = Storage(db_path)
    row = store.create_agent("alice", 1000, 100, 0o750)
    store.update_agent(row.id, config="seed=3\n", file_modes={"ctl": 0o600})
    store.append_messages(row.id, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    job = store.journal_job(row.id, 1000, "prompt", "q", 1.0, "q")
    store.finish_job(job, "done", b"a", 0, "", 2.0)
    store.close()

    store = Storage(db_path)
    try:
        (again,) = store.agents()
        assert (again.id, again.name, again.uid, again.gid, again.mode) == (row.id, "alice", 1000, 100, 0o750)
        assert again.config == "seed=3\n"
        assert again.file_modes == {"ctl": 0o600}
        assert store.messages(row.id) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        latest = store.latest_job(row.id, 1000)
        assert (latest["id"], latest["state"], latest["output"]) == (job, "done", b"a")
    finally:
        store.close()


def test_the_writer_commits_a_burst_of_writes_together_and_a_failed_one_alone(storage):
    import threading

    import trio

    from kernel.storage.writer import Writer

    commits: list[str] = []
    storage.db.conn.set_trace_callback(lambda sql: commits.append(sql) if sql.strip().upper() == "COMMIT" else None)
    agent = storage.create_agent("a", 1, 1, 0o755)
    commits.clear()
    gate = threading.Event()
    writer = Writer(conn=storage.db.conn)
    try:
        writer.post(gate.wait, 10)  # holds the writer while the burst queues up
        for i in range(50):
            writer.post(storage.journal_job, agent.id, 1000, "prompt", f"q{i}", float(i), f"q{i}")
        writer.post(storage.journal_job, -1, 1000, "prompt", "no such agent", 0.0, "x")  # a foreign key fails: this write only
        gate.set()

        async def barrier() -> None:
            await writer.call(lambda: None)

        trio.run(barrier)
    finally:
        writer.close()
        storage.db.conn.set_trace_callback(None)
    rows = list(storage.reader.table("jobs").rows_where("agent_id = ?", [agent.id]))
    assert [row["user_message"] for row in rows] == [f"q{i}" for i in range(50)]
    assert len(commits) <= 3, f"{len(commits)} commits for 52 writes: not grouped"
