"""Replication of a volume to a secondary: wire protocol (``protocol``), authentication
(``auth``); the links, sender and receiver build on them."""
