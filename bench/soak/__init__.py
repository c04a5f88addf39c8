"""The chaos soak: does aiosfs keep its promises while its engine is killed,
crashed and frozen under load?

`scripts/soak` mounts aiosfs for real, runs N agents that prompt in a loop and write
their `memory/` files, and every 20-40 s sends the engine process a SIGKILL, SIGSEGV or
SIGSTOP. The promises it checks, each a line of the report and together the exit status:

  - every job ends as `done` or with EIO naming the engine, never anything else;
  - no job waits longer than the engine deadline + 5 s without a byte or an end (the
    deadline that kernel/status shows, the largest seen: the watchdog's own promise);
  - every acknowledged memory write (write + fsync + close returned) is there with its
    exact content, on the live mount and after an unmount and a remount;
  - the daemon survives every fault (same pid) and each fault is followed by a restart;
  - the unmount takes under 15 s and leaves no engine process behind.

The engine is found through `kernel/status` (`engine=ready pid=N restarts=N`), restarts
and hangs through it and the audit log (`STATE/audit.jsonl`). Every wait of the soak
itself is bounded: a stuck read is seen by the main loop, not waited for.

  scripts/soak                                   # 16 agents, 600 s, the embedded model
  scripts/soak --backend fake --duration 60 --faults 3 --engine-deadline 3 --fault-interval 11 15

Exit status: 0 when every criterion holds, 1 when one fails, 2 when the mount has no
watchdog (`--engine-deadline`) and SIGSTOP is among the faults. A report per run:
printed, and as JSON with --json. Modules: proc (processes, the mount, kernel/status),
client (one agent's loop), ledger (its memory writes), faults (the injector), report
(figures and criteria), run (the CLI).
"""
