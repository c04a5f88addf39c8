"""The mount configuration file and the route between cores (no server needed)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from kernel_helpers import OWNER, ROOT, ask, finished, mkdir, refused, run, running, submit

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
    kernel.cores.of(first).submit(first)  # not running: it stays queued where it went
    assert first.config.model == "fake"  # ties go to the local core, and the choice sticks to the job
    second = job(2)
    assert kernel.cores.of(second) is kernel.cores["far"]
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
