"""Settings fingerprints: how a resumable job tells its earlier output from a stale one.

A job step stores the hash of the settings that produced its output next to the output
(``build-records`` in ``manifest.json``, ``experiment transfer`` in ``state.json``). On a
rerun the step's current settings are hashed again: equal hashes mean the output can be
kept, different ones are described key by key with :func:`changed_settings`.
"""

from __future__ import annotations

import hashlib
import json


def hash_settings(settings: dict) -> str:
    """SHA-256 hex digest of a JSON-serialisable settings dict, independent of key order."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def changed_settings(old: dict, new: dict, ignore=()) -> list[str]:
    """``"key: old -> new"`` for each key of ``new`` whose value in ``old`` differs.

    Args:
        old: the settings stored with the earlier output.
        new: the current settings.
        ignore: keys left out (settings that do not change the output).

    Returns:
        One entry per changed key, in key order; empty when none differs.
    """
    keys = sorted(k for k in new if k not in ignore and old.get(k) != new[k])
    return [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in keys]
