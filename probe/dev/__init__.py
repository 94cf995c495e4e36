"""Dev tooling: the local stack of real ZooKeeper, Redis and MariaDB processes behind
`probe stack` (`stack`), and the certificates of its secured variant (`certs`)."""
