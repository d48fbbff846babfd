"""Run a command on a pseudo-terminal and count the lines it leaves on the screen.

:func:`run_on_terminal` gives the child a real terminal (stdin, stdout and stderr on one pty of
``cols`` x ``rows``), so progress bars draw exactly as they would for a user;
:func:`screen_lines` replays the output like a terminal does (carriage returns overwrite, long
lines wrap at ``cols``, cursor-up and erase-line sequences as tqdm writes them) and returns the
lines left on the screen.
"""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

CSI = re.compile(r"\x1b\[(\d*)([A-Za-z])")


def run_on_terminal(cmd: list[str], *, env: dict | None = None, cwd: str | None = None,
                    timeout: float = 600, cols: int = 120, rows: int = 40) -> tuple[int, str]:
    """(exit code, everything the command wrote to its terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**(env or os.environ), "COLUMNS": str(cols), "LINES": str(rows), "TERM": "xterm"}
    env.pop("RECO_PROGRESS", None)
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                            close_fds=True, start_new_session=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:                     # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            raise TimeoutError(f"{cmd} still running after {timeout} s")
        return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


def screen_lines(text: str, cols: int = 120) -> list[str]:
    """The lines ``text`` leaves on a terminal ``cols`` wide (scrolled-off lines included)."""
    lines, row, col = [[]], 0, 0
    i = 0
    while i < len(text):
        ch = text[i]
        m = CSI.match(text, i) if ch == "\x1b" else None
        if m:
            n = int(m.group(1) or 1)
            if m.group(2) == "A":
                row = max(0, row - n)
            elif m.group(2) == "K":
                del lines[row][col:]
            i = m.end()
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row, col = row + 1, 0
        elif ch >= " " or ch == "\t":
            if col >= cols:
                row, col = row + 1, 0
            while len(lines) <= row:
                lines.append([])
            line = lines[row]
            line.extend(" " * (col + 1 - len(line)))
            line[col] = ch
            col += 1
        while len(lines) <= row:
            lines.append([])
        i += 1
    out = ["".join(line).rstrip() for line in lines]
    while out and not out[-1]:
        out.pop()
    return out
