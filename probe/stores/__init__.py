"""The storage plane: MySQL (appkeys, config history, console users) and Redis."""
