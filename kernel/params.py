"""Every limit of the kernel in one place, each with a one-line reason.

Values here are defaults; the mount command and per-agent config override the ones
that say so.
"""

# -- requests -------------------------------------------------------------------
MAX_REQUEST_BYTES = 256 * 1024  # one prompt/call turn; larger writes get EFBIG
MAX_QUEUED_PER_AGENT = 16  # queued + running jobs of one agent; beyond → EAGAIN
MAX_QUEUED_TOTAL = 1024  # jobs waiting in the whole kernel; beyond → EAGAIN
MAX_BLOCKED_READERS_PER_UID = 64  # reads parked in the daemon per uid; beyond → EAGAIN
MAX_JOB_RESTARTS = 3  # requeues of one job after restarts: a job that crashes the daemon must not crash it forever
FUSE_MAX_TASKS = 4096  # concurrent FUSE requests; pyfuse3's default of 99 freezes the mount
# How long the VFS may keep the attributes of the mount's own directories (kernel/,
# agents/, agents/NAME/, tools/; not the root's) and the names of root's fixed children. Each path walk
# otherwise asks the daemon for every directory on the way, twice (a lookup, then a
# getattr for the permission check): most of a short job's FUSE requests. A directory's
# owner and mode change only by chmod/chown through the mount, whose answer the VFS keeps;
# what may be a second stale is its mtime. Files and agent names stay uncached (0).
DIR_CACHE_SECONDS = 1.0

# -- generation -----------------------------------------------------------------
DEFAULT_MAX_TOKENS = 256  # generated tokens per job unless config/envelope says otherwise
MAX_TOKENS_LIMIT = 8192  # the largest max_tokens anyone may ask for
DEFAULT_TEMPERATURE = 0.7  # sampling temperature; 0 means greedy
DEFAULT_TOP_P = 0.95  # nucleus sampling
MAX_STOP_STRINGS = 8  # stop strings per request
MAX_STOP_BYTES = 64  # length of one stop string

# -- engine ---------------------------------------------------------------------
DEFAULT_SLOTS = 8  # KV slots of the test backend, which has no KV cache to size them by
MAX_AUTO_SLOTS = 32  # a local model gets as many slots as KV_BUDGET_BYTES holds, up to this many
KV_BUDGET_BYTES = 1024 * 1024 * 1024  # KV cache memory a local model's slots may take (--kv-budget)
DEFAULT_CTX_PER_SLOT = 2048  # tokens of context each sequence may hold
DEFAULT_BATCH_TOKENS = 512  # tokens per llama_decode step (decode first, then prefill chunks)
PREFILL_TILE = 64  # prompt rows llama.cpp's CPU attention computes in tiles (GGML_FA_TILE_Q); chunks are whole tiles
PREFILL_STALL = 1.0  # while sequences generate, prompt chunks may make a step this much longer
PREFILL_MIN_CHUNK = PREFILL_TILE  # ... but a step always carries at least this many prompt tokens
KV_SHARE_MIN_TOKENS = PREFILL_TILE  # a job starts on another sequence's prefix when that saves this much prefill
SHORT_HEAD_TOKENS = 16  # a reused prefix this short, not computed in tiles, is computed again to be shareable
MAX_MOVES_PER_STEP = 4  # sequences moved per step to keep the batch's sequence ids contiguous
MIN_PROMPT_ROOM = 16  # tokens of generation room a prompt must leave, else E2BIG

# -- scheduling -------------------------------------------------------------------
DEFAULT_SCHEDULER = "fifo"  # the policy a mount starts with
DEFAULT_QUANTUM = 32  # rr: generated tokens a job may run before yielding its slot
MAX_QUANTUM = 1_000_000  # the largest rr quantum accepted
PRIORITY_AGING_SECONDS = 10.0  # a waiting job gains one priority level per this many seconds
SWAP_RAM_BYTES = 1024 * 1024 * 1024  # saved KV states kept in RAM; beyond, a switch recomputes instead

# -- hibernation: agents' cached KV sequences on disk (kernel/cores/hibernate.py) --------------
KV_DISK_SHARE = 0.10  # by default an engine's KV files may take this share of the state filesystem's free space (mount --kv-disk)
KV_DISK_MAX_BYTES = 4 * 1024**3  # ... but no more than this
KV_RESTORE_MIN_TOKENS = PREFILL_TILE  # a sequence is read back from disk only when that saves this much prefill
KV_WRITE_DELAY_SECONDS = 1.0  # a busy engine writes a finished sequence this long after its job ended (an idle one at once)
KV_WRITE_MIN_GROWTH = 256  # ... or when its agent's next job takes it first, if it grew by this many tokens since its file
KV_WRITE_QUEUE_BYTES = 512 * 1024 * 1024  # states waiting for the disk writer, at most; beyond, a sequence waits for its next chance
KV_CLOSE_SECONDS = 3.0  # at unmount the engine waits this long for its sequences to reach the disk (less than ENGINE_STOP_SECONDS)

# -- the engine process (kernel/cores/enginehost.py) and its supervision (kernel/cores/engine.py) --
ENGINE_CRASH_LOOP = 3  # crashes within the window that mark a core failed instead of restarting it again
ENGINE_CRASH_WINDOW_SECONDS = 60.0  # the crash-loop window
ENGINE_STABLE_SECONDS = 10.0  # an engine that served this long ends a crash loop: the crashes before it no longer count
ENGINE_BACKOFF_SECONDS = 0.5  # wait before the first restart; it doubles at each further crash in the window
ENGINE_BACKOFF_MAX_SECONDS = 10.0  # the longest wait before a restart
ENGINE_STOP_SECONDS = 5.0  # an engine asked to stop is killed after this long (a stopped one at once)
ENGINE_STOP_GRACE_SECONDS = 2.0  # at unmount, a step still running after this long is ended by killing the engine
ENGINE_KILL_WAIT_SECONDS = 5.0  # an engine that outlives SIGKILL this long (stuck in a driver) is left behind, logged
# the watchdog: an engine that answers no step, call or ping within its deadline is hung: killed and restarted
ENGINE_FREE_STEPS = 4  # steps an engine process may take on its own when the daemon's next plan is late (docs/engine.md)
ENGINE_DEADLINE_SECONDS = 15.0  # the deadline's floor (aiosfs mount --engine-deadline)
ENGINE_DEADLINE_FACTOR = 50  # ... or this many times the slowest recent step, when that is longer
ENGINE_DEADLINE_CAP_FACTOR = 4  # ... but at most this many floors: one step slowed by a busy machine must not make a stop go unseen for minutes
ENGINE_DEADLINE_WINDOW = 256  # steps per window of step times; the slowest of the last few windows counts as recent
ENGINE_DEADLINE_WINDOWS = 8  # ... this many windows
ENGINE_START_DEADLINE_FACTOR = 4  # loading and warming up may go this many deadlines without a sign of progress
ENGINE_CALL_THREADS = 32  # threads that may wait on engines' tokenize and chat-template calls at once; more wait their turn
ENGINE_PING_FRACTION = 0.25  # an idle engine is pinged every this fraction of the deadline, so a hang shows while idle

# -- remote LLM cores (kernel/cores/remote.py: OpenAI-compatible servers) ----------------
REMOTE_MAX_IN_FLIGHT = 8  # requests one remote core runs at once unless configured: the server batches them
REMOTE_MAX_IN_FLIGHT_LIMIT = 1024  # the largest max_in_flight accepted
REMOTE_TIMEOUT_SECONDS = 60.0  # a request that makes no progress this long ends with ETIMEDOUT
REMOTE_MAX_TIMEOUT_SECONDS = 3600.0  # the largest timeout a remote core may be given
REMOTE_RETRIES = 3  # connect errors and 5xx are retried this often, only before any byte was published; then EIO
REMOTE_BACKOFF_SECONDS = 0.5  # the wait before the first retry; it doubles at each further one
REMOTE_ERROR_BODY_BYTES = 64 * 1024  # the part of an error response read for its message
REMOTE_ERROR_CHARS = 500  # a server's error message is cut to this many characters in the job's message
REMOTE_KEY_MAX_BYTES = 4096  # an API key file larger than this is refused: it is not a key

# -- model-driven tool calls ----------------------------------------------------------
MAX_TOOL_CALLS = 8  # calls in one reply of the model (parallel_tool_calls=off: 1); they run concurrently
MAX_TOOL_STEPS = 4  # generations of one request that uses tools; the last may only answer

# -- the tool manager (kernel/tools/, tools/) -----------------------------------------
TOOL_TIMEOUT_SECONDS = 10.0  # a call (its wait for a free turn included) takes at most this unless the tool says otherwise; beyond → ETIMEDOUT
TOOL_MAX_TIMEOUT_SECONDS = 300.0  # the largest timeout a manifest may ask for
TOOL_CONCURRENCY = 4  # calls of one tool running at once; more wait their turn within the timeout
TOOL_MAX_CONCURRENCY = 64  # the largest concurrency a manifest may ask for
TOOL_NAME_BYTES = 64  # a tool's name, [a-z][a-z0-9_]*
MAX_DECLARED_TOOLS = 32  # tools one request may declare (envelope "tools" as objects: calls returned, not run)
MAX_TOOL_NAME_BYTES = 128  # a declared tool's name (any printable text, e.g. "author/tool")
TOOL_ARGUMENTS_MAX_BYTES = 256 * 1024  # one call written to tools/NAME; larger → EFBIG
TOOL_READ_MAX_BYTES = 64 * 1024  # memory_read returns at most this much of a file
TOOL_OUTPUT_MAX_BYTES = 1024 * 1024  # an external tool's stdout; more → EIO (the process is killed)
TOOL_ERROR_CHARS = 500  # stderr tail, bad output and audit fields are cut to this many characters
TOOL_UID = 65534  # external tools run as this uid (nobody) when the daemon is root
TOOL_GID = 65534  # ... and this gid (nogroup)
TOOL_PATH = "/usr/local/bin:/usr/bin:/bin"  # PATH of an external tool's minimal environment
CALC_MAX_CHARS = 1000  # a calculator expression; the schema refuses longer ones
CALC_MAX_EXPONENT = 10_000  # |exponent| of ** in the calculator; beyond → EINVAL
CALC_MAX_INT_BITS = 4096  # integers the calculator may produce (about 1233 digits); beyond → EINVAL

# -- MCP servers as tools (kernel/tools/mcp.py, [[mcp]] in mount --config) --------------
MCP_SERVER_NAME_BYTES = 32  # a server's name, [a-z][a-z0-9_-]*: the SERVER of its tools' SERVER.TOOL
MCP_START_SECONDS = 30.0  # a start (spawn or connect, initialize, the tool listing) takes at most this; beyond → failed
MCP_RESTART_MIN_SECONDS = 1.0  # the first wait before a server that stopped or failed to start is started again
MCP_RESTART_MAX_SECONDS = 60.0  # the wait doubles at each failure up to this
MCP_RESTART_RESET_SECONDS = 60.0  # a server that served this long starts the wait over from the minimum
MCP_PING_SECONDS = 10.0  # an idle ready server is pinged this often (config `ping`); no answer as long → restarted
MCP_MAX_TOOLS = 256  # tools taken from one server's listing; the rest are left out (a log line)
MCP_LIST_PAGES = 16  # pages of one tools/list
MCP_STDERR_LINES = 50  # lines of a stdio server's stderr logged per minute; more are counted, not logged
MCP_STDERR_TAIL = 5  # last lines of its stderr kept to say why a server stopped
MCP_HTTP_CONNECT_SECONDS = 10.0  # connecting to an HTTP server; its answers are bounded by the calls' own deadlines

# -- memory (each agent's memory/) -----------------------------------------------------
MEMORY_MAX_FILE_BYTES = 2**44 - 4096  # the largest file in memory/ (ext4's with 4 KiB blocks); beyond → EFBIG
MEMORY_QUOTA_BYTES = 64 * 1024 * 1024  # bytes of files and symlinks per agent; beyond → EDQUOT (mount --memory-quota)
MEMORY_MAX_INODES = 100_000  # files and directories per agent; beyond → ENOSPC
MEMORY_CHUNK_BYTES = 64 * 1024  # data is stored in rows of this size: a small write rewrites one row
MEMORY_CACHE_BYTES = 32 * 1024 * 1024  # committed chunks kept in RAM (LRU), shared by all agents
MEMORY_VERSIONS = 16  # versions kept per file; older ones are dropped
MEMORY_VERSION_MAX_BYTES = 4 * 1024 * 1024  # larger files keep no versions (a version is a full compressed copy)
MEMORY_INDEX_MAX_BYTES = 1024 * 1024  # larger files are not indexed for recall
MEMORY_PASSAGE_CHARS = 600  # recall passages: paragraphs, cut at this length
MEMORY_QUERY_WORDS = 64  # words of a query used for recall
MEMORY_MAX_SYMLINK_BYTES = 4095  # a symlink target, as PATH_MAX - 1
MEMORY_DIR_MODE = 0o750  # a new agent's memory/
DEFAULT_MEMORY_TOP_K = 3  # passages recalled into a prompt when memory_recall=on
MAX_MEMORY_TOP_K = 20  # the largest memory_top_k accepted
RECALL_OVERFETCH = 4  # recall ranks this many times k passages, then keeps the k the caller may read
MEMORY_RECALL_MAX_CHARS = 4000  # recalled text placed in one prompt, at most

# -- files and logs -------------------------------------------------------------
MAX_CONFIG_BYTES = 64 * 1024  # config file size; larger → EFBIG
MAX_CONTEXT_BYTES = 4 * 1024 * 1024  # a written context file; larger → EFBIG
MAX_CTL_LINE = 4096  # one ctl command line
MAX_NAME_BYTES = 255  # agent names, as in every POSIX filesystem
READ_WAKE_SECONDS = 0.25  # blocked readers look for pending signals this often
POLL_WAIT_SECONDS = 30.0  # a poll() notification is sent at the latest after this (spurious wake-ups are allowed)
LOG_LINES = 1000  # kernel/log keeps this many newest lines
ERROR_LINES = 8  # an agent's `error` file keeps this many newest lines per uid
AUDIT_FILE_BYTES = 4 * 1024 * 1024  # audit.jsonl is rotated to audit.jsonl.1 past this size
TRASH_RETENTION_SECONDS = 7 * 24 * 3600  # a removed agent can be restored for this long, then it is purged
TRASH_PURGE_INTERVAL = 3600.0  # seconds between looks for expired trash
EVENT_HISTORY = 1000  # lines an events stream keeps for readers that fall behind

# -- agent manifests and processes (aiosfs mount --agents-dir) ----------------------------
MANIFEST_MAX_BYTES = 64 * 1024  # one manifest file; larger → manifest_error
MANIFEST_DEBOUNCE_SECONDS = 0.2  # the directory must be quiet this long before it is read: editors write in several steps
MANIFEST_SETTLE_MAX_SECONDS = 1.0  # ... yet a directory that keeps changing is read at least this often
MANIFEST_RESCAN_SECONDS = 30.0  # the directory is also read this often, for a change the watcher missed
AGENT_RESTART_MIN_SECONDS = 0.5  # the first wait before an exited agent process starts again
AGENT_RESTART_MAX_SECONDS = 30.0  # the wait doubles at each exit up to this, so a crashing command costs little
AGENT_RESTART_RESET_SECONDS = 10.0  # a run this long starts the wait over from the minimum
AGENT_STOP_SECONDS = 5.0  # SIGTERM, then SIGKILL after this long
AGENT_LOG_BYTES = 4 * 1024 * 1024  # agents-logs/NAME.log is rotated to NAME.log.1 past this size when the process starts
