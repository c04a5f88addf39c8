import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def new_kernel(tmp_path):
    """Make kernels on the FakeBackend over one database in the test's directory; each
    is closed (storage and memory) at the end."""
    from kernel.backends.fake import FakeBackend
    from kernel.kernel import Kernel
    from kernel.storage import Storage

    made: list[Kernel] = []

    def make(**options: Any) -> Kernel:
        kernel = Kernel(Storage(tmp_path / "aiosfs.db"), FakeBackend(), **options)
        made.append(kernel)
        return kernel

    yield make
    for kernel in made:
        kernel.storage.close()
        kernel.memory.store.close()
