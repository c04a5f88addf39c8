"""tools/ on a real mount with the fake backend: listing, schemas, calls from bash,
errors that make `cat` fail, acting for an agent, external tools and reload."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import Mount, mounted, needs_fuse, needs_root, sh

pytestmark = [needs_fuse, pytest.mark.mount]

IS_ROOT = os.geteuid() == 0
as_root = needs_root
BUILTINS = ["calculator", "clock", "memory_read", "memory_search", "memory_write"]
WHOAMI = """\
#!/usr/bin/env python3
import json, os, sys
request = json.load(sys.stdin)
print(json.dumps({"uid": os.getuid(), "request": request}))
"""


def add_tool(directory: Path, name: str, script: str) -> None:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(script))
    path.chmod(0o755)
    (directory / f"{name}.json").write_text(json.dumps({"description": f"test tool {name}", "command": [f"./{name}.py"]}))


@pytest.fixture(scope="module")
def tools_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="aiosfs-tools-", dir="/tmp"))
    path.chmod(0o755)  # nobody runs the tools: it must reach them
    add_tool(path, "whoami", WHOAMI)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory, tools_dir: Path) -> Iterator[Mount]:
    with mounted(tmp_path_factory.mktemp("tools"), "--backend", "fake", "--tools", str(tools_dir)) as mount:
        yield mount


def as_user(uid: int, script: str) -> subprocess.CompletedProcess[str]:
    command = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups", "bash", "-c", script]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def call_script(tool: Path, request: object) -> str:
    """bash that writes one call to a tool file and cats the answer, then prints cat's status."""
    return f"exec 3<>{tool}; echo '{json.dumps(request)}' >&3; cat <&3; echo \"rc=$?\""


def test_tools_lists_each_tool_and_its_schema(fs: Mount) -> None:
    tools = fs.root / "tools"
    names = sorted(os.listdir(tools))
    assert names == sorted([*BUILTINS, "whoami", *(f"{n}.schema" for n in [*BUILTINS, "whoami"])])
    assert os.stat(tools).st_mode & 0o7777 == 0o555
    assert os.stat(tools / "calculator").st_mode & 0o7777 == 0o666
    assert os.stat(tools / "calculator.schema").st_mode & 0o7777 == 0o444
    listed = sh(f"ls {tools}")
    assert listed.returncode == 0 and "calculator.schema" in listed.stdout
    assert not (tools / "nothing").exists() and not (tools / "nothing.schema").exists()
    assert "tools/" in (fs.root / "README").read_text()


def test_a_schema_file_describes_the_tool(fs: Mount) -> None:
    described = json.loads(sh(f"cat {fs.root}/tools/calculator.schema").stdout)
    assert described["name"] == "calculator" and "arithmetic" in described["description"]
    assert described["schema"]["required"] == ["expression"]
    with pytest.raises(PermissionError):
        os.open(fs.root / "tools" / "calculator.schema", os.O_WRONLY)  # a snapshot, for root too


def test_calling_the_calculator_from_bash(fs: Mount) -> None:
    tool = fs.root / "tools" / "calculator"
    script = f"""
    exec 3<>{tool}
    echo '{{"expression": "6*7"}}' >&3; cat <&3
    echo '{{"expression": "2**10"}}' >&3; cat <&3
    """
    result = sh(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == '{"ok": true, "result": {"result": 42}}\n{"ok": true, "result": {"result": 1024}}\n'
    fd = os.open(tool, os.O_RDWR)
    try:
        with pytest.raises(OSError) as seek:
            os.lseek(fd, 0, os.SEEK_SET)
        assert seek.value.errno == errno.ESPIPE
        assert os.read(fd, 100) == b""  # nothing written: nothing to answer
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "request_text, code, words",
    [
        ("six times seven", "EINVAL", "JSON"),
        ('{"expression": 42}', "EINVAL", "42 is not of type 'string'"),
        ('{"expression": "1/0"}', "EINVAL", "division by zero"),
        ('{"agent": "nobody-here", "arguments": {"expression": "1"}}', "ENOENT", "nobody-here"),
    ],
)
def test_a_failed_call_is_an_error_line_then_cat_fails(fs: Mount, request_text: str, code: str, words: str) -> None:
    result = sh(f"exec 3<>{fs.root}/tools/calculator; echo '{request_text}' >&3; cat <&3; echo \"rc=$?\"")
    line, status = result.stdout.splitlines()
    answer = json.loads(line)
    assert answer["ok"] is False and answer["errno"] == code and words in answer["error"]
    assert status == "rc=1" and os.strerror(getattr(errno, code)) in result.stderr


@as_root
def test_a_memory_tool_acts_for_an_agent_whose_prompt_the_caller_may_write(fs: Mount) -> None:
    assert as_user(65534, f"mkdir {fs.agents}/keeper").returncode == 0
    tool = fs.root / "tools" / "memory_write"
    request = {"agent": "keeper", "arguments": {"path": "notes.md", "content": "buy milk\n"}}
    result = as_user(65534, call_script(tool, request))
    assert result.stdout == '{"ok": true, "result": {"path": "notes.md", "bytes": 9}}\nrc=0\n', result.stderr
    note = fs.agents / "keeper" / "memory" / "notes.md"
    assert note.read_text() == "buy milk\n"
    assert (os.stat(note).st_uid, os.stat(note).st_mode & 0o777) == (65534, 0o644)
    stranger = as_user(65533, call_script(tool, {"agent": "keeper", "arguments": {"path": "notes.md", "content": "x"}}))
    line, status = stranger.stdout.splitlines()
    assert json.loads(line)["errno"] == "EACCES" and status == "rc=1"
    assert note.read_text() == "buy milk\n"
    alone = sh(call_script(tool, {"path": "notes.md", "content": "x"}))  # no agent: nothing to act for
    assert json.loads(alone.stdout.splitlines()[0])["errno"] == "EINVAL"


def test_an_external_tool_through_the_mount(fs: Mount) -> None:
    fs.agent("asker")
    result = sh(call_script(fs.root / "tools" / "whoami", {"agent": "asker", "arguments": {"city": "Oslo"}}))
    line, status = result.stdout.splitlines()
    answer = json.loads(line)
    assert status == "rc=0" and answer["ok"] is True
    assert answer["result"]["request"] == {"tool": "whoami", "arguments": {"city": "Oslo"}, "agent": "asker", "uid": os.geteuid()}
    if IS_ROOT:
        assert answer["result"]["uid"] == 65534  # the daemon is root: the tool runs as nobody


def test_the_state_directory_is_private(fs: Mount) -> None:
    assert os.stat(fs.state).st_mode & 0o777 == 0o700


def test_tools_reload_through_kernel_ctl(fs: Mount, tools_dir: Path) -> None:
    tools = fs.root / "tools"
    add_tool(tools_dir, "late", "#!/usr/bin/env python3\nprint('\"late\"')\n")
    assert "late" not in os.listdir(tools)
    assert sh(f"echo 'tools reload' > {fs.root}/kernel/ctl").returncode == 0
    assert {"late", "late.schema"} <= set(os.listdir(tools))
    assert sh(call_script(tools / "late", {})).stdout == '{"ok": true, "result": "late"}\nrc=0\n'
    fd = os.open(tools / "late", os.O_RDWR)
    try:
        (tools_dir / "late.json").unlink()
        assert sh(f"echo 'tools reload' > {fs.root}/kernel/ctl").returncode == 0
        assert not (tools / "late").exists() and "late" not in os.listdir(tools)
        os.write(fd, b"{}")
        assert json.loads(os.read(fd, 4096))["errno"] == "ENOENT"  # the open file of a dropped tool
        with pytest.raises(FileNotFoundError):
            os.read(fd, 4096)
    finally:
        os.close(fd)
    if IS_ROOT:
        refused = as_user(65534, f"echo 'tools reload' > {fs.root}/kernel/ctl")
        assert refused.returncode != 0 and "Operation not permitted" in refused.stderr  # anyone may write kernel/ctl; this verb is root's
