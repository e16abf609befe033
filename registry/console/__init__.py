"""The operator console: ``hapair`` (status, switchover, takeover, drain, drill, top...).

A client of etcd and of the registry's HTTP API; the registry's server never imports it.
"""
