"""The RPC wire plane: the provider's server and its pre-forked workers, codecs,
message limits, overload caps, client pools, TLS, peer warnings, and the bounded
HTTP listener that serves the console and `/metrics`."""
