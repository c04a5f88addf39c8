"""The context manager: the `context` file format and the prompt window."""

import errno
import json

import pytest

from kernel import params
from kernel.agents.config import AgentConfig
from kernel.agents.context import build_prompt, parse_context, render_context
from kernel.cores.backends.fake import FakeBackend
from kernel.errors import KernelError


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# -- the context file -----------------------------------------------------------------


def test_render_is_one_json_object_per_line():
    text = render_context([user("héllo"), assistant('say "hi"\nthen go')])
    lines = text.split("\n")
    assert lines[-1] == ""  # ends with a newline
    assert [json.loads(line) for line in lines[:-1]] == [user("héllo"), assistant('say "hi"\nthen go')]
    assert "héllo" in text  # not \u-escaped
    assert render_context([]) == ""


def test_parse_json_lines():
    text = '{"role": "system", "content": "be brief"}\n{"role": "user", "content": "q"}\n  {"role": "assistant", "content": "a"}\n{"role": "tool", "content": "42"}\n'
    assert parse_context(text) == [{"role": "system", "content": "be brief"}, user("q"), assistant("a"), {"role": "tool", "content": "42"}]


def test_plain_text_run_is_one_user_message():
    assert parse_context("hello\nworld\n") == [user("hello\nworld")]
    assert parse_context("just one line") == [user("just one line")]


def test_plain_runs_between_json_lines():
    text = 'intro\n{"role": "assistant", "content": "x"}\n\nmore\n\nlines\n\n'
    assert parse_context(text) == [user("intro"), assistant("x"), user("more\n\nlines")]


def test_appended_plain_line_adds_a_user_message():
    text = render_context([user("q"), assistant("a")]) + "follow-up\n"
    assert parse_context(text) == [user("q"), assistant("a"), user("follow-up")]


def test_blank_text_is_no_messages():
    assert parse_context("") == []
    assert parse_context("\n  \n\n") == []


def test_crlf_lines():
    assert parse_context('{"role": "user", "content": "a"}\r\nplain\r\n') == [user("a"), user("plain")]


@pytest.mark.parametrize(
    "line",
    [
        '{"role": "user", "content": ',  # not JSON
        '{"role": "robot", "content": "x"}',  # unknown role
        '{"role": "user"}',  # no content
        '{"role": "user", "content": 5}',  # content not text
        '{"role": "user", "content": "x", "extra": 1}',  # unknown key
        '{"content": "x"}',  # no role
    ],
)
def test_bad_lines_are_einval_naming_the_line(line):
    with pytest.raises(KernelError) as info:
        parse_context(f'{{"role": "user", "content": "ok"}}\n{line}\n')
    assert info.value.errno == errno.EINVAL
    assert "line 2" in info.value.message


@pytest.mark.parametrize(
    "content", ["plain", "two\nlines", 'quotes " and \\ backslash', "ünïcode ✓ 日本", "line\u2028separator", "next\x85line", "tab\there"]
)
def test_render_parse_round_trip(content):
    messages = [{"role": "system", "content": "sys"}, user(content), assistant(content)]
    assert parse_context(render_context(messages)) == messages


# -- the prompt window --------------------------------------------------------------


HISTORY = [user("a" * 40), assistant("b" * 40), user("c" * 40), assistant("d" * 40)]
SYSTEM = {"role": "system", "content": "S"}
NEW = user("new")
CONFIG = AgentConfig(system="S", max_tokens=16)


def size(backend: FakeBackend, messages: list[dict[str, str]]) -> int:
    return len(backend.tokenize(backend.chat_prompt(messages)))


def test_everything_fits_in_a_large_window():
    backend = FakeBackend(n_ctx_seq=4096)
    messages, tokens = build_prompt(backend, CONFIG, HISTORY, "new")
    assert messages == [SYSTEM, *HISTORY, NEW]
    assert tokens == backend.tokenize(backend.chat_prompt(messages))


def test_no_system_message_when_config_has_none():
    backend = FakeBackend(n_ctx_seq=4096)
    messages, _ = build_prompt(backend, AgentConfig(), [], "hi")
    assert messages == [user("hi")]


def test_oldest_turn_is_dropped_whole_and_system_kept():
    probe = FakeBackend()
    window = size(probe, [SYSTEM, *HISTORY[2:], NEW]) + CONFIG.max_tokens  # exactly the last turn fits
    backend = FakeBackend(n_ctx_seq=window)
    history = list(HISTORY)
    messages, tokens = build_prompt(backend, CONFIG, history, "new")
    assert messages == [SYSTEM, *HISTORY[2:], NEW]
    assert len(tokens) + CONFIG.max_tokens == window
    assert history == HISTORY  # the stored conversation is not changed

    smaller = FakeBackend(n_ctx_seq=window - 1)
    messages, _ = build_prompt(smaller, CONFIG, HISTORY, "new")
    assert messages == [SYSTEM, NEW]


def test_a_turn_is_dropped_with_all_its_answers():
    history = [user("a" * 40), assistant("b"), {"role": "tool", "content": "t" * 40}, assistant("b2"), user("c"), assistant("d")]
    probe = FakeBackend()
    window = size(probe, [SYSTEM, *history[4:], NEW]) + CONFIG.max_tokens
    messages, _ = build_prompt(FakeBackend(n_ctx_seq=window), CONFIG, history, "new")
    assert messages == [SYSTEM, user("c"), assistant("d"), NEW]


def test_room_for_the_answer_is_max_tokens_up_to_half_the_window():
    probe = FakeBackend()
    full = size(probe, [SYSTEM, *HISTORY, NEW])
    config = AgentConfig(system="S", max_tokens=100)
    # 100 tokens of room needed: a window that fits the prompt with 99 drops a turn
    messages, _ = build_prompt(FakeBackend(n_ctx_seq=full + 99), config, HISTORY, "new")
    assert messages == [SYSTEM, *HISTORY[2:], NEW]
    messages, _ = build_prompt(FakeBackend(n_ctx_seq=full + 100), config, HISTORY, "new")
    assert messages == [SYSTEM, *HISTORY, NEW]
    # max_tokens larger than half the window reserves only half the window
    huge = AgentConfig(system="S", max_tokens=params.MAX_TOKENS_LIMIT)
    messages, _ = build_prompt(FakeBackend(n_ctx_seq=2 * full), huge, HISTORY, "new")
    assert messages == [SYSTEM, *HISTORY, NEW]


def test_new_message_alone_fits_with_less_room():
    probe = FakeBackend()
    alone = size(probe, [SYSTEM, NEW])
    config = AgentConfig(system="S", max_tokens=200)
    messages, tokens = build_prompt(FakeBackend(n_ctx_seq=alone + params.MIN_PROMPT_ROOM), config, HISTORY, "new")
    assert messages == [SYSTEM, NEW]
    assert len(tokens) == alone


def test_e2big_when_the_new_message_alone_does_not_fit():
    probe = FakeBackend()
    alone = size(probe, [SYSTEM, NEW])
    backend = FakeBackend(n_ctx_seq=alone + params.MIN_PROMPT_ROOM - 1)
    with pytest.raises(KernelError) as info:
        build_prompt(backend, CONFIG, HISTORY, "new")
    assert info.value.errno == errno.E2BIG
    with pytest.raises(KernelError) as info:
        build_prompt(FakeBackend(n_ctx_seq=100), AgentConfig(), [], "x" * 100)
    assert info.value.errno == errno.E2BIG
