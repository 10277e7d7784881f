"""Persistence in Redis: connections (this module's `connection`); records and codecs come with the landmark store."""
