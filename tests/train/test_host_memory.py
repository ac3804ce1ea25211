"""keep_freed_host_memory: glibc accepts the settings, and freed large blocks are reused."""

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from deepseek_moe.train.host_memory import keep_freed_host_memory

GLIBC = ctypes.util.find_library("c") is not None and sys.platform.startswith("linux")

# A child process (settings are process-wide): allocate, free and allocate again an 8 MB block
# and report whether the second allocation got the same address. With glibc's defaults the
# block is an mmap returned to the kernel on free; kept in the heap, it is reused.
_CHILD = """
import ctypes, sys
from deepseek_moe.train.host_memory import keep_freed_host_memory
if sys.argv[1] == "tuned":
    assert keep_freed_host_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
big = 8 * 1024 * 1024
a = libc.malloc(big); libc.free(a)
small = libc.malloc(64)  # keeps the freed block from merging into the top of the heap only
b = libc.malloc(big)
print("reused" if a == b else "fresh")
"""


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc-only")
def test_glibc_accepts_the_settings():
    assert keep_freed_host_memory() is True


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc-only")
@pytest.mark.parametrize("mode,expected", [("default", "fresh"), ("tuned", "reused")])
def test_large_blocks_are_kept_for_reuse(mode, expected):
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == expected
