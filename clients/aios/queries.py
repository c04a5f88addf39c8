"""What each AIOS query does in the mount (docs/aios.md has the table).

    llm      a stateless turn through agents/NAME/call: the envelope's "messages",
             "response_format" (JSON output under a grammar) and declared "tools"
             (the model's calls come back as JSON); call_tool then runs the calls
             through tools/NAME, operate_file runs them as storage operations
    memory   one note per file, agents/NAME/memory/aios/memories/ID.md, its metadata
             beside it in ID.json; retrieval is the agent's `recall`
    storage  the agent's memory/ tree: files, directories, versions and rollback
    tool     tools/NAME, acting for the agent

Expected failures come back in the response body (HTTP 200), as the AIOS kernel sends
them; a malformed query is a `BadQuery` (HTTP 422)."""

from __future__ import annotations

import errno
import json
import logging
import posixpath
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from ..mountclient import FileError, MountClient, unescape
from .responses import enveloped, llm_response, memory_response, storage_response, tool_response

log = logging.getLogger(__name__)

ACTIONS = ("chat", "chat_with_json_output", "chat_with_tool_call_output", "call_tool", "operate_file")
MEMORY_OPS = ("add_memory", "add_agentic_memory", "get_memory", "update_memory", "remove_memory", "retrieve_memory", "retrieve_memory_raw")
STORAGE_OPS = ("mount", "create_file", "create_dir", "write", "read", "retrieve", "rollback", "share", "delete_file", "delete_dir")
MEMORY_DIR = "aios/memories"  # under the agent's memory/
MAX_TOKENS = 8192  # the kernel's largest max_tokens
RECALL_K = 20  # the kernel's largest recall k: hits are filtered here, then cut to the k asked for
ANNOTATE_CHARS = 4000  # of a note shown to the model to annotate it (add_agentic_memory)
SUMMARY_CHARS = 2000  # a retrieved document's summary, as the AIOS kernel cuts it


class BadQuery(Exception):
    """The query itself is malformed (unknown type, action or operation)."""


ANNOTATIONS = {
    "type": "json_schema",
    "json_schema": {
        "name": "annotations",
        "schema": {
            "type": "object",
            "properties": {
                "keywords": {"type": "array", "items": {"type": "string", "maxLength": 32}, "maxItems": 5},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
                "context": {"type": "string", "maxLength": 160},
            },
            "required": ["keywords", "tags", "context"],
            "additionalProperties": False,
        },
    },
}


def _function(name: str, description: str, **properties: str) -> dict[str, Any]:
    schema = {"type": "object", "properties": {key: {"type": kind} for key, kind in properties.items()}, "required": list(properties)}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": schema}}


# operate_file: what the model may do to the agent's files
STORAGE_FUNCTIONS = [
    _function("create_file", "Create an empty file", file_path="string"),
    _function("create_dir", "Create a directory", dir_path="string"),
    _function("write", "Write text to a file, replacing its content", file_path="string", content="string"),
    _function("read", "Read a file", file_path="string"),
    _function("retrieve", "Find files about a topic", query_text="string"),
    _function("rollback", "Restore an earlier version of a file", file_path="string", n="integer"),
    _function("delete_file", "Delete a file", file_path="string"),
    _function("delete_dir", "Delete an empty directory", dir_path="string"),
]


class Queries:
    def __init__(self, client: MountClient) -> None:
        self.client = client
        self.roots: dict[str, str] = {}  # an agent's storage root under memory/ (the storage `mount` op), by directory

    async def handle(self, query_type: str, agent_name: str, data: dict[str, Any]) -> Any:
        """The response body of one query: the envelope, or the bare value where the AIOS kernel sends one."""
        if query_type == "llm":
            return await self.llm(agent_name, data)
        if query_type == "memory":
            return enveloped(await self.memory(agent_name, data))
        if query_type == "storage":
            return enveloped(await self.storage(agent_name, data))
        if query_type == "tool":
            return enveloped(await self.tool(agent_name, data))
        raise BadQuery(f"unknown query_type {query_type!r}: one of llm, memory, storage, tool")

    # -- llm -------------------------------------------------------------------------------
    async def llm(self, agent_name: str, data: dict[str, Any]) -> Any:
        action = data.get("action_type") or "chat"
        if action not in ACTIONS:
            raise BadQuery(f"unknown action_type {action!r}: one of {', '.join(ACTIONS)}")
        if not isinstance(data.get("messages"), list):
            raise BadQuery("query_data.messages must be a list of chat messages")
        try:
            agent = await self.client.agent(agent_name)
            envelope = await self._envelope(data)
            if action == "chat":
                return enveloped(llm_response(await self._answer(agent, envelope)))
            if action == "chat_with_json_output":
                envelope["response_format"] = data.get("response_format") or {"type": "json_object"}
                return enveloped(llm_response(await self._answer(agent, envelope)))
            if action == "operate_file":
                return await self._operate_file(agent, envelope)
            calls = await self._tool_calls(agent, envelope, data.get("tools"))
        except FileError as exc:
            return enveloped(llm_response(exc=exc))
        if action == "chat_with_tool_call_output":
            return enveloped(llm_response(None, calls))
        if not calls:  # as the AIOS kernel: a bare tool response, no envelope
            return tool_response("No tool was called by LLM") | {"finished": False}
        return enveloped(await self._run_tools(agent, calls))

    async def _envelope(self, data: dict[str, Any]) -> dict[str, Any]:
        """The stateless-chat envelope of an llm query: its messages and sampling settings."""
        envelope: dict[str, Any] = {"messages": data["messages"]}
        temperature, max_tokens = data.get("temperature"), data.get("max_new_tokens")
        if isinstance(temperature, int | float) and not isinstance(temperature, bool):
            envelope["temperature"] = min(max(float(temperature), 0.0), 2.0)
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0:
            envelope["max_tokens"] = min(max_tokens, MAX_TOKENS)
        wanted = [llm.get("name") for llm in data.get("llms") or [] if isinstance(llm, dict)]
        if wanted:  # the first one this mount serves; the AIOS names of other providers fall back to the default
            served = [name for name, _ in await self.client.models()]
            model = next((name for name in wanted if name in served), None)
            if model is not None:
                envelope["model"] = model
        return envelope

    async def _answer(self, agent: Path, envelope: dict[str, Any]) -> str:
        return (await self.client.call(agent, envelope)).rstrip("\n")

    async def _tool_calls(self, agent: Path, envelope: dict[str, Any], tools: Any) -> list[dict[str, Any]]:
        """The model's tool calls, chosen under a grammar from `tools` (it must call one)."""
        if not isinstance(tools, list) or not tools:
            raise FileError(errno.EINVAL, "this action needs query_data.tools: a non-empty list of function declarations")
        text = await self._answer(agent, envelope | {"tools": tools, "tool_choice": "required"})
        try:
            return [{"name": c["name"], "parameters": c["arguments"], "id": c["id"]} for c in json.loads(text)["tool_calls"]]
        except (ValueError, TypeError, KeyError):  # a core that applies no grammar may answer anything
            raise FileError(errno.EIO, f"the model's reply is not a tool call: {text[:200]!r}") from None

    async def _run_tools(self, agent: Path, calls: list[dict[str, Any]]) -> dict[str, Any]:
        """Run every call through tools/NAME, all at once; the results one per line, in
        the order of the calls (or the first call's error, in that order)."""
        outcomes: list[Any] = [None] * len(calls)

        async def run(index: int, call: dict[str, Any]) -> None:
            try:
                outcomes[index] = await self.client.tool(agent, await self._served(call.get("name")), call.get("parameters") or {})
            except FileError as exc:
                outcomes[index] = exc

        async with trio.open_nursery() as nursery:
            for index, call in enumerate(calls):
                nursery.start_soon(run, index, call)
        failed = next((o for o in outcomes if isinstance(o, FileError)), None)
        if failed is not None:
            return tool_response(f"Tool calling error: {failed}", failed)
        return tool_response("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in outcomes))

    async def _served(self, name: Any) -> str:
        """The served tool an AIOS name means: itself, or the part after its author
        ("demo_author/calculator" is calculator)."""
        if not isinstance(name, str):
            raise FileError(errno.EINVAL, "a tool call needs a name")
        served = await self.client.tools()
        for candidate in (name, name.rsplit("/", 1)[-1], name.replace("/", "__")):
            if candidate in served:
                return candidate
        raise FileError(errno.ENOENT, f"no tool {name!r} is served by this mount (served: {', '.join(served)})")

    async def _operate_file(self, agent: Path, envelope: dict[str, Any]) -> str:
        """The model picks storage operations; they run on the agent's files; then it
        sums them up. The AIOS kernel answers with the summary alone, a bare string."""
        done = []
        for call in await self._tool_calls(agent, envelope, STORAGE_FUNCTIONS):
            result = await self.storage_op(agent, call["name"], call["parameters"])
            done.append(f"{call['name']} {json.dumps(call['parameters'], ensure_ascii=False)}: {result['response_message']}")
        report = "The file operations ran:\n" + "\n".join(done) + "\nSay in one or two sentences what was done."
        messages = [*envelope["messages"], {"role": "user", "content": report}]
        return await self._answer(agent, envelope | {"messages": messages})

    # -- memory ----------------------------------------------------------------------------
    async def memory(self, agent_name: str, data: dict[str, Any]) -> dict[str, Any]:
        op, params = _operation(data, MEMORY_OPS, "memory")
        try:
            agent = await self.client.agent(agent_name)
            base = agent / "memory" / MEMORY_DIR
            if op in ("add_memory", "add_agentic_memory"):
                return await self._add_memory(agent, params, agentic=op == "add_agentic_memory")
            if op in ("retrieve_memory", "retrieve_memory_raw"):
                return await self._search_memories(agent, params)
            memory_id = params.get("memory_id")
            if not isinstance(memory_id, str) or not _is_id(memory_id):
                return memory_response(False, "Memory not found")
            if op == "get_memory":
                content, metadata = await self._note(base, memory_id)
                return memory_response(memory_id=memory_id, content=content, metadata=metadata)
            if op == "update_memory":
                return await self._update_memory(base, memory_id, params)
            await self.client.run((base / f"{memory_id}.md").unlink)
            await self.client.run(lambda: (base / f"{memory_id}.json").unlink(missing_ok=True))
            return memory_response(memory_id=memory_id)
        except FileError as exc:
            missing = exc.errno == errno.ENOENT and op in ("get_memory", "update_memory", "remove_memory")
            return memory_response(False, "Memory not found" if missing else str(exc))

    async def _add_memory(self, agent: Path, params: dict[str, Any], agentic: bool) -> dict[str, Any]:
        content, metadata = params.get("content"), params.get("metadata") or {}
        if not isinstance(content, str):
            return memory_response(False, "params.content must be text")
        if not isinstance(metadata, dict):
            return memory_response(False, "params.metadata must be an object")
        metadata = dict(metadata)
        for key in ("tags", "keywords", "category", "context"):  # top-level fields are accepted too
            if key in params and key not in metadata:
                metadata[key] = params[key]
        if agentic:  # the model reads the note for its keywords, tags and context; what the caller gave wins
            metadata = await self._annotations(agent, content) | metadata
        base = agent / "memory" / MEMORY_DIR
        memory_id = str(uuid.uuid4())
        await self.client.mkdir(base)
        await self.client.write(base / f"{memory_id}.json", json.dumps(_stamped(metadata), ensure_ascii=False))
        await self.client.write(base / f"{memory_id}.md", content, exclusive=True)
        return memory_response(memory_id=memory_id)

    async def _annotations(self, agent: Path, content: str) -> dict[str, Any]:
        """Keywords, tags and a line of context for a note, as JSON under a schema."""
        ask = f"Read this note and give its keywords, a few tags and one line of context.\n\nNote: {content[:ANNOTATE_CHARS]}"
        envelope = {"messages": [{"role": "user", "content": ask}], "response_format": ANNOTATIONS, "temperature": 0.0, "max_tokens": 200}
        return dict(json.loads(await self._answer(agent, envelope)))

    async def _update_memory(self, base: Path, memory_id: str, params: dict[str, Any]) -> dict[str, Any]:
        _, metadata = await self._note(base, memory_id)
        if isinstance(params.get("content"), str):
            await self.client.write(base / f"{memory_id}.md", params["content"])
        if isinstance(params.get("metadata"), dict):
            metadata |= params["metadata"]
        await self.client.write(base / f"{memory_id}.json", json.dumps(_stamped(metadata), ensure_ascii=False))
        return memory_response(memory_id=memory_id)

    async def _note(self, base: Path, memory_id: str) -> tuple[str, dict[str, Any]]:
        content = await self.client.read(base / f"{memory_id}.md")
        try:
            metadata = json.loads(await self.client.read(base / f"{memory_id}.json"))
        except (FileError, ValueError):
            metadata = {}
        return content, {"keywords": [], "tags": [], "category": None} | metadata

    async def _search_memories(self, agent: Path, params: dict[str, Any]) -> dict[str, Any]:
        query = params.get("content", params.get("query"))
        if not isinstance(query, str) or not query.strip():
            return memory_response(False, "params.content (the query) must be text")
        k, base = _count(params, 5), agent / "memory" / MEMORY_DIR
        results: list[dict[str, Any]] = []
        for hit in await self.client.recall(agent, query, RECALL_K):  # a hit in a note's text or in its metadata
            directory, name = posixpath.split(hit["path"])
            memory_id = name.removesuffix(".md").removesuffix(".json")
            if directory != MEMORY_DIR or not _is_id(memory_id) or any(r["memory_id"] == memory_id for r in results):
                continue
            try:
                content, metadata = await self._note(base, memory_id)
            except FileError:
                continue  # removed since it was indexed
            results.append({"memory_id": memory_id, "content": content, **metadata, "score": hit["score"]})
            if len(results) == k:
                break
        return memory_response(search_results=results)

    # -- storage ---------------------------------------------------------------------------
    async def storage(self, agent_name: str, data: dict[str, Any]) -> dict[str, Any]:
        op, params = _operation(data, STORAGE_OPS, "storage")
        try:
            agent = await self.client.agent(agent_name)
        except FileError as exc:
            return storage_response(f"Error: {exc}", exc)
        return await self.storage_op(agent, op, params)

    async def storage_op(self, agent: Path, op: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            return storage_response(await self._storage(agent, op, params))
        except FileError as exc:
            return storage_response(f"Error in {op}: {exc}", exc)

    async def _storage(self, agent: Path, op: str, params: dict[str, Any]) -> str:
        if op == "mount":
            root = params.get("root_dir", params.get("root")) or ""
            self.roots[agent.name] = self._relative(agent, root, "") if root else ""
            await self.client.mkdir(agent / "memory" / self.roots[agent.name])
            return f"File system mounted successfully for agent: {unescape(agent.name)}"
        if op == "retrieve":
            return await self._retrieve(agent, params)
        is_dir = op in ("create_dir", "delete_dir")
        given = params.get("dir_path", params.get("dir_name")) if is_dir else params.get("file_path", params.get("file_name"))
        path = agent / "memory" / self._relative(agent, given, self.roots.get(agent.name, ""))
        if op == "create_file":
            if await self.client.run(path.exists):
                return f"File already exists at: {path}"
            await self.client.mkdir(path.parent)
            await self.client.write(path, "", exclusive=True)
            return f"File has been created successfully at: {path}"
        if op == "create_dir":
            if await self.client.run(path.is_dir):
                return f"Directory already exists at: {path}"
            await self.client.mkdir(path)
            return f"Directory has been created successfully at: {path}"
        if op == "write":
            content = params.get("content")
            if not isinstance(content, str):
                raise FileError(errno.EINVAL, "params.content must be text")
            await self.client.mkdir(path.parent)
            await self.client.write(path, content)
            return f"Content has been written to file: {path}"
        if op == "read":
            return await self.client.read(path)
        if op == "delete_file":
            await self.client.run(path.unlink)
            return f"File has been deleted: {path}"
        if op == "delete_dir":
            await self.client.run(path.rmdir)
            return f"Directory has been deleted: {path}"
        if op == "rollback":
            return await self._rollback(agent, path, params)
        return await self._share(path)

    def _relative(self, agent: Path, given: Any, root: str) -> str:
        """A storage path as a path under the agent's memory/ (absolute ones too); it may not leave it."""
        if not isinstance(given, str) or not given.strip():
            raise FileError(errno.EINVAL, "the path is missing (params.file_path or params.dir_path)")
        relative = posixpath.normpath(posixpath.join(root, given.lstrip("/")))
        if relative == ".." or relative.startswith("../"):
            raise FileError(errno.EACCES, f"{given!r} leaves the agent's storage (its memory/ directory)")
        return "" if relative == "." else relative

    async def _retrieve(self, agent: Path, params: dict[str, Any]) -> str:
        query = params.get("query_text")
        if not isinstance(query, str) or not query.strip():
            raise FileError(errno.EINVAL, "params.query_text must be text")
        keywords = params.get("keywords") or []
        if isinstance(keywords, list):
            query = " ".join([query, *map(str, keywords)])
        hits = [h for h in await self.client.recall(agent, query, RECALL_K) if not h["path"].startswith(MEMORY_DIR + "/")]
        documents = [
            {
                "document_summary": h["text"][:SUMMARY_CHARS],
                "metadata": {"file_path": str(agent / "memory" / h["path"]), "line": h["line"], "score": h["score"]},
            }
            for h in hits[: _count(params, 3)]
        ]
        return json.dumps(documents, ensure_ascii=False) if documents else "No documents found"

    async def _rollback(self, agent: Path, path: Path, params: dict[str, Any]) -> str:
        """Back `n` versions (default 1), or to the newest version at or before `time`."""
        relative = str(path.relative_to(agent / "memory"))
        if isinstance(params.get("time"), str):
            await self.client.ctl(agent, f"rollback {relative} @{params['time']}")
            return f"Successfully rolled back the file: {path} to its version of {params['time']}"
        n = _count(params, 1, limit=1 << 30)
        kept = [
            int(v) for v, _, _, p in (line.split(" ", 3) for line in (await self.client.read(agent / "versions")).splitlines()[1:]) if p == relative
        ]
        if not kept:
            raise FileError(errno.ENOENT, f"{relative} has no kept versions")
        target = max(kept) - n
        if target not in kept:
            raise FileError(errno.ENOENT, f"{relative} keeps versions {min(kept)} to {max(kept)}: there is no version {n} before the current one")
        await self.client.ctl(agent, f"rollback {relative} {target}")
        return f"Successfully rolled back the file: {path} to its previous {n} version"

    async def _share(self, path: Path) -> str:
        """There is no upload: the share is the file's path in the mount, for those its modes let in."""
        stat = await self.client.run(path.stat)
        return json.dumps(
            {
                "file_name": path.name,
                "file_path": str(path),
                "share_link": path.as_uri(),
                "expires_in": "never: a path in the mount, readable by whoever its modes allow",
                "last_modified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime)),
            }
        )

    # -- tool ------------------------------------------------------------------------------
    async def tool(self, agent_name: str, data: dict[str, Any]) -> dict[str, Any]:
        calls = data.get("tool_calls")
        if not isinstance(calls, list) or not calls or not all(isinstance(c, dict) for c in calls):
            raise BadQuery("query_data.tool_calls must be a non-empty list of {name, parameters}")
        try:
            agent = await self.client.agent(agent_name)
        except FileError as exc:
            return tool_response(f"Tool calling error: {exc}", exc)
        return await self._run_tools(agent, calls)


def _operation(data: dict[str, Any], known: tuple[str, ...], kind: str) -> tuple[str, dict[str, Any]]:
    """A memory or storage query's operation_type and params; BadQuery when malformed."""
    op, params = data.get("operation_type"), data.get("params") or {}
    if op not in known:
        raise BadQuery(f"unknown {kind} operation_type {op!r}: one of {', '.join(known)}")
    if not isinstance(params, dict):
        raise BadQuery("query_data.params must be an object")
    return str(op), params


def _is_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def _stamped(metadata: dict[str, Any]) -> dict[str, Any]:
    return metadata | {"timestamp": time.strftime("%Y%m%d%H%M")}


def _count(params: dict[str, Any], default: int, limit: int = RECALL_K) -> int:
    """`k` or `n` (the SDK sends one, the AIOS kernel reads the other), within [1, limit]."""
    value = params.get("k", params.get("n", default))
    try:
        return min(max(int(value), 1), limit)
    except (TypeError, ValueError):
        return default
