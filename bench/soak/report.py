"""The soak's report: the figures (JSON with --json) and the criteria that make its exit
status, each with the figure that decided it, so a failed soak says what failed."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

UNMOUNT_LIMIT = 15.0  # seconds: what `aiosfs unmount` promises, even with a stopped engine


@dataclass
class Report:
    command: str
    backend: str
    agents: int
    duration_s: float  # asked
    elapsed_s: float = 0.0  # the clients' run, from their start to the last one's end
    engine_deadline_s: float = 0.0  # given to the mount
    deadline_shown_s: float | None = None  # the largest the mount showed in kernel/status
    deadlines: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the soak, deadline) at each change seen
    stuck_limit_s: float = 0.0  # the deadline + 5 s
    jobs: dict[str, int] = field(default_factory=dict)  # done, eio, failed
    failures: list[str] = field(default_factory=list)  # jobs failed otherwise, memory operations failed, clients that died
    stuck: list[dict[str, Any]] = field(default_factory=list)
    longest_wait_s: float = 0.0  # without progress, over every job and memory operation
    mean_job_s: float = 0.0
    memory_acknowledged: dict[str, int] = field(default_factory=dict)  # by operation
    memory_unverified: int = 0  # names a failed operation touched
    lost_live: list[str] = field(default_factory=list)
    lost_remount: list[str] = field(default_factory=list)
    remount: str = ""  # '' when the remount and its unmount went well, else what went wrong
    faults: list[dict[str, Any]] = field(default_factory=list)
    faults_by_kind: dict[str, int] = field(default_factory=dict)
    faults_asked: int | None = None
    fault_problems: list[str] = field(default_factory=list)
    restarts: int = 0  # kernel/status at the end
    hangs: int | None = None  # kernel/status at the end, when it shows them
    audit_engine_events: dict[str, int] = field(default_factory=dict)  # by "what"
    daemon_pid: int = 0
    daemon_pid_end: int | None = None
    engine_processes: dict[str, str] = field(default_factory=dict)  # the daemon's descendants before the unmount
    unmount_finished: bool = False
    unmount_s: float = 0.0
    unmount_error: str = ""
    left_behind: list[int] = field(default_factory=list)  # of those, alive after the unmount
    log_troubles: list[str] = field(default_factory=list)  # aiosfs.log: errors and tracebacks besides the faults' reports
    criteria: list[dict[str, Any]] = field(default_factory=list)
    ok: bool = False

    def judge(self) -> None:
        """Fill `criteria` and `ok`."""
        faults_ok = (
            bool(self.faults)
            and all(f["recovered_after"] is not None for f in self.faults)
            and not self.fault_problems
            and (self.faults_asked is None or len(self.faults) == self.faults_asked)
            and self.restarts >= len(self.faults)
        )
        recovered = [f["recovered_after"] for f in self.faults if f["recovered_after"] is not None]
        lost = len(self.lost_live) + len(self.lost_remount)
        checks = [
            ("no stuck job", not self.stuck, f"{len(self.stuck)} stuck; longest wait {self.longest_wait_s:.1f} s (limit {self.stuck_limit_s:.0f} s)"),
            (
                "0 acknowledged writes lost",
                lost == 0 and not self.remount and sum(self.memory_acknowledged.values()) > 0,
                f"{sum(self.memory_acknowledged.values())} acknowledged; lost {len(self.lost_live)} live, "
                f"{len(self.lost_remount)} after the remount{'; remount: ' + self.remount if self.remount else ''}",
            ),
            ("the same daemon pid", self.daemon_pid_end == self.daemon_pid, f"{self.daemon_pid} at the start, {self.daemon_pid_end} at the end"),
            (
                "every fault followed by a restart",
                faults_ok,
                f"{len(self.faults)} faults{f' of {self.faults_asked} asked' if self.faults_asked is not None else ''}, "
                f"{len(recovered)} followed by a ready engine with a new pid (slowest {max(recovered, default=0):.1f} s); "
                f"restarts={self.restarts}; {len(self.fault_problems)} problems",
            ),
            (
                f"unmount under {UNMOUNT_LIMIT:.0f} s",
                self.unmount_finished and self.unmount_s < UNMOUNT_LIMIT,
                f"{'finished' if self.unmount_finished else 'FAILED'} in {self.unmount_s:.1f} s{': ' + self.unmount_error if self.unmount_error else ''}",
            ),
            (
                "no engine left behind",
                not self.left_behind,
                f"{len(self.engine_processes)} before the unmount; alive after: {self.left_behind or 'none'}",
            ),
            (
                "every job done or EIO",
                not self.failures and self.jobs.get("done", 0) > 0,
                f"{self.jobs.get('done', 0)} done, {self.jobs.get('eio', 0)} EIO, {self.jobs.get('failed', 0)} failed; {len(self.failures)} failures",
            ),
        ]
        self.criteria = [{"criterion": name, "ok": ok, "detail": detail} for name, ok, detail in checks]
        self.ok = all(ok for _, ok, _ in checks)

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    def summary(self) -> str:
        total = sum(self.jobs.values())
        lines = [
            f"soak: {self.agents} agents, {self.backend}, {self.elapsed_s:.0f} s (asked {self.duration_s:.0f} s); "
            f"engine deadline {self.engine_deadline_s:g} s (shown {self.deadline_shown_s if self.deadline_shown_s is not None else '-'}); "
            f"stuck past {self.stuck_limit_s:.0f} s",
            f"jobs: {total} ({self.jobs.get('done', 0)} done, {self.jobs.get('eio', 0)} EIO, {self.jobs.get('failed', 0)} failed otherwise); "
            f"mean {self.mean_job_s:.2f} s; longest wait without progress {self.longest_wait_s:.1f} s; stuck {len(self.stuck)}",
            f"memory: {sum(self.memory_acknowledged.values())} acknowledged writes "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.memory_acknowledged.items()))}); "
            f"lost {len(self.lost_live)} live, {len(self.lost_remount)} after the remount; {self.memory_unverified} unverified",
            f"faults: {len(self.faults)} ({', '.join(f'{k} {v}' for k, v in sorted(self.faults_by_kind.items())) or 'none'}); "
            f"restarts {self.restarts}, hangs {self.hangs if self.hangs is not None else '-'} (kernel/status); "
            f"audit: {', '.join(f'{k} {v}' for k, v in sorted(self.audit_engine_events.items())) or 'no engine events'}",
            f"daemon pid {self.daemon_pid} -> {self.daemon_pid_end}; unmount {self.unmount_s:.1f} s; engine processes left: {self.left_behind or 'none'}",
        ]
        if self.deadline_shown_s and self.deadline_shown_s > 4 * self.engine_deadline_s:
            lines.append(
                f"note: the engine deadline grew to {self.deadline_shown_s:.0f} s ({self.deadline_shown_s / self.engine_deadline_s:.0f}x the floor): "
                f"a hang goes unseen that long, and the stuck limit followed it"
            )
        for fault in self.faults:
            back = f"back in {fault['recovered_after']:.1f} s" if fault["recovered_after"] is not None else "NOT BACK"
            lines.append(f"  fault at {fault['at']:5.0f} s: SIG{fault['kind'].upper()} pid {fault['pid']}: {back} ({' -> '.join(fault['states'])})")
        for title, items in (("stuck", [f"{s['agent']} {s['what']}: {s['waited']:.1f} s{'' if s['ended'] else ' (never ended)'}" for s in self.stuck]),
                             ("failures", self.failures), ("fault problems", self.fault_problems),
                             ("lost (live)", self.lost_live), ("unexpected in aiosfs.log", self.log_troubles), ("lost (after the remount)", self.lost_remount)):  # fmt: skip
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  {item}" for item in items[:20]] + ([f"  ... and {len(items) - 20} more"] if len(items) > 20 else [])
        lines.append("criteria:")
        lines += [f"  [{'ok' if c['ok'] else 'FAIL'}] {c['criterion']}: {c['detail']}" for c in self.criteria]
        lines.append(f"soak {'PASSED' if self.ok else 'FAILED'}")
        return "\n".join(lines)
