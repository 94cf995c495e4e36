"""`ZooKeeperEnsemble`: several ZooKeeper servers forming one ensemble."""

import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..dev.stack import (LOOPBACK, StackError, _four_letter_word, _free_ports, _is_alive,
                            _locked, _read_json, _Recorded, _start_servers, _stop_servers,
                            _write_file, _ZooKeeperServer)

_POLL_INTERVAL = 0.1


def zookeeper_mode(port: int) -> Optional[str]:
    """"leader", "follower" or "standalone" if the server on 127.0.0.1:`port`
    serves requests, else None."""
    for line in _four_letter_word(port, "srvr").splitlines():
        if line.startswith("Mode:"):
            return line.split(":", 1)[1].strip()
    return None


class _EnsembleMember(_ZooKeeperServer):
    """One ZooKeeper server of an ensemble: its myid and every member's peer ports."""

    def __init__(self, home: str, port: int, myid: int,
                 peers: Sequence[Tuple[int, int, int]]) -> None:
        super().__init__(home, port)
        self.myid = myid
        self.peers = list(peers)  # (myid, quorum port, election port) of every member

    def ports(self) -> List[int]:
        own = [(quorum, election) for myid, quorum, election in self.peers
               if myid == self.myid]
        return [self.port] + [port for pair in own for port in pair]

    def config_lines(self) -> List[str]:
        return super().config_lines() + [
            "server.%d=%s:%d:%d" % (myid, LOOPBACK, quorum, election)
            for myid, quorum, election in self.peers]

    def prepare(self) -> None:
        super().prepare()
        _write_file(os.path.join(self.data_dir, "myid"), "%d\n" % self.myid)

    def answers(self) -> bool:
        # A member answers `ruok` even without a quorum; `srvr` only with one.
        return self.mode() in ("leader", "follower", "standalone")

    def mode(self) -> Optional[str]:
        return zookeeper_mode(self.port)


class ZooKeeperEnsemble(_Recorded):
    """`size` ZooKeeper servers forming one ensemble on free loopback ports.

    Members are indexed from 0 (their ZooKeeper myid is index + 1). Ports are kept
    in ``ensemble.json`` in `state_dir`, so a killed member restarts on its own.
    ``with ZooKeeperEnsemble(path) as ensemble:`` starts it and always stops it.

    :param state_dir: folder for the members' data, logs and ``ensemble.json``.
    :param size: number of members (3 tolerates the loss of one).
    """

    def __init__(self, state_dir: str, size: int = 3) -> None:
        if size < 1:
            raise StackError("an ensemble needs at least one member, got size=%r"
                             % (size,))
        self.state_dir = os.path.abspath(os.path.expanduser(state_dir))
        self._record_path = os.path.join(self.state_dir, "ensemble.json")
        record = _read_json(self._record_path)
        members = record.get("members", [])
        if len(members) != size and any(
                _is_alive(entry.get("pid"), entry.get("start_time")) for entry in members):
            raise StackError("%s runs an ensemble of %d members, not %d; call down() "
                             "on it first" % (self.state_dir, len(members), size))
        layout: List[Tuple[int, int, int]]  # (client, quorum, election) port per member
        if len(members) == size:
            layout = [(entry["port"], entry["quorum_port"], entry["election_port"])
                      for entry in members]
        else:
            ports = _free_ports(3 * size)
            layout = [(ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]) for i in range(size)]
        peers = [(index + 1, quorum, election)
                 for index, (_, quorum, election) in enumerate(layout)]
        self._members = [
            _EnsembleMember(os.path.join(self.state_dir, "zk%d" % (index + 1)),
                            client, myid=index + 1, peers=peers)
            for index, (client, _, _) in enumerate(layout)]
        self._restore(record)

    def __repr__(self) -> str:
        return "ZooKeeperEnsemble(%r, hosts=%r)" % (self.state_dir, self.hosts)

    @property
    def hosts(self) -> str:
        """The kazoo/ZooKeeper connect string: "127.0.0.1:p1,127.0.0.1:p2,..."."""
        return ",".join("%s:%d" % (LOOPBACK, member.port) for member in self._members)

    @property
    def size(self) -> int:
        return len(self._members)

    def up(self, timeout: float = 60) -> None:
        """Start the members that are not running; wait until all serve requests."""
        with self._recorded():
            _start_servers(self._members, timeout,
                           "the ensemble in %s" % self.state_dir)

    def down(self, wipe: bool = False) -> None:
        """Stop every member; with ``wipe=True`` also delete their data."""
        if not os.path.isdir(self.state_dir):
            return
        with self._recorded():
            _stop_servers(self._members)
        if wipe:
            with _locked(self.state_dir):
                for member in self._members:
                    shutil.rmtree(member.home, ignore_errors=True)

    def status(self) -> List[Dict[str, Any]]:
        """Per member: running, pid, port, address and mode ("leader", ...)."""
        self._restore(_read_json(self._record_path))
        result = []
        for member in self._members:
            alive = member.is_alive()
            result.append({
                "running": alive and member.answers(),
                "pid": member.pid if alive else None,
                "port": member.port,
                "address": "%s:%d" % (LOOPBACK, member.port),
                "mode": member.mode() if alive else None,
            })
        return result

    def leader(self, timeout: float = 10) -> int:
        """Index of the current leader, waiting up to `timeout` s for an election."""
        deadline = time.monotonic() + timeout
        while True:
            for index, member in enumerate(self._members):
                if member.mode() in ("leader", "standalone"):
                    return index
            if time.monotonic() >= deadline:
                raise StackError("no ZooKeeper leader among %s after %.0f s; see the "
                                 "logs under %s" % (self.hosts, timeout, self.state_dir))
            time.sleep(_POLL_INTERVAL)

    def kill(self, index: int) -> None:
        """SIGKILL one member, as a crash would."""
        self._control(index, force=True)

    def stop(self, index: int) -> None:
        """Stop one member gracefully."""
        self._control(index, force=False)

    def start(self, index: int, timeout: float = 60) -> None:
        """Start one member again on its ports and wait until it has rejoined."""
        member = self._member(index)
        with self._recorded():
            _start_servers([member], timeout, "the ensemble in %s" % self.state_dir)

    def _control(self, index: int, force: bool) -> None:
        member = self._member(index)
        with self._recorded():
            _stop_servers([member], force=force)

    def _member(self, index: int) -> _EnsembleMember:
        if not 0 <= index < len(self._members):
            raise StackError("no ensemble member %r; indexes run from 0 to %d"
                             % (index, len(self._members) - 1))
        return self._members[index]

    def _restore(self, record: Dict[str, Any]) -> None:
        entries = record.get("members", [])
        for index, member in enumerate(self._members):
            entry = entries[index] if index < len(entries) else None
            if entry and entry.get("port") == member.port:
                member.restore(entry)
            else:
                member.pid = member.start_time = None

    def _save(self) -> None:
        members = []
        for member in self._members:
            entry = member.record()
            entry["quorum_port"], entry["election_port"] = member.ports()[1:3]
            members.append(entry)
        _write_file(self._record_path, json.dumps({"members": members}, indent=2) + "\n")
