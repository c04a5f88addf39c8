"""The mount configuration file and the route between cores (no server needed)."""

from __future__ import annotations

import errno
import os
import pwd
from pathlib import Path

import pytest
from kernel_helpers import OWNER, ROOT, ask, finished, mkdir, refused, run, running, submit
from mounting import needs_root

from aiosfs.mountconfig import ConfigError, load_mount_config
from kernel.agents.config import AgentConfig
from kernel.cores.backends.fake import FakeBackend
from kernel.cores.remote import RemoteConfig
from kernel.llm.jobs import Job
from kernel.syscall import Sys, syscall


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aiosfs.toml"
    path.write_text(text)
    return path


def test_a_full_file(tmp_path):
    config = load_mount_config(
        write(tmp_path, 'route = "least-loaded"\n[[remote]]\nname = "big"\nbase_url = "http://gpu:8000/v1"\nmodel = "m"\nmax_in_flight = 8\n')
    )
    assert config.route == "least-loaded"
    assert config.remotes == (RemoteConfig("big", "http://gpu:8000", "m", max_in_flight=8),)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("route = 3\n[[remote\n", "not valid TOML"),
        ('colour = "red"\n', "unknown keys ['colour']"),
        ('route = "fastest"\n', "route 'fastest'"),
        ('[[remote]]\nname = "x"\nbase_url = "http://h"\nmodel = "m"\nflavour = 1\n', "remote #1: unknown keys ['flavour']"),
        ('[[remote]]\nname = "x"\nbase_url = "ftp://h"\nmodel = "m"\n', "remote #1"),
        ('[[remote]]\nname = "x"\nbase_url = "http://h"\n', "remote #1"),
        ("remote = 5\n", "array of tables"),
    ],
)
def test_bad_files_say_where(tmp_path, text, words):
    with pytest.raises(ConfigError) as info:
        load_mount_config(write(tmp_path, text))
    assert words in str(info.value)


def test_least_loaded_routes_to_the_idler_core(new_kernel):
    kernel = new_kernel(remotes=[RemoteConfig("far", "http://127.0.0.1:9", "m")], route="least-loaded")
    assert list(kernel.cores) == ["fake", "far"] and kernel.cores.known("far") and not kernel.cores.known("near")

    def job(n: int, model: str = "") -> Job:
        return Job(n, "a", 0, "x", [], [1], AgentConfig(model=model))

    first = job(1)
    kernel.cores.submit(first)  # not running: it stays queued where it went
    assert first.config.model == "fake"  # ties go to the local core, and the choice sticks to the job
    assert kernel.cores.of(first) is kernel.engine
    second = job(2)
    assert kernel.cores.of(second) is kernel.cores["far"] and second.config.model == ""  # asking chooses nothing
    pinned = job(3, "fake")
    assert kernel.cores.of(pinned) is kernel.engine  # a named model is never rerouted


def test_two_cores_with_one_name_are_refused(new_kernel):
    with pytest.raises(ValueError):
        new_kernel(remotes=[RemoteConfig("fake", "http://127.0.0.1:9", "m")])


def test_local_models_load_and_unload_at_run_time(new_kernel):
    loads: list[str] = []

    def loader() -> FakeBackend:
        loads.append("second")
        return FakeBackend(step_delay=0.01)

    kernel = new_kernel(loaders={"second": (loader, False)})

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            await syscall(kernel, Sys.CONFIG_WRITE, OWNER, agent, "model=second\n")  # known, though not loaded
            await refused(errno.EAGAIN, submit(kernel, agent, "early"))
            await refused(errno.EPERM, syscall(kernel, Sys.KERNEL_CTL, OWNER, b"load second\n"))
            await syscall(kernel, Sys.KERNEL_CTL, ROOT, b"load second\n")
            await refused(errno.EEXIST, syscall(kernel, Sys.KERNEL_CTL, ROOT, b"load second\n"))
            answered = await ask(kernel, agent, "hi")
            busy = await submit(kernel, agent, "x" * 200)
            await refused(errno.EBUSY, syscall(kernel, Sys.KERNEL_CTL, ROOT, b"unload second\n"))
            await finished(busy)
            await syscall(kernel, Sys.KERNEL_CTL, ROOT, b"unload second\n")
            await refused(errno.EAGAIN, submit(kernel, agent, "late"))
            await refused(errno.EINVAL, syscall(kernel, Sys.KERNEL_CTL, ROOT, b"unload fake\n"))  # the mount's own model stays
            return answered

    answered = run(body)
    assert answered.answer == "turn 1: HI" and answered.config.model == "second" and loads == ["second"]
    assert "second" not in kernel.cores and kernel.cores.unloaded() == ["second"]


def test_local_models_in_the_file(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    config = load_mount_config(write(tmp_path, f'[[local]]\nname = "coder"\npath = "{model}"\nslots = 2\nload = false\n'))
    assert [(m.name, m.path, m.slots, m.load) for m in config.locals] == [("coder", model, 2, False)]
    for text, words in (
        (f'[[local]]\nname = "c"\npath = "{tmp_path}/missing.gguf"\n', "no model file"),
        (f'[[local]]\nname = "c"\npath = "{model}"\nslots = -1\n', "slots"),
        (f'[[local]]\nname = "c"\npath = "{model}"\n[[remote]]\nname = "c"\nbase_url = "http://h"\nmodel = "m"\n', "used twice"),
    ):
        with pytest.raises(ConfigError) as info:
            load_mount_config(write(tmp_path, text))
        assert words in str(info.value)


def test_a_config_that_names_a_model_this_mount_lacks_is_einval_at_submit(new_kernel):
    kernel = new_kernel()

    async def body():
        async with running(kernel):
            agent = await mkdir(kernel, "a")
            agent.config = AgentConfig(model="far")  # kept from a mount that had a remote core "far"
            error = await refused(errno.EINVAL, submit(kernel, agent, "hello"))
            assert "not served by this mount" in error.message

    run(body)


def test_the_daemon_gets_every_mount_option_unchanged(tmp_path):
    """`aiosfs mount` starts the daemon with a command line made of its options: parsed
    again, they must be the same (units included)."""
    from aiosfs.cli import _daemon_argv, _options, build_parser

    argv = ["mount", str(tmp_path / "mnt"), "--kv-budget", "256", "--ctx", "1024", "--threads", "1", "--model", str(tmp_path / "m.gguf")]
    args = build_parser().parse_args(argv)
    options = _options(args)
    again = _options(build_parser().parse_args(_daemon_argv(args, options)))
    assert again == options and options.kv_budget == 256 and options.slots is None


# -- [[mcp]]: MCP servers whose tools the mount serves -------------------------------------------
def test_mcp_servers_in_the_file(tmp_path):
    text = """
[[mcp]]
name = "time"
command = "mcp-server-time"
args = ["--local-timezone", "UTC"]
env = { TZ = "UTC" }
timeout = 20
tools = ["get_current_time"]

[[mcp]]
name = "search-2"
url = "https://mcp.example.com/mcp"
headers = { "X-Team" = "infra", Authorization = "Bearer s3cret" }
ping = 0
"""
    time_server, search = load_mount_config(write(tmp_path, text)).mcp
    assert (time_server.transport, time_server.command, time_server.args, time_server.timeout) == (
        "stdio",
        "mcp-server-time",
        ("--local-timezone", "UTC"),
        20,
    )
    assert time_server.tools == ("get_current_time",) and time_server.cwd == "/" and time_server.user == ""
    assert time_server.environment("/home/x")["TZ"] == "UTC" and set(time_server.environment("/home/x")) == {"PATH", "HOME", "LANG", "TZ"}
    assert (search.transport, search.url, search.ping, search.tools) == ("http", "https://mcp.example.com/mcp", 0, None)
    assert search.request_headers() == {"X-Team": "infra", "Authorization": "Bearer s3cret"}
    assert "s3cret" not in repr(search) and "TZ" not in repr(time_server)  # what may be secret stays out of logs


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('name = "t"\ncommand = "x"\ncolour = 1\n', "mcp #1 (t): unknown keys ['colour']"),
        ('command = "x"\n', "mcp #1: name is required"),
        ('name = "Time"\ncommand = "x"\n', "name: 'Time' is not [a-z][a-z0-9_-]*"),
        ('name = "t.x"\ncommand = "x"\n', "name: 't.x'"),
        ('name = "t"\n', "give command (a stdio server) or url"),
        ('name = "t"\ncommand = "x"\nurl = "http://h/mcp"\n', "not both"),
        ('name = "t"\ncommand = "x"\nargs = "-v"\n', "args must be a list"),
        ('name = "t"\ncommand = "x"\nargs = [1]\n', "args: a list of strings"),
        ('name = "t"\ncommand = "x"\nenv = ["A=1"]\n', "env must be a table"),
        ('name = "t"\ncommand = "x"\nenv = { "1A" = "x" }\n', "env: '1A' is not a variable name"),
        ('name = "t"\ncommand = "x"\ncwd = "srv"\n', "cwd: 'srv' is not an absolute path"),
        ('name = "t"\ncommand = "x"\nheaders = { A = "b" }\n', "headers and api_key_file are for url"),
        ('name = "t"\ncommand = "x"\ntimeout = 0\n', "timeout: 0 is not in (0, 300]"),
        ('name = "t"\ncommand = "x"\ntimeout = 301\n', "timeout: 301"),
        ('name = "t"\ncommand = "x"\nping = -1\n', "ping: -1"),
        ('name = "t"\ncommand = "x"\ntools = "all"\n', "tools must be a list"),
        ('name = "t"\ncommand = "x"\nuser = "aiosfs-no-such-user"\n', "no user 'aiosfs-no-such-user'"),
        ('name = "t"\nurl = "ftp://h/mcp"\n', "is not an http:// or https:// URL"),
        ('name = "t"\nurl = "http://me:pw@h/mcp"\n', "no credentials in the URL"),
        ('name = "t"\nurl = "http://h/mcp"\nargs = ["x"]\n', "are for command (stdio) servers"),
        ('name = "t"\nurl = "http://h/mcp"\nheaders = { "Bad Name" = "x" }\n', "is not a header name"),
        ('name = "t"\nurl = "http://h/mcp"\napi_key_file = "/k"\nheaders = { authorization = "x" }\n', "give one of them"),
    ],
)
def test_bad_mcp_tables_say_which_and_why(tmp_path, table, words):
    with pytest.raises(ConfigError) as info:
        load_mount_config(write(tmp_path, f"[[mcp]]\n{table}"))
    assert words in str(info.value) and str(tmp_path) in str(info.value)


def test_mcp_server_names_are_unique_and_mcp_is_an_array_of_tables(tmp_path):
    with pytest.raises(ConfigError, match="MCP server names used twice: t"):
        load_mount_config(write(tmp_path, '[[mcp]]\nname = "t"\ncommand = "x"\n[[mcp]]\nname = "t"\nurl = "http://h/mcp"\n'))
    with pytest.raises(ConfigError, match="array of tables"):
        load_mount_config(write(tmp_path, 'mcp = "time"\n'))


@needs_root
def test_an_mcp_server_may_run_as_another_user_under_a_root_daemon(tmp_path):
    (server,) = load_mount_config(write(tmp_path, '[[mcp]]\nname = "t"\ncommand = "x"\nuser = "nobody"\n')).mcp
    identity = server.identity()
    assert (identity.uid, identity.gid) == (pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid)


def test_a_user_daemon_refuses_to_run_an_mcp_server_as_someone_else(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with pytest.raises(ConfigError, match="only a daemon running as root"):
        load_mount_config(write(tmp_path, '[[mcp]]\nname = "t"\ncommand = "x"\nuser = "nobody"\n'))


def test_an_mcp_key_file_must_be_private_and_is_never_shown(tmp_path):
    from aiosfs.mount import MountError, MountOptions, check_config

    key = tmp_path / "mcp.key"
    key.write_text("k3y-never-shown\n")
    config = write(tmp_path, f'[[mcp]]\nname = "web"\nurl = "http://127.0.0.1:9/mcp"\napi_key_file = "{key}"\n')
    options = MountOptions(mountpoint=tmp_path / "mnt", state=tmp_path / "state", model=tmp_path / "m.gguf", config=config)
    key.chmod(0o644)
    with pytest.raises(MountError) as info:
        check_config(options)
    assert "readable by everyone" in str(info.value) and "k3y-never-shown" not in str(info.value)
    key.chmod(0o600)
    (server,) = check_config(options).mcp
    assert server.request_headers() == {"Authorization": "Bearer k3y-never-shown"}
    assert "k3y" not in repr(server)
