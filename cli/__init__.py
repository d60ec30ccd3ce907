"""Thin click commands: they parse options and call the library."""
