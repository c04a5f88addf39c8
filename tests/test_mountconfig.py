"""The mount configuration file and the route between cores (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiosfs.mountconfig import ConfigError, load_mount_config
from kernel.config import AgentConfig
from kernel.jobs import Job
from kernel.remote import RemoteConfig


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
    assert list(kernel.cores) == ["fake", "far"] and kernel.known_model("far") and not kernel.known_model("near")

    def job(n: int, model: str = "") -> Job:
        return Job(n, "a", 0, "x", [], [1], AgentConfig(model=model))

    first = job(1)
    kernel.core_of(first).submit(first)  # not running: it stays queued where it went
    assert first.config.model == "fake"  # ties go to the local core, and the choice sticks to the job
    second = job(2)
    assert kernel.core_of(second) is kernel.cores["far"]
    pinned = job(3, "fake")
    assert kernel.core_of(pinned) is kernel.engine  # a named model is never rerouted


def test_two_cores_with_one_name_are_refused(new_kernel):
    with pytest.raises(ValueError):
        new_kernel(remotes=[RemoteConfig("fake", "http://127.0.0.1:9", "m")])
