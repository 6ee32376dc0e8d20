"""The program torchrun starts for each rank of a warm attempt (``ftrain.warm.WarmRanks``):
a small stand-in that hands the rank to an interpreter which imported the script's modules
ahead, and stands for it before torchrun.

torchrun runs it as ``--no-python PYTHON /…/ftrain/rankentry.py NAME SCRIPT ARGS…`` (by
path, standard library only: it starts in tens of milliseconds). It connects to the warm
ranks server on the abstract Unix socket ``NAME`` (``ftrain/spare.py --ranks``), sends its
argv, environment and folder with its standard streams (fds 0, 1, 2, as SCM_RIGHTS), so the
rank writes where torchrun's ``--redirects``/``--tee`` point and reads torchrun's variables
(RANK, LOCAL_RANK, TORCHELASTIC_ERROR_FILE …). It then relays the signals torchrun sends
(SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2) to the rank's process group and leaves as the
rank did: its exit status, or the same signal re-raised. torchrun sees and stops every
worker as usual::

    torchrun ─► rankentry (pid E) ══socket══► server ─fork─► rank (pid R, own session)
                   signals ─────────────────────────────────► killpg(R)
                   exit as R did ◄── "status S" ◄── waitpid(R)

No server (it died while it waited): the entry becomes the rank cold (``execv`` of
``PYTHON SCRIPT ARGS``). The server gone while the rank runs: the rank is killed, and the
entry dies by SIGKILL, which torchrun reports as such.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_rank: list[int] = []          # the rank's pid, once the server says it
_pending: list[int] = []       # signals that came before it


def _relay(signum: int, frame: object) -> None:
    if not _rank:
        _pending.append(signum)
        return
    try:
        os.killpg(_rank[0], signum)   # as torchrun stops a worker: its whole group
    except OSError:
        pass


def _cold(script_argv: list[str], why: str) -> None:
    os.write(2, f"[ftrain] warm rank {os.environ.get('LOCAL_RANK', '?')}: {why}; starting cold\n".encode())
    os.execv(sys.executable, [sys.executable, *script_argv])


def _leave(status: int) -> None:
    """Exit as the rank did (a ``waitpid`` status)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)         # a signal that does not kill (none of those a rank dies by)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def main(argv: list[str]) -> None:
    name, script_argv = argv[1], argv[2:]
    for sig in RELAYED:
        if signal.getsignal(sig) is not signal.SIG_IGN:   # ignored stays ignored, as for a cold rank
            signal.signal(sig, _relay)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect("\0" + name)
    except OSError as exc:
        sock.close()
        _cold(script_argv, f"no warm interpreter ({exc.strerror})")
    message = json.dumps({"argv": script_argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    try:
        socket.send_fds(sock, [len(message).to_bytes(4, "big") + message], [0, 1, 2])
    except OSError as exc:
        sock.close()
        _cold(script_argv, f"the warm interpreter did not take the rank ({exc.strerror})")
    buffer = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except OSError:
            chunk = b""
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            word, _, value = line.decode().partition(" ")
            if word == "pid":
                _rank.append(int(value))
                for signum in _pending:
                    _relay(signum, None)
            elif word == "status":
                _leave(int(value))
    # The server went away without the rank's status: nothing of the rank may outlive us.
    if _rank:
        try:
            os.killpg(_rank[0], signal.SIGKILL)
        except OSError:
            pass
        _leave(int(signal.SIGKILL))   # a status: killed by SIGKILL
    _cold(script_argv, "the warm interpreter left before it took the rank")


if __name__ == "__main__":
    main(sys.argv)
