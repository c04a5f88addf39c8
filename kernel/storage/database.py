"""The storage manager: agents, their config and conversations, and the job journal,
in one SQLite database (WAL) through sqlite-utils.

Commits never run on the trio thread: the kernel hands them to the journal writer
(`writer.py`), and `atomic()` refuses to open a transaction on the trio thread.
Reads there use a connection of their own, which WAL lets read while the writer
commits.

Every multi-row change runs in one transaction. Schema changes are numbered
migrations applied at open, recorded in `PRAGMA user_version`.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils
import trio

MIGRATIONS = [
    # 1: agents, their conversations and the job journal.
    """
    CREATE TABLE agents (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: it is part of inode numbers
        name TEXT NOT NULL UNIQUE,
        uid INTEGER NOT NULL, gid INTEGER NOT NULL, mode INTEGER NOT NULL,
        file_modes TEXT NOT NULL DEFAULT '{}',  -- JSON {file name: mode} after chmod
        config TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL, changed REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent_id INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
        role TEXT NOT NULL, content TEXT NOT NULL
    );
    CREATE INDEX messages_agent ON messages(agent_id, id);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        agent_id INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
        uid INTEGER NOT NULL, source TEXT NOT NULL, state TEXT NOT NULL,
        user_message TEXT NOT NULL, output BLOB NOT NULL DEFAULT x'',
        errno INTEGER NOT NULL DEFAULT 0, message TEXT NOT NULL DEFAULT '',
        queued_at REAL NOT NULL, finished_at REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_agent_uid ON jobs(agent_id, uid, id);
    """,
    # 2: kernel-wide settings (the scheduling policy).
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 3: jobs survive restarts: the request as written, to parse again when the job is
    # requeued, and how many restarts it has been through.
    """
    ALTER TABLE jobs ADD COLUMN request TEXT;  -- NULL: journaled before this migration
    ALTER TABLE jobs ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: access control: the permissions policy and root's ceiling for it, the tokens
    # spent against the budget, and the trash (a removed agent keeps its row until purged).
    """
    ALTER TABLE agents ADD COLUMN permissions TEXT NOT NULL DEFAULT '';
    ALTER TABLE agents ADD COLUMN ceiling TEXT NOT NULL DEFAULT '';
    ALTER TABLE agents ADD COLUMN spent_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE agents ADD COLUMN trashed_at REAL;  -- NULL: a live agent
    ALTER TABLE agents ADD COLUMN trashed_name TEXT;
    """,
]


# finish_job's arguments: (job id, state, output, errno, message, finished at, (agent id, tokens spent) or None)
JobEnd = tuple[int, str, bytes, int, str, float, "tuple[int, int] | None"]


@dataclass
class AgentRow:
    id: int
    name: str
    uid: int
    gid: int
    mode: int
    file_modes: dict[str, int] = field(default_factory=dict)
    config: str = ""
    created: float = 0.0
    changed: float = 0.0
    permissions: str = ""  # the policy text as the kernel rendered it
    ceiling: str = ""  # root's limits for that policy
    spent_tokens: int = 0
    trashed_at: float | None = None
    trashed_name: str | None = None


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One `BEGIN IMMEDIATE … COMMIT`, rolled back on any exception; nested use joins
    the transaction already open."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migrate(db: sqlite_utils.Database, migrations: list[str]) -> None:
    """Apply the numbered migrations a database lacks, each in one transaction;
    the number applied is kept in `PRAGMA user_version`."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    for number, script in enumerate(migrations[version:], version + 1):
        with transaction(db.conn):
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={number}")


class Storage:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # acknowledged writes survive power loss
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        # reads on the trio thread: a connection of their own, so they never wait for a commit
        self.reader = sqlite_utils.Database(sqlite3.connect(self.path, isolation_level=None, check_same_thread=False))

    def _migrate(self) -> None:
        migrate(self.db, MIGRATIONS)

    def atomic(self) -> contextlib.AbstractContextManager[None]:
        """One transaction; never on the trio thread (it would hold every FUSE request up
        for an fsync): the kernel runs its writes on the journal writer."""
        if trio.lowlevel.in_trio_run():
            raise RuntimeError("a SQLite commit on the trio thread: hand it to the journal writer (kernel/storage/writer.py)")
        return transaction(self.db.conn)

    def _table(self, name: str) -> sqlite_utils.db.Table:
        return self.db.table(name)

    def close(self) -> None:
        self.reader.conn.close()
        self.db.conn.close()

    # -- agents ---------------------------------------------------------------
    def agents(self) -> list[AgentRow]:
        return [self._agent(row) for row in self.reader.table("agents").rows_where(order_by="id")]

    @staticmethod
    def _agent(row: dict[str, Any]) -> AgentRow:
        row = dict(row)
        row["file_modes"] = json.loads(row["file_modes"])
        return AgentRow(**row)

    def create_agent(self, name: str, uid: int, gid: int, mode: int) -> AgentRow:
        now = time.time()
        with self.atomic():
            table = self._table("agents")
            table.insert({"name": name, "uid": uid, "gid": gid, "mode": mode, "file_modes": "{}", "config": "", "created": now, "changed": now})
            agent_id = table.last_pk
        return self._agent(self._table("agents").get(int(agent_id or 0)))

    def update_agent(self, agent_id: int, **values: Any) -> None:
        if "file_modes" in values:
            values["file_modes"] = json.dumps(values["file_modes"])
        values["changed"] = time.time()
        with self.atomic():
            self._table("agents").update(agent_id, values)

    def set_spent(self, agent_id: int, tokens: int) -> None:
        """The tokens an agent spent against its budget (not a change of the agent: `changed` stays)."""
        with self.atomic():
            self.db.execute("UPDATE agents SET spent_tokens = ? WHERE id = ?", [tokens, agent_id])

    def trash_agent(self, agent_id: int, name: str, when: float) -> None:
        """Move an agent to the trash: its name is freed for a new agent."""
        with self.atomic():
            self._table("agents").update(agent_id, {"name": f".trash.{agent_id}", "trashed_name": name, "trashed_at": when, "changed": when})

    def restore_agent(self, agent_id: int, name: str) -> AgentRow:
        with self.atomic():
            self._table("agents").update(agent_id, {"name": name, "trashed_name": None, "trashed_at": None, "changed": time.time()})
        return self._agent(self._table("agents").get(agent_id))

    def delete_agent(self, agent_id: int) -> None:
        with self.atomic():
            self.db.execute("DELETE FROM messages WHERE agent_id = ?", [agent_id])
            self.db.execute("DELETE FROM jobs WHERE agent_id = ?", [agent_id])
            self.db.execute("DELETE FROM agents WHERE id = ?", [agent_id])

    # -- settings -------------------------------------------------------------
    def setting(self, key: str, default: str) -> str:
        row = self.reader.execute("SELECT value FROM settings WHERE key = ?", [key]).fetchone()
        return str(row[0]) if row else default

    def set_setting(self, key: str, value: str) -> None:
        with self.atomic():
            self.db.execute("INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", [key, value])

    # -- conversations ----------------------------------------------------------
    def messages(self, agent_id: int) -> list[dict[str, str]]:
        rows = self.reader.execute("SELECT role, content FROM messages WHERE agent_id = ? ORDER BY id", [agent_id])
        return [{"role": role, "content": content} for role, content in rows.fetchall()]

    def record_turn(self, agent_id: int, turn: list[dict[str, str]], end: JobEnd) -> None:
        """A finished prompt job: the turn it adds to its agent's conversation and its end,
        in one transaction (both or neither)."""
        with self.atomic():
            self.append_messages(agent_id, turn)
            self.finish_job(*end)

    def append_messages(self, agent_id: int, messages: list[dict[str, str]]) -> None:
        with self.atomic():
            self._table("messages").insert_all({"agent_id": agent_id, **m} for m in messages)

    def replace_messages(self, agent_id: int, messages: list[dict[str, str]]) -> None:
        with self.atomic():
            self.db.execute("DELETE FROM messages WHERE agent_id = ?", [agent_id])
            if messages:
                self._table("messages").insert_all({"agent_id": agent_id, **m} for m in messages)

    # -- the job journal ----------------------------------------------------------
    def journal_job(self, agent_id: int, uid: int, source: str, user_message: str, queued_at: float, request: str | None) -> int:
        """Journal a queued job; `request` is the text written to prompt/call (None: not known,
        so the job cannot be requeued after a restart)."""
        with self.atomic():
            table = self._table("jobs")
            table.insert(
                {
                    "agent_id": agent_id,
                    "uid": uid,
                    "source": source,
                    "state": "queued",
                    "user_message": user_message,
                    "request": request,
                    "queued_at": queued_at,
                }
            )
            return int(table.last_pk or 0)

    def finish_job(
        self, job_id: int, state: str, output: bytes, errno: int, message: str, finished_at: float, spent: tuple[int, int] | None = None
    ) -> None:
        """Journal a job's end and, when given, (agent id, tokens it spent so far), together."""
        with self.atomic():
            self._table("jobs").update(job_id, {"state": state, "output": output, "errno": errno, "message": message, "finished_at": finished_at})
            if spent is not None:
                self.set_spent(*spent)

    def latest_job(self, agent_id: int, uid: int) -> dict[str, Any] | None:
        rows = list(self.reader.table("jobs").rows_where("agent_id = ? AND uid = ?", [agent_id, uid], order_by="id DESC", limit=1))
        return rows[0] if rows else None

    def job_exists(self, agent_id: int, job_id: int) -> bool:
        return bool(self.reader.execute("SELECT 1 FROM jobs WHERE id = ? AND agent_id = ?", [job_id, agent_id]).fetchall())

    def unfinished_jobs(self) -> list[dict[str, Any]]:
        """Jobs a previous daemon left queued or running, oldest first."""
        return list(self.reader.table("jobs").rows_where("state IN ('queued', 'running')", order_by="id"))

    def requeue_job(self, job_id: int) -> None:
        """Queue a job again after a restart: its output starts over, its restarts count one more."""
        with self.atomic():
            self.db.execute(
                "UPDATE jobs SET state = 'queued', output = x'', errno = 0, message = '', finished_at = 0, restarts = restarts + 1 WHERE id = ?",
                [job_id],
            )
