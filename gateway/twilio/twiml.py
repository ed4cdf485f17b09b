"""TwiML the gateway answers or redirects a call with: pure builders over twilio's
`VoiceResponse`, so what Twilio is told to do is in one place and quoting is twilio's.

* `connect_stream_twiml`: answer a call with its media stream (the voice webhook), and
  the `<Connect action>` Twilio asks when that stream ends.
* `end_twiml`: nothing more: the call ends (the action of a call whose stream is over).
* `busy_twiml`: turn a call away (draining, at capacity, a replayed webhook).
* `dial_twiml`: hand a call to a number or SIP address (a transfer's redirect), with
  `whisper_url` pointing the person who answers at `whisper_twiml`, the summary said
  before the caller is connected (a warm transfer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlencode

from twilio.twiml.voice_response import Connect, Dial, Parameter, Stream, VoiceResponse

#: What the person taking a transfer hears, at most (a URL carries it).
MAX_SUMMARY_CHARS = 600
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


def connect_stream_twiml(
    stream_url: str, parameters: Mapping[str, str], action: str = "", status_callback: str = ""
) -> str:
    """TwiML answering a call with a bidirectional ``<Connect><Stream>``.

    ``parameters`` arrive back in the stream's ``start.customParameters``. With ``action``,
    Twilio requests that URL once the stream's WebSocket is closed and runs the TwiML it
    answers: the call can go on with another stream instead of ending. With
    ``status_callback``, Twilio reports the stream's ``stream-started``, ``stream-stopped``
    and ``stream-error`` there (POST).
    """
    callback = {"status_callback": status_callback, "status_callback_method": "POST"}
    stream = Stream(url=stream_url, **(callback if status_callback else {}))
    for name, value in parameters.items():
        stream.append(Parameter(name=name, value=value))
    connect = Connect(action=action) if action else Connect()
    connect.append(stream)
    response = VoiceResponse()
    response.append(connect)
    return str(response)


def end_twiml() -> str:
    """An empty ``<Response/>``: nothing more to do, so Twilio ends the call."""
    return str(VoiceResponse())


def busy_twiml() -> str:
    """TwiML refusing a call with a busy signal (e.g. at capacity); the call is not billed."""
    response = VoiceResponse()
    response.reject(reason="busy")
    return str(response)


def dial_twiml(target: str, whisper_url: str = "") -> str:
    """TwiML handing the call to a number or SIP address.

    With `whisper_url` the person who answers first hears the TwiML served there (the
    gateway's `/twilio/whisper`: the model's summary), then the caller is connected.
    """
    response = VoiceResponse()
    dial = Dial()
    extra = {"url": whisper_url, "method": "POST"} if whisper_url else {}
    if target.lower().startswith("sip:"):
        dial.sip(target, **extra)
    else:
        dial.number(target, **extra)
    response.append(dial)
    return str(response)


def whisper_twiml(summary: str, language: str | None) -> str:
    """The whisper: the summary said to the person who answers (nothing if there is none)."""
    response = VoiceResponse()
    if summary.strip():
        if language and _LANGUAGE.match(language):
            response.say(summary, language=language)
        else:
            response.say(summary)
    return str(response)


def whisper_url(base: str, summary: str, language: str | None) -> str:
    """The whisper TwiML's URL: the summary rides in it (Twilio signs the whole URL), so
    whichever replica Twilio asks can answer."""
    query = {"summary": summary[:MAX_SUMMARY_CHARS]}
    if language:
        query["language"] = language
    return f"{base}?{urlencode(query)}"
