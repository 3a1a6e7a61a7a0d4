"""hivenode: the HiveMind node agent (libp2p swarm daemon for federated and distributed ML)."""

__version__ = "0.1.0"
