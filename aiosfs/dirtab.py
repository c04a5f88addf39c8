"""The tree of the protocol as data, and inode numbers that pack (agent, kind).

Every synthetic file is a row (name, kind, class, mode); lookup, readdir and
getattr derive from these tables. An inode number is `agent_id << 8 | kind`, with
agent id 0 for the global files; the files of tools/ carry the tool's index + 1
there instead. Agent ids and tool indexes are never reused, so neither are
inode numbers.
"""

from __future__ import annotations

import enum
import stat
from dataclasses import dataclass

import pyfuse3


class Kind(enum.IntEnum):
    ROOT = pyfuse3.ROOT_INODE
    README = 2
    KERNEL = 3
    K_STATUS = 4
    K_STATS = 5
    K_PS = 6
    K_MODELS = 7
    K_SCHEDULER = 8
    K_LOG = 9
    AGENTS = 10
    K_EVENTS = 11
    K_CTL = 12
    K_TRASH = 13
    TOOLS = 14
    TOOL = 15  # tools/NAME: the tool's index + 1 in the "agent id" bits
    TOOL_SCHEMA = 16  # tools/NAME.schema: likewise
    K_METRICS = 17
    AGENT = 32
    PROMPT = 33
    OUTPUT = 34
    CALL = 35
    STATUS = 36
    ERROR = 37
    CONTEXT = 38
    CONFIG = 39
    CTL = 40
    EVENTS = 41
    VERSIONS = 42
    RECALL = 43
    PERMISSIONS = 44


class Cls(enum.Enum):
    DIR = "dir"
    SNAPSHOT = "snapshot"
    STORED = "stored"
    SUBMIT = "submit"
    GROWING = "growing"
    RPC = "rpc"
    CTL = "ctl"
    EVENTS = "events"


@dataclass(frozen=True)
class Entry:
    name: str
    kind: Kind
    cls: Cls
    mode: int  # permission bits; the type bits come from `cls`

    @property
    def st_mode(self) -> int:
        return (stat.S_IFDIR if self.cls is Cls.DIR else stat.S_IFREG) | self.mode


ROOT_DIR = Entry("", Kind.ROOT, Cls.DIR, 0o755)
AGENTS_DIR = Entry("agents", Kind.AGENTS, Cls.DIR, 0o1777)

TABLES: dict[Kind, list[Entry]] = {
    Kind.ROOT: [
        Entry("README", Kind.README, Cls.SNAPSHOT, 0o444),
        Entry("kernel", Kind.KERNEL, Cls.DIR, 0o555),
        AGENTS_DIR,
        Entry("tools", Kind.TOOLS, Cls.DIR, 0o555),
    ],
    Kind.KERNEL: [
        Entry("status", Kind.K_STATUS, Cls.SNAPSHOT, 0o444),
        Entry("stats", Kind.K_STATS, Cls.SNAPSHOT, 0o444),
        Entry("metrics", Kind.K_METRICS, Cls.SNAPSHOT, 0o444),
        Entry("ps", Kind.K_PS, Cls.SNAPSHOT, 0o444),
        Entry("models", Kind.K_MODELS, Cls.SNAPSHOT, 0o444),
        Entry("scheduler", Kind.K_SCHEDULER, Cls.STORED, 0o644),
        Entry("log", Kind.K_LOG, Cls.SNAPSHOT, 0o400),
        Entry("events", Kind.K_EVENTS, Cls.EVENTS, 0o444),
        Entry("trash", Kind.K_TRASH, Cls.SNAPSHOT, 0o444),
        Entry("ctl", Kind.K_CTL, Cls.CTL, 0o222),
    ],
    Kind.AGENT: [
        Entry("prompt", Kind.PROMPT, Cls.SUBMIT, 0o620),
        Entry("output", Kind.OUTPUT, Cls.GROWING, 0o640),
        Entry("call", Kind.CALL, Cls.RPC, 0o660),
        Entry("status", Kind.STATUS, Cls.SNAPSHOT, 0o644),
        Entry("error", Kind.ERROR, Cls.SNAPSHOT, 0o640),
        Entry("context", Kind.CONTEXT, Cls.STORED, 0o640),
        Entry("config", Kind.CONFIG, Cls.STORED, 0o640),
        Entry("permissions", Kind.PERMISSIONS, Cls.STORED, 0o640),
        Entry("ctl", Kind.CTL, Cls.CTL, 0o620),  # the owner may read it (empty), so that copies of the agent can
        Entry("events", Kind.EVENTS, Cls.EVENTS, 0o640),
        Entry("versions", Kind.VERSIONS, Cls.SNAPSHOT, 0o640),
        Entry("recall", Kind.RECALL, Cls.RPC, 0o640),
    ],
}

BY_KIND: dict[Kind, Entry] = {e.kind: e for table in TABLES.values() for e in table}
BY_KIND[Kind.ROOT] = ROOT_DIR
BY_KIND[Kind.AGENT] = Entry("", Kind.AGENT, Cls.DIR, 0o755)
BY_KIND[Kind.TOOL] = Entry("", Kind.TOOL, Cls.RPC, 0o666)  # one per tool: named by the tool manager, not a table
BY_KIND[Kind.TOOL_SCHEMA] = Entry("", Kind.TOOL_SCHEMA, Cls.SNAPSHOT, 0o444)


MEMORY = "memory"  # the agent's memory/: a directory of the memory store, not a table row


def child(parent: Kind, name: str) -> Entry | None:
    for entry in TABLES.get(parent, []):
        if entry.name == name:
            return entry
    return None


def inode(agent_id: int, kind: Kind) -> int:
    return (agent_id << 8) | int(kind)


def agent_of(ino: int) -> int:
    return ino >> 8


def kind_of(ino: int) -> Kind:
    return Kind(ino & 0xFF)
