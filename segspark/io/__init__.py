"""Readers and writers: the only place segspark touches storage."""
