"""The governance plane: operator changes to nodes, appkeys and config."""
