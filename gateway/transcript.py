"""Call transcripts: one JSON Lines file per call, `<dir>/<CallSid>.jsonl`.

Each line is one object with `ts` (UTC wall clock, ISO 8601), `t` (seconds since the
call started, when the call is running) and `type`:

* `start` (persona, stream), `end` (outcome, counters), `status` (Twilio's status callback:
  how the call ended, appended even after `end`);
* `turn` with `speaker` (`caller` | `model`) and `text`: the Live API's transcription,
  gathered into whole turns (the service sends it in pieces);
* `greeting`, `dtmf` (`digit`), `interrupted` (the caller talked over the model),
  `reply_lost` (a reply in progress went with its connection), `reset` (the Live
  connection was replaced: `cause`, `gap_s`, `replayed_s`, `fresh`),
  `tool_call` (`name`, `args`) and `tool_result` (`name`, `ok`, `detail`).

Transcripts are off unless TRANSCRIPT_DIR is set. Writes are line-buffered appends: a
line is on disk when the event happened, and a crash loses at most the turn in progress.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

log = logging.getLogger(__name__)

Speaker = Literal["caller", "model"]
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def check_directory(directory: Path) -> None:
    """Make ``directory`` if need be and a file in it (removed at once); OSError if either
    fails. Run at start: a directory that cannot be written (a read-only root filesystem, as
    the image is run) would otherwise turn every call's transcript off, a warning a call."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
        pass


def transcript_path(directory: Path, call_sid: str) -> Path:
    """Where a call's transcript lives; the SID is reduced to safe file-name characters."""
    name = _UNSAFE.sub("_", call_sid)[:64] or "unknown"
    return directory / f"{name}.jsonl"


def _line(record: dict[str, Any]) -> str:
    stamped = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), **record}
    return json.dumps(stamped, ensure_ascii=False, separators=(",", ":")) + "\n"


def append_record(directory: Path, call_sid: str, record: dict[str, Any]) -> None:
    """Append one line to a call's transcript, e.g. from the status callback."""
    directory.mkdir(parents=True, exist_ok=True)
    with transcript_path(directory, call_sid).open("a", encoding="utf-8") as out:
        out.write(_line(record))


class CallTranscript:
    """Writes one call's transcript; `CallTranscript(None, ...)` writes nothing."""

    def __init__(self, directory: Path | None, call_sid: str) -> None:
        self.path = transcript_path(directory, call_sid) if directory is not None else None
        self._out: IO[str] | None = None
        self._started = time.monotonic()
        self._speaker: Speaker | None = None
        self._pieces: list[str] = []
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._out = self.path.open("a", encoding="utf-8", buffering=1)
            except OSError as exc:  # a full disk must not take the call down
                log.warning("transcript off for this call: %s", exc)
                self.path = None

    @property
    def enabled(self) -> bool:
        return self._out is not None

    def event(self, kind: str, **fields: Any) -> None:
        """Write one event line (after the turn in progress, so lines stay in order)."""
        if self._out is None:
            return
        self.flush_turn()
        self._write({"type": kind, **fields})

    def piece(self, speaker: Speaker, text: str) -> None:
        """A piece of transcription; pieces of one speaker make one `turn` line."""
        if self._out is None or not text:
            return
        if speaker != self._speaker:
            self.flush_turn()
            self._speaker = speaker
        self._pieces.append(text)

    def flush_turn(self, *, speaker: Speaker | None = None) -> None:
        """End the turn in progress (only `speaker`'s, if given) and write it."""
        if self._speaker is None or (speaker is not None and speaker != self._speaker):
            return
        text = "".join(self._pieces).strip()
        who = self._speaker
        self._speaker = None
        self._pieces = []
        if text:
            self._write({"type": "turn", "speaker": who, "text": text})

    def close(self, **fields: Any) -> None:
        """Write the `end` line and close the file."""
        if self._out is None:
            return
        self.event("end", **fields)
        out, self._out = self._out, None
        out.close()

    def _write(self, record: dict[str, Any]) -> None:
        assert self._out is not None
        record = {"t": round(time.monotonic() - self._started, 3), **record}
        try:
            self._out.write(_line(record))
        except OSError as exc:
            log.warning("transcript write failed: %s", exc)
