"""The ZooKeeper plane: sessions, the mirror engine, registration, ACLs."""
