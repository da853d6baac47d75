"""The kvrecall daemon: pools, sessions, policies, transports and the gRPC service."""
