#!/usr/bin/env python3
"""An agent written for the AIOS kernel: it knows nothing of aiosfs.

It talks to the kernel the way the Cerebrum SDK does: every call is a JSON body posted
to `$CEREBRUM_KERNEL_URL/query` (default http://localhost:8000), with the SDK's fields,
and any HTTP status other than 2xx is an exception. The functions below have the SDK's
names and bodies (llm_chat, llm_chat_with_json_output, create_memory, search_memories,
write_file, retrieve_file, call_tool). Against aiosfs: `aiosfs aios-api MOUNTPOINT`, then

    CEREBRUM_KERNEL_URL=http://127.0.0.1:8000 python3 examples/aios/agent.py "Lisbon"

It plans a day in a city: a JSON answer under a schema, a memory it finds again,
a file it writes and retrieves, and a tool call. It exits 0 when every step worked.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from typing import Any

KERNEL_URL = os.environ.get("CEREBRUM_KERNEL_URL", "http://localhost:8000")
AGENT = "example/day_planner"


def send_request(query_type: str, query_data: dict[str, Any]) -> Any:
    body = json.dumps({"query_type": query_type, "agent_name": AGENT, "query_data": query_data}).encode()
    request = urllib.request.Request(f"{KERNEL_URL}/query", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:  # raises on any non-2xx status, as the SDK does
        return json.load(response)


def llm(messages: list[dict[str, str]], action: str, tools: Any = None, response_format: Any = None, return_type: str = "text") -> Any:
    return send_request(
        "llm",
        {
            "query_class": "llm",
            "llms": None,
            "messages": messages,
            "tools": tools,
            "action_type": action,
            "temperature": 0.0,
            "max_new_tokens": 96,
            "message_return_type": return_type,
            "response_format": response_format,
        },
    )


def llm_chat(messages: list[dict[str, str]]) -> Any:
    return llm(messages, "chat")


def llm_chat_with_json_output(messages: list[dict[str, str]], response_format: dict[str, Any]) -> Any:
    return llm(messages, "chat_with_json_output", tools=[], response_format=response_format, return_type="json")


def create_memory(content: str, metadata: dict[str, Any]) -> Any:
    return send_request("memory", {"query_class": "memory", "operation_type": "add_memory", "params": {"content": content, "metadata": metadata}})


def search_memories(query: str, k: int = 3) -> Any:
    return send_request("memory", {"query_class": "memory", "operation_type": "retrieve_memory", "params": {"content": query, "k": k}})


def write_file(file_path: str, content: str) -> Any:
    return send_request("storage", {"query_class": "storage", "params": {"file_path": file_path, "content": content}, "operation_type": "write"})


def retrieve_file(query_text: str, n: int = 1) -> Any:
    params = {"query_text": query_text, "n": n, "keywords": None}
    return send_request("storage", {"query_class": "storage", "params": params, "operation_type": "retrieve"})


def call_tool(tool_calls: list[dict[str, Any]]) -> Any:
    return send_request("tool", {"query_class": "tool", "tool_calls": tool_calls})


PLAN = {
    "type": "object",
    "properties": {"morning": {"type": "string", "maxLength": 80}, "afternoon": {"type": "string", "maxLength": 80}},
    "required": ["morning", "afternoon"],
    "additionalProperties": False,
}


def main() -> int:
    city = sys.argv[1] if len(sys.argv) > 1 else "Lisbon"
    steps: list[tuple[str, bool]] = []

    reply = llm_chat([{"role": "user", "content": f"In one sentence: what is {city} known for?"}])["response"]
    print(f"chat: {reply['response_message']}")
    steps.append(("chat", reply["error"] is None and bool(reply["response_message"])))

    ask = [{"role": "user", "content": f"Plan a day in {city}: what to do in the morning and in the afternoon."}]
    reply = llm_chat_with_json_output(ask, {"type": "json_schema", "json_schema": {"name": "plan", "schema": PLAN}})["response"]
    plan = json.loads(reply["response_message"]) if reply["error"] is None else {}
    print(f"plan: {plan}")
    steps.append(("json plan", set(plan) == {"morning", "afternoon"}))

    added = create_memory(f"Day plan for {city}: morning {plan.get('morning')}; afternoon {plan.get('afternoon')}.", {"tags": ["travel", city]})
    found = search_memories(f"day plan {city}")["response"]
    ids = [hit["memory_id"] for hit in found["search_results"] or []]
    print(f"memory: {added['response']['memory_id']} found again: {added['response']['memory_id'] in ids}")
    steps.append(("memory", added["response"]["memory_id"] in ids))

    wrote = write_file(f"trips/{city.lower()}.md", f"# {city}\n\nMorning: {plan.get('morning')}\n\nAfternoon: {plan.get('afternoon')}\n")
    print(f"storage: {wrote['response']['response_message']}")
    documents = retrieve_file(f"{city} afternoon")["response"]["response_message"]
    steps.append(("storage", documents != "No documents found" and f"trips/{city.lower()}.md" in documents))

    budget = call_tool([{"name": "demo_author/calculator", "parameters": {"expression": "3 * 12.5 + 20"}}])["response"]
    print(f"tool: {budget['response_message']}")
    steps.append(("tool", budget["finished"] and json.loads(budget["response_message"]) == {"result": 57.5}))

    failed = [name for name, ok in steps if not ok]
    print("all steps worked" if not failed else f"failed: {', '.join(failed)}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
