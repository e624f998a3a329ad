"""The safety list: video ids and tags that must never be recommended, from a YAML file reloaded when it
changes (content moderation edits it; the service picks the edit up without a restart).

    blocked_videos: [v0000123, v0000456]
    blocked_tags: [gore, scam]

A file that cannot be read or parsed when it changes keeps the previous list in force (and says so in the
log) rather than unblocking everything: failing open would be the unsafe direction. At start-up a broken
file is an error.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SafetyRules:
    """One version of the list; `version` changes whenever the content does (masks are cached by it)."""

    blocked_videos: frozenset[str] = frozenset()
    blocked_tags: frozenset[str] = frozenset()
    version: int = 0

    def blocks(self, video_id: str, tags: frozenset[str] | set[str]) -> bool:
        return video_id in self.blocked_videos or not self.blocked_tags.isdisjoint(tags)


def _strings(raw: object, key: str, path: Path) -> frozenset[str]:
    if raw is None:
        return frozenset()
    if not isinstance(raw, list):
        raise ValueError(f"{path}: {key} must be a list, got {type(raw).__name__}")
    return frozenset(str(v).strip() for v in raw if str(v).strip())


def read_rules(path: Path, version: int) -> SafetyRules:
    """Parse the YAML file at `path` (a missing file is an empty list)."""
    if not path.exists():
        return SafetyRules(version=version)
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with blocked_videos and blocked_tags")
    unknown = set(data) - {"blocked_videos", "blocked_tags"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}")
    return SafetyRules(
        _strings(data.get("blocked_videos"), "blocked_videos", path),
        _strings(data.get("blocked_tags"), "blocked_tags", path),
        version,
    )


class SafetyList:
    """The current `SafetyRules` of a file, re-read when its modification time or size changes.

    `rules()` is called on every request: it stats the file at most once per `check_seconds`, so the hot
    path pays a clock read, not a system call.
    """

    def __init__(self, path: Path, check_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.check_seconds = check_seconds
        self._lock = threading.Lock()
        # The first read must succeed: starting with an empty list because the file is broken would
        # serve blocked videos.
        self._stamp = self._file_stamp()
        self._rules = read_rules(self.path, 1)
        self._checked = time.monotonic()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def _reload(self) -> None:
        stamp = self._file_stamp()
        self._checked = time.monotonic()
        if stamp == self._stamp:
            return
        try:
            self._rules = read_rules(self.path, self._rules.version + 1)
        except (OSError, ValueError, yaml.YAMLError) as err:
            log.error("safety list %s not reloaded, the previous one stays in force: %s", self.path, err)
        self._stamp = stamp

    def rules(self) -> SafetyRules:
        if time.monotonic() - self._checked >= self.check_seconds:
            with self._lock:
                if time.monotonic() - self._checked >= self.check_seconds:
                    self._reload()
        return self._rules
