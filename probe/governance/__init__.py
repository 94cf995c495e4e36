"""The governance plane: operator changes to nodes, appkeys and config.

- `backends`: the MySQL, Redis and ZooKeeper connections, opened on first need;
- `nodes`: list nodes, change weights and switches (the audited node-change saga);
- `appkeys`: appkeys, the audit log, registry ACLs;
- `config`: the config center's keys and their MySQL history;
- `results`: the typed results of all of them;
- `describe`: those results as sentences and tables for people (CLI and console).

`probe.admin.Admin` is the façade over them.
"""
