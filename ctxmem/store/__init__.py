"""Persistence in Redis: connection, key schema, tensor codec, records, and the landmark store."""
