"""Agent config files and per-request JSON envelopes."""

import errno

import pytest

from kernel import params
from kernel.agents.config import AgentConfig, parse_config
from kernel.agents.request import parse_envelope
from kernel.errors import KernelError


def einval(call, *args, **kwargs) -> str:
    """Run `call`, require EINVAL, and return its message."""
    with pytest.raises(KernelError) as info:
        call(*args, **kwargs)
    assert info.value.errno == errno.EINVAL, info.value
    return info.value.message


# -- parse_config -----------------------------------------------------------------


def test_empty_config_is_the_defaults():
    assert parse_config("") == AgentConfig()
    assert parse_config("\n   \n# only a comment\n") == AgentConfig()


def test_config_good_lines():
    text = """
# a comment, then a blank line

system=You are terse.\\nAnswer in French.
temperature = 0.2
top_p=1
max_tokens=128
seed=42
model=fake
priority=9
tools=search, calc  shell
memory_recall=on
"""
    config = parse_config(text, known_models=lambda name: name == "fake")
    assert config.system == "You are terse.\nAnswer in French."
    assert config.temperature == 0.2
    assert config.top_p == 1.0
    assert config.max_tokens == 128
    assert config.seed == 42
    assert config.model == "fake"
    assert config.priority == 9
    assert config.tools == ("search", "calc", "shell")
    assert config.memory_recall is True


def test_later_line_for_a_key_wins():
    config = parse_config("max_tokens=10\ntemperature=0.5\nmax_tokens=20\n")
    assert config.max_tokens == 20
    assert config.temperature == 0.5


def test_appending_to_a_rendered_config_overrides_it():
    rendered = AgentConfig(max_tokens=100).render()
    assert parse_config(rendered + "max_tokens=7\n").max_tokens == 7


@pytest.mark.parametrize("value", ["on", "true", "YES", "1"])
def test_switch_on_spellings(value):
    assert parse_config(f"memory_recall={value}").memory_recall is True


@pytest.mark.parametrize("value", ["off", "False", "no", "0"])
def test_switch_off_spellings(value):
    assert parse_config(f"memory_recall=on\nmemory_recall={value}").memory_recall is False


def test_unknown_key_names_the_line():
    message = einval(parse_config, "temperature=0.1\n\ncolour=blue\n")
    assert "line 3" in message
    assert "'colour'" in message


def test_line_without_equals_names_the_line():
    message = einval(parse_config, "# comment\njust words\n")
    assert "line 2" in message


@pytest.mark.parametrize(
    "line",
    [
        "temperature=hot",
        "temperature=2.5",
        "temperature=-0.1",
        "temperature=nan",
        "temperature=inf",
        "top_p=0",
        "top_p=1.5",
        "top_p=",
        "max_tokens=0",
        f"max_tokens={params.MAX_TOKENS_LIMIT + 1}",
        "max_tokens=ten",
        "max_tokens=1.5",
        "seed=-2",
        f"seed={2**32}",
        "seed=x",
        "priority=10",
        "priority=-1",
        "memory_recall=maybe",
    ],
)
def test_bad_values_are_einval(line):
    key = line.partition("=")[0]
    message = einval(parse_config, f"system=hi\n{line}\n")
    assert "line 2" in message
    assert key in message


def test_values_at_the_bounds_are_accepted():
    config = parse_config(f"temperature=0\ntemperature=2\ntop_p=0.01\nmax_tokens=1\nmax_tokens={params.MAX_TOKENS_LIMIT}\nseed=-1\npriority=0")
    assert config.temperature == 2.0
    assert config.top_p == 0.01
    assert config.max_tokens == params.MAX_TOKENS_LIMIT
    assert config.seed == -1
    assert config.priority == 0


def test_unknown_model_is_einval():
    message = einval(parse_config, "model=gpt-99", known_models=lambda name: name == "fake")
    assert "gpt-99" in message
    assert parse_config("model=fake", known_models=lambda name: name == "fake").model == "fake"


def test_render_lists_every_key_in_order():
    lines = AgentConfig().render().splitlines()
    keys = [line.partition("=")[0] for line in lines]
    assert keys == [
        "system",
        "temperature",
        "top_p",
        "max_tokens",
        "seed",
        "model",
        "priority",
        "tools",
        "memory_recall",
        "memory_top_k",
        "tool_choice",
        "parallel_tool_calls",
        "ignore_eos",
        "on_restart",
    ]


def test_render_round_trip():
    config = AgentConfig(
        system="line one\nline two",
        temperature=0.0,
        top_p=0.5,
        max_tokens=33,
        seed=7,
        model="fake",
        priority=3,
        tools=("a", "b"),
        memory_recall=True,
    )
    text = config.render()
    assert "system=line one\\nline two\n" in text
    assert "memory_recall=on\n" in text
    assert "tools=a b\n" in text
    assert parse_config(text) == config
    assert parse_config(AgentConfig().render()) == AgentConfig()


# -- parse_envelope ---------------------------------------------------------------


BASE = AgentConfig(max_tokens=50, temperature=0.3)


def test_plain_text_is_the_message():
    text = "what is 2+2?\nthanks"
    message, config = parse_envelope(text, BASE)
    assert message == text
    assert config is BASE


def test_envelope_overrides_for_one_request():
    text = '{"prompt": "hi", "max_tokens": 5, "temperature": 0, "seed": 9, "stop": ["\\n\\n", "END"], "priority": 2, "tools": ["x"]}'
    message, config = parse_envelope(text, BASE)
    assert message == "hi"
    assert config.max_tokens == 5
    assert config.temperature == 0.0
    assert config.seed == 9
    assert config.stop == ("\n\n", "END")
    assert config.priority == 2
    assert config.tools == ("x",)
    assert BASE.max_tokens == 50 and BASE.stop == ()  # the agent's config is untouched


def test_envelope_single_stop_string():
    _, config = parse_envelope('{"prompt": "hi", "stop": "END"}', BASE)
    assert config.stop == ("END",)


def test_brace_but_not_json_is_einval():
    message = einval(parse_envelope, "  {not json at all", BASE)
    assert "JSON" in message


def test_json_without_prompt_is_plain_text():
    text = '{"question": "is this a prompt?"}'
    message, config = parse_envelope(text, BASE)
    assert message == text
    assert config is BASE


def test_envelope_unknown_keys_are_einval():
    message = einval(parse_envelope, '{"prompt": "hi", "system": "evil", "colour": 1}', BASE)
    assert "colour" in message and "system" in message


def test_envelope_prompt_must_be_text():
    einval(parse_envelope, '{"prompt": 5}', BASE)


@pytest.mark.parametrize(
    "stop",
    [
        '""',
        '[""]',
        "[1]",
        "5",
        "null",
        "[" + ", ".join(['"s"'] * (params.MAX_STOP_STRINGS + 1)) + "]",
        '"' + "x" * (params.MAX_STOP_BYTES + 1) + '"',
    ],
)
def test_envelope_bad_stop_is_einval(stop):
    message = einval(parse_envelope, f'{{"prompt": "hi", "stop": {stop}}}', BASE)
    assert "stop" in message


@pytest.mark.parametrize("pair", ['"max_tokens": 0', '"max_tokens": true', '"temperature": "warm"', '"top_p": 0', '"priority": 99', '"model": 3'])
def test_envelope_values_use_the_config_validators(pair):
    einval(parse_envelope, f'{{"prompt": "hi", {pair}}}', BASE)


def test_envelope_unknown_model_is_einval():
    message = einval(parse_envelope, '{"prompt": "hi", "model": "other"}', BASE, known_models=lambda name: name == "fake")
    assert "other" in message
    _, config = parse_envelope('{"prompt": "hi", "model": "fake"}', BASE, known_models=lambda name: name == "fake")
    assert config.model == "fake"
