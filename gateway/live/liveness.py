"""When a Live connection counts as alive: anything received lately, not a pong in time.

The websockets client under the SDK closes a connection whose pong comes later than its
``ping_timeout`` (20 s by default; 1011 "keepalive ping timeout"), whatever else arrives. The
Live service's pongs have been measured at 8-30 s (aicc2025/sip-to-ai#14,
``/work/shared/live-service-notes.md``) while its messages flow: that keepalive would reset
healthy connections, so the gateway turns it off (``ping_interval=None`` through
``HttpOptions.async_client_args``; `gateway.live.sdk` checks at start that the SDK passes it
on) and decides itself, from any traffic:

- every message the connection delivers (audio, transcripts, handle updates, goAway) and
  every pong, however late, counts as heard;
- the gateway pings every :attr:`Liveness.interval` (``PING_INTERVAL_S``, or a quarter of
  the stall limit if that is shorter), so a healthy connection that has nothing to say still
  answers now and then;
- nothing heard for ``stall_s`` (``LIVE_STALL_S``, 45 s): the connection is stalled and
  treated as lost (resumed on a new one, the caller's audio meanwhile held for replay).

A healthy silent connection is heard at least every ping interval plus the pong's delay
(5 + 30 s with the latest pongs reported), so 45 s does not cut one; a connection that stops
delivering anything is cut 45 s after the last thing it sent. A connection that dies at the
TCP level (a reset, a close) is noticed at once, as before. A path that dies without a word
(a route or a NAT entry gone) leaves what the gateway wrote unacknowledged: the kernel ends
the connection once anything written has waited ``UNACKED_S`` for the service's side to
acknowledge it (``TCP_USER_TIMEOUT``, Linux; `gateway.live.sdk.TimedSocket`), and with a ping
every 5 s something always has: such a path is noticed within 5 + 15 s. An acknowledgement
comes from the service's TCP end however late its pongs, so this cuts no slow service.
"""

from __future__ import annotations

__all__ = ["PING_INTERVAL_S", "PROMPT_PONG_S", "UNACKED_S", "Liveness"]

PING_INTERVAL_S = 5.0
#: Written to the Live connection and not acknowledged by the service's side this long: the
#: path is dead (the socket's TCP_USER_TIMEOUT).
UNACKED_S = 15.0
#: A pong later than this measures the service's pong handling, not the network: it proves
#: the connection alive but gives no round trip (handles are then placed from the setup's).
PROMPT_PONG_S = 2.0


class Liveness:
    """One connection's last sign of life (``heard``, set by its reader on every message and
    by every pong) against its stall limit."""

    __slots__ = ("heard", "stall_s")

    def __init__(self, now: float, stall_s: float) -> None:
        self.heard = now
        self.stall_s = stall_s

    @property
    def interval(self) -> float:
        """How often to ping (and check): a few times within the stall limit."""
        return min(PING_INTERVAL_S, self.stall_s / 4)

    def stalled(self, now: float) -> bool:
        """Nothing at all heard for ``stall_s``."""
        return now - self.heard > self.stall_s
