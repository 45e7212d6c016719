"""One study, one driver: the driver lock in the storage folder (no Ray needed). Liveness is
checked against real processes: one that has exited, this one, and racing subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fbft.study import lock
from fbft.study.lock import LOCK_FILE, Holder, StudyBusyError

REPO = Path(__file__).resolve().parents[1]


def _plant(storage: Path, holder: Holder, age: float = 0.0) -> Path:
    path = storage / "s" / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder.__dict__))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def _exited_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_driver_is_refused_naming_host_and_pid_until_the_first_releases(tmp_path):
    held = lock.acquire(str(tmp_path), "s")
    try:
        saved = json.loads((tmp_path / "s" / LOCK_FILE).read_text())
        assert (saved["host"], saved["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(StudyBusyError) as refused:
            lock.acquire(str(tmp_path), "s")
        text = str(refused.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in text
        assert "\n" not in text and "already running" in text
    finally:
        lock.release_all()
    assert not (tmp_path / "s" / LOCK_FILE).exists() and held not in lock._held
    lock.acquire(str(tmp_path), "s")
    lock.release_all()


@pytest.mark.parametrize(
    ("holder", "age", "why"),
    [
        (lambda: Holder(socket.gethostname(), _exited_pid(), time.time()), 0, "has exited"),
        (  # this process's pid, started at another moment: the pid was reused
            lambda: Holder(socket.gethostname(), os.getpid(), time.time(), lock._boot_id(), 1),
            0,
            "belongs to another process",
        ),
        (lambda: Holder("elsewhere", 1, time.time() - 7200), 7200, "no heartbeat for 7200 s"),
        (lambda: Holder(socket.gethostname(), 1, time.time(), "another-boot"), 0, "rebooted"),
    ],
)
def test_stale_locks_are_taken_over_with_a_message(tmp_path, capsys, holder, age, why):
    gone = holder()
    _plant(tmp_path, gone, age)
    lock.acquire(str(tmp_path), "s")
    try:
        out = capsys.readouterr().out
        assert f"taking over the stale lock of pid {gone.pid} on host {gone.host}" in out
        assert why in out
        assert json.loads((tmp_path / "s" / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release_all()


def test_a_live_lock_of_another_host_is_kept_until_its_age_limit(tmp_path, monkeypatch, capsys):
    other = Holder("elsewhere", 4242, time.time() - 120)
    path = _plant(tmp_path, other, age=120)
    with pytest.raises(StudyBusyError, match="pid 4242 on host elsewhere"):
        lock.acquire(str(tmp_path), "s")
    monkeypatch.setenv(lock.STALE_ENV, "60")  # the explicit limit: 120 s without heartbeat
    lock.acquire(str(tmp_path), "s")
    lock.release_all()
    assert "limit 60 s" in capsys.readouterr().out and not path.exists()


def test_a_live_lock_of_this_host_is_never_taken_over(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = lock._ticks(sleeper.pid)
        _plant(tmp_path, Holder(socket.gethostname(), sleeper.pid, 0.0, lock._boot_id(), ticks))
        with pytest.raises(StudyBusyError, match=f"pid {sleeper.pid} on host"):
            lock.acquire(str(tmp_path), "s", stale_after=0)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_garbage_in_place_of_the_lock_is_replaced(tmp_path, capsys):
    path = tmp_path / "s" / LOCK_FILE
    path.parent.mkdir()
    path.write_text("{not json")
    os.utime(path, (0, 0))
    lock.acquire(str(tmp_path), "s")
    lock.release_all()
    assert "not a valid lock file" in capsys.readouterr().out


def test_drivers_racing_for_a_stale_lock_get_exactly_one_holder(tmp_path):
    """Eight processes start together on a lock left by an exited driver: one holds it, every
    other one is refused naming that one."""
    _plant(tmp_path, Holder(socket.gethostname(), _exited_pid(), time.time()))
    go = tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import os, time
        from pathlib import Path
        from fbft.study import lock
        while not Path({str(go)!r}).exists():
            time.sleep(0.005)
        try:
            lock.acquire({str(tmp_path)!r}, "s")
        except lock.StudyBusyError as err:
            print("busy", err)
        else:
            print("held", os.getpid())
            time.sleep(3)
            lock.release_all()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    time.sleep(2)  # all imported and polling
    go.touch()
    outs = [p.communicate(timeout=60)[0] for p in procs]
    held = [o.split("held ")[1].split()[0] for o in outs if "held " in o]
    busy = [o for o in outs if "busy " in o]
    assert len(held) == 1 and len(busy) == 7, outs
    assert all(f"pid {held[0]} on host" in o for o in busy), outs
    assert sum("taking over the stale lock" in o for o in outs) == 1, outs
    assert not (tmp_path / "s" / LOCK_FILE).exists()
    assert [p.name for p in (tmp_path / "s").iterdir()] == []  # no temporary file left
