"""moeblocks.runtime.malloc: when the allocator is left alone; reuse removes page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moeblocks.runtime import malloc as mc

LINUX = {"PATH": "/usr/bin"}


@pytest.mark.parametrize(
    ("environ", "platform", "reason"),
    [
        (LINUX, "linux", None),
        (LINUX, "darwin", "not Linux (darwin)"),
        (LINUX, "win32", "not Linux (win32)"),
        ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "linux", "MALLOC_TRIM_THRESHOLD_ is set"),
        ({"MALLOC_MMAP_THRESHOLD_": "0"}, "linux", "MALLOC_MMAP_THRESHOLD_ is set"),
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "linux", "jemalloc is preloaded"),
        ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, "linux", "tcmalloc is preloaded"),
        ({"LD_PRELOAD": "/opt/libfoo.so"}, "linux", None),  # not an allocator
    ],
)
def test_untouched_reason(environ: dict[str, str], platform: str, reason: str | None) -> None:
    assert mc.malloc_untouched_reason(environ, platform) == reason


def test_user_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: object) -> None:
        raise AssertionError("mallopt must not be looked up when the user chose settings")

    monkeypatch.setattr(mc.ctypes, "CDLL", fail)
    assert mc.configure_malloc({"MALLOC_TOP_PAD_": "0"}) is False


# 40 MiB is above glibc's largest dynamic mmap threshold (32 MiB): with the defaults every
# such block is a fresh mapping whose pages fault in again; kept in the heap, they do not
# once the heap has grown enough free space for the aligned request (a few rounds).
_FAULTS = """
import resource, sys
from moeblocks.runtime.malloc import configure_malloc
if sys.argv[1] == "on":
    assert configure_malloc({})
import torch
faults = []
for _ in range(10):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(10 * 1024 * 1024).fill_(1.0)  # 40 MiB, every page touched
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(sum(faults[-4:]))  # the steady state
"""


@pytest.mark.skipif(mc.malloc_untouched_reason() is not None, reason="needs glibc, no overrides")
def test_reuse_removes_page_faults() -> None:
    def faults(mode: str) -> int:
        cmd = [sys.executable, "-c", _FAULTS, mode]
        return int(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    pages = 4 * 40 * 1024 * 1024 // 4096  # four 40 MiB blocks, 4 KiB pages
    assert faults("on") < pages // 20
    # Without it the blocks fault in again (huge pages, where the kernel uses them for
    # this mapping, fault once per 2 MiB: still 10x more than the kept heap).
    assert faults("off") > 10 * max(1, faults("on"))


def test_cli_sets_allocator_only_for_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    from moeblocks import cli
    from moeblocks.runtime import threads as th

    calls: list[str] = []
    monkeypatch.setattr(mc, "configure_malloc", lambda: calls.append("malloc") or True)
    monkeypatch.setattr(th, "configure_threads", lambda n=None: calls.append("threads") or 1)
    monkeypatch.setattr(sys, "argv", ["moeblocks", "--version"])
    with pytest.raises(SystemExit):  # --version exits while parsing: nothing set yet
        cli.main()
    assert calls == []
    monkeypatch.setattr(cli, "_parser", lambda: _FakeParser())
    cli.main()  # argv None: the console script
    assert calls == ["malloc", "threads"]
    calls.clear()
    cli.main([])  # from Python: the process is not ours
    assert calls == []


class _FakeParser:
    """Parses to a command that does nothing, to test main()'s set-up alone."""

    def parse_args(self, argv: list[str] | None) -> object:
        import argparse

        return argparse.Namespace(threads=None, handler=lambda args: 0)
