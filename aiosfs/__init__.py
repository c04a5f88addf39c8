"""aiosfs: the filesystem face of the agent kernel. The only package that imports pyfuse3."""

__version__ = "0.1.0"
