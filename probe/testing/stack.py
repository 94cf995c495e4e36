"""`FaultStack`: the development stack with per-component fault control."""

from ..dev.stack import (COMPONENTS, Stack, StackError, _Server, _start_servers,
                            _stop_servers)


class FaultStack(Stack):
    """A `Stack` whose components a test can stop, kill and start one at a time.

    Takes the same arguments as `Stack` (tests pass ``ports="free"`` and a
    temporary folder). Each method holds the state folder's lock, like `up()`.
    """

    def stop(self, component: str) -> None:
        """Stop one component gracefully (SIGTERM, SIGKILL if it lingers).

        :param component: "zookeeper", "redis" or "mysql".
        """
        self._control(component, force=False)

    def kill(self, component: str) -> None:
        """SIGKILL one component, as a crash would.

        :param component: "zookeeper", "redis" or "mysql".
        """
        self._control(component, force=True)

    def start(self, component: str, wipe: bool = False, timeout: float = 60) -> None:
        """Start one component again on its port and wait until it answers.

        :param component: "zookeeper", "redis" or "mysql".
        :param wipe: stop it and empty its data first (a server that lost its disk).
        :param timeout: seconds to wait for it to answer.
        """
        server = self._server(component)
        with self._recorded():
            if wipe:
                _stop_servers([server])
                server.wipe()
            _start_servers([server], timeout, "the stack in %s" % self.state_dir)
            if component == "mysql":
                self._create_probe_database()
            self._write_config()

    def _control(self, component: str, force: bool) -> None:
        server = self._server(component)
        with self._recorded():
            _stop_servers([server], force=force)

    def _server(self, component: str) -> _Server:
        try:
            return self._servers[component]
        except KeyError:
            raise StackError("unknown component %r; choose one of %s"
                             % (component, ", ".join(COMPONENTS))) from None
