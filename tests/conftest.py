import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def require_fuse() -> None:
    """For tests that mount (`mounting.needs_fuse`): skipped where /dev/fuse is missing,
    failed there in CI (CI=true), where a skip would hide that nothing was mounted.
    Session-scoped, so that it runs before any module's mount fixture."""
    from mounting import HAVE_FUSE, IN_CI

    if HAVE_FUSE:
        return
    reason = "/dev/fuse is missing: this machine cannot mount FUSE filesystems"
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the mount tests must run; start the container with --device /dev/fuse --cap-add SYS_ADMIN)")
    pytest.skip(reason)


@pytest.fixture
def require_root() -> None:
    """For tests that switch users (`mounting.needs_root`): skipped without root, failed
    then in CI (CI=true), where a skip would hide that access control went untested."""
    import os

    from mounting import IN_CI

    if os.geteuid() == 0:
        return
    reason = "switching to other users needs root"
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the access tests must run; run the tests as root)")
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers follow what a test uses, however deep in its fixtures: `model` for the
    embedded model (the `model` fixture), `mount` for a FUSE mount (`require_fuse`)."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "model" in names:
            item.add_marker(pytest.mark.model)
        if "require_fuse" in names:
            item.add_marker(pytest.mark.mount)


@pytest.fixture
def new_kernel(tmp_path):
    """Make kernels on the FakeBackend over one database in the test's directory; each
    is closed (storage and memory) at the end."""
    from kernel.cores.backends.fake import FakeBackend
    from kernel.kernel import Kernel
    from kernel.storage.database import Storage

    made: list[Kernel] = []

    def make(**options: Any) -> Kernel:
        kernel = Kernel(Storage(tmp_path / "aiosfs.db"), FakeBackend(), **options)
        made.append(kernel)
        return kernel

    yield make
    for kernel in made:
        kernel.close()
        kernel.memory.store.close()


@pytest.fixture(scope="module")
def model() -> Path:
    """The shipped model file (SmolLM2-135M-Instruct Q4_1), the same on every machine whether or
    not `python -m setup.model encode` made its Q8_0 re-encoding the default: greedy answers,
    which some tests check, depend on the weights. A test that needs it fails (never skips)
    when it is missing."""
    from setup.model import shipped_model_path

    path = shipped_model_path()
    if not path.is_file():
        pytest.fail(f"the embedded model is not installed at {path}: run scripts/setup")
    return path


@pytest.fixture(scope="module")
def fs(tmp_path_factory):
    """A real mount on the fast fake backend (it answers `turn N: <LAST USER MESSAGE IN
    UPPER CASE>`), one per test module; a module that needs other options defines its own."""
    from mounting import mounted

    with mounted(tmp_path_factory.mktemp("fs"), "--backend", "fake", "--fake-delay", "0.002") as mount:
        yield mount


@pytest.fixture
def agent(fs, request):
    """A new agent on `fs`, named after the test."""
    return fs.agent(request.node.name.replace("[", "-").replace("]", ""))
