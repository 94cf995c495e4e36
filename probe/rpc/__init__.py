"""The RPC wire plane: the provider's server, codecs, message limits, pools, TLS."""
