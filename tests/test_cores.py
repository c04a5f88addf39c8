"""Several LLM cores in one mount: the local model and a remote OpenAI-compatible
server (a real `python -m llama_cpp.server` on loopback), chosen with `model=`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import Mount, mounted, needs_fuse, sh
from test_remote import LlamaServer, llama_server, server  # noqa: F401 (fixtures)

pytestmark = [needs_fuse, pytest.mark.mount, pytest.mark.model]


def config_for(base: Path, remote: LlamaServer, name: str = "far") -> Path:
    path = base / "aiosfs.toml"
    path.write_text(
        f'route = "default"\n\n[[remote]]\nname = "{name}"\nbase_url = "{remote.base_url}"\nmodel = "smollm2"\nmax_in_flight = 4\ntimeout = 120\n'
    )
    return path


@pytest.fixture
def remote_mount(tmp_path: Path, server: LlamaServer) -> Iterator[Mount]:  # noqa: F811
    with mounted(tmp_path, "--backend", "fake", "--config", str(config_for(tmp_path, server))) as mount:
        yield mount


def ask(agent: Path, question: str) -> tuple[str, str]:
    result = sh(f"echo '{question}' > {agent}/prompt && cat {agent}/output; echo; cat {agent}/status", timeout=300)
    assert result.returncode == 0, result.stderr
    answer, _, status = result.stdout.rstrip("\n").rpartition("\n")
    return answer.strip(), status


def test_an_agent_picks_the_remote_core_with_model(remote_mount: Mount) -> None:
    models = (remote_mount.root / "kernel" / "models").read_text().splitlines()
    assert models[0].startswith("fake fake ") and "default" in models[0]
    assert models[1].split()[:2] == ["far", "openai"] and "remote" in models[1]
    agent = remote_mount.agent("far-agent")
    (agent / "config").write_text("model=far\ntemperature=0\nmax_tokens=24\n")
    answer, status = ask(agent, "What is the capital of France?")
    assert status.startswith("done") and answer and not answer.startswith("turn 1:")  # the real model, not the fake
    local = remote_mount.agent("near-agent")  # no model: the route's default, the local core
    answer, status = ask(local, "hello")
    assert answer == "turn 1: HELLO" and status.startswith("done")
    stats = (remote_mount.root / "kernel" / "stats").read_text()
    assert "far.requests 1" in stats


def test_unknown_models_are_refused_at_the_write(remote_mount: Mount) -> None:
    agent = remote_mount.agent("picky")
    bad = sh(f"echo model=nowhere > {agent}/config; cat {agent}/error")
    assert "EINVAL" in bad.stdout and "nowhere" in bad.stdout
    refused = sh(f"""echo '{{"prompt": "x", "model": "elsewhere"}}' > {agent}/prompt; cat {agent}/error; cat {agent}/status""")
    assert "EINVAL" in refused.stdout and "elsewhere" in refused.stdout  # refused at the write; error says it too
    assert refused.stdout.rstrip().endswith("idle -")  # no job was made


def test_two_mounts_share_one_server(tmp_path: Path, server: LlamaServer) -> None:  # noqa: F811
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    with mounted(first, "--backend", "fake", "--config", str(config_for(first, server))) as a:
        with mounted(second, "--backend", "fake", "--config", str(config_for(second, server))) as b:
            agents = [a.agent("left"), b.agent("right")]
            for agent in agents:
                (agent / "config").write_text("model=far\ntemperature=0\nmax_tokens=16\n")
            script = " & ".join(
                f"(echo 'Say hi.' > {agent}/prompt && cat {agent}/output > {agent.parent.parent.parent}/answer-{agent.name})" for agent in agents
            )
            result = sh(f"{script}; wait", timeout=300)
            assert result.returncode == 0, result.stderr
            for agent in agents:
                assert (agent / "status").read_text().startswith("done")
                assert (agent.parent.parent.parent / f"answer-{agent.name}").read_text().strip()


def test_a_second_local_model_loads_and_unloads_at_run_time(tmp_path: Path) -> None:
    from setup.model import shipped_model_path

    config = tmp_path / "aiosfs.toml"
    config.write_text(f'[[local]]\nname = "second"\npath = "{shipped_model_path()}"\nthreads = 2\nctx = 512\nslots = 2\nload = false\n')
    with mounted(tmp_path, "--backend", "fake", "--config", str(config)) as mount:
        models = mount.root / "kernel" / "models"
        assert "second llama.cpp - 0 - unloaded" in models.read_text()
        agent = mount.agent("second-user")
        (agent / "config").write_text("model=second\ntemperature=0\nmax_tokens=16\n")
        early = sh(f"echo hi > {agent}/prompt; cat {agent}/error")
        assert "EAGAIN" in early.stdout and "load second" in early.stdout
        assert sh(f"echo load second > {mount.root}/kernel/ctl").returncode == 0
        assert "second llama.cpp" in models.read_text() and " loaded " in models.read_text().splitlines()[1]
        answer, status = ask(agent, "What is the capital of France?")
        assert status.startswith("done") and answer and not answer.startswith("turn 1:")
        assert sh(f"echo unload second > {mount.root}/kernel/ctl").returncode == 0
        assert "unloaded" in models.read_text()


def test_through_the_mount_a_remote_answer_streams_and_a_dead_server_is_eio_until_it_is_back(remote_mount: Mount, server: LlamaServer) -> None:  # noqa: F811
    agent = remote_mount.agent("streamer")
    (agent / "config").write_text("model=far\ntemperature=0\nmax_tokens=48\nignore_eos=on\n")
    (agent / "prompt").write_text("Count from one to twenty in words.")
    fd = os.open(agent / "output", os.O_RDONLY)
    try:
        chunks = list(iter(lambda: os.read(fd, 65536), b""))
    finally:
        os.close(fd)
    assert len(chunks) >= 2 and all(chunks)  # bytes came before the end of the answer
    server.kill()
    answer, status = ask(agent, "Are you there?")
    assert status.startswith("error") and "EIO" in (agent / "error").read_text()
    server.start()
    answer, status = ask(agent, "Are you back?")
    assert status.startswith("done") and answer
