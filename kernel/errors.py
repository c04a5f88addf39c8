"""The kernel's two error channels.

`KernelError` is a caller's mistake or a refused request: it carries an errno and a
message meant for the user, and the filesystem turns it into that errno. Anything
else raised inside the kernel is a bug; the filesystem logs it and answers EIO.
"""

import errno as _errno


class KernelError(Exception):
    """A request the kernel refuses, with the errno a syscall should return."""

    audited = False  # True when the component that refused it already wrote its `deny` audit line

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(f"{errno_name(errno)}: {message}")
        self.errno = errno
        self.message = message


def errno_name(code: int) -> str:
    """`EINVAL` for errno.EINVAL; a number for codes without a name."""
    return _errno.errorcode.get(code, str(code))
