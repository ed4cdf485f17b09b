"""A naive Twilio <-> Gemini Live bridge, the way vendor samples write it: for comparison only.

Per 20 ms caller frame: one ``json.loads``, one base64 decode, ``audioop.ulaw2lin`` and
``audioop.ratecv`` (8 -> 16 kHz, linear interpolation, no anti-alias filter), and one SDK
``send_realtime_input`` (the SDK validates and converts every message). Per model chunk: the
SDK's parsing, ``ratecv`` 24 -> 8 kHz, ``lin2ulaw``, base64 and ``json.dumps``. No batching, no
signature checks, no resumption, no marks; ``clear`` on barge-in. Never deploy this.

Run as ``python -m bench.naive_gateway`` with PORT, PUBLIC_URL, GEMINI_API_KEY (and, for the
emulator, GOOGLE_GEMINI_BASE_URL and SSL_CERT_FILE) in the environment. NAIVE_SEND=json writes
each frame's JSON straight to the SDK's socket instead of through ``send_realtime_input``: the
floor of a plain bridge on these libraries (aiohttp, websockets, TLS), for comparison.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import warnings
from typing import Any

from aiohttp import WSMsgType, web
from google import genai
from google.genai import types

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

CLIENT = web.AppKey("client", genai.Client)
MODEL = os.environ.get("GEMINI_MODEL", "gemini-3.8-live")
DIRECT_JSON = os.environ.get("NAIVE_SEND") == "json"


async def voice(request: web.Request) -> web.Response:
    host = os.environ["PUBLIC_URL"].split("://", 1)[1].rstrip("/")
    twiml = (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
        f'<Stream url="wss://{host}/twilio/media"/></Connect></Response>'
    )
    return web.Response(text=twiml, content_type="text/xml")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def media(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    client = request.app[CLIENT]
    config = types.LiveConnectConfig(response_modalities=[types.Modality.AUDIO])
    stream_sid = ""
    up_state: Any = None
    async with client.aio.live.connect(model=MODEL, config=config) as session:

        async def model_to_caller() -> None:
            down_state: Any = None
            while True:
                async for message in session.receive():
                    content = message.server_content
                    if content is None:
                        continue
                    if content.interrupted:
                        await ws.send_str(json.dumps({"event": "clear", "streamSid": stream_sid}))
                    if content.model_turn is None:
                        continue
                    for part in content.model_turn.parts or []:
                        if part.inline_data is None or not part.inline_data.data:
                            continue
                        pcm, down_state = audioop.ratecv(
                            part.inline_data.data, 2, 1, 24000, 8000, down_state
                        )
                        payload = base64.b64encode(audioop.lin2ulaw(pcm, 2)).decode()
                        out = {
                            "event": "media",
                            "streamSid": stream_sid,
                            "media": {"payload": payload},
                        }
                        await ws.send_str(json.dumps(out))

        reader = asyncio.create_task(model_to_caller())
        try:
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    break
                data = json.loads(msg.data)
                event = data.get("event")
                if event == "start":
                    stream_sid = data["start"]["streamSid"]
                elif event == "media":
                    ulaw = base64.b64decode(data["media"]["payload"])
                    pcm8 = audioop.ulaw2lin(ulaw, 2)
                    pcm16, up_state = audioop.ratecv(pcm8, 2, 1, 8000, 16000, up_state)
                    if DIRECT_JSON:
                        data = base64.urlsafe_b64encode(pcm16).decode()
                        blob = {"data": data, "mime_type": "audio/pcm;rate=16000"}
                        await session._ws.send(json.dumps({"realtime_input": {"audio": blob}}))
                    else:
                        await session.send_realtime_input(
                            audio=types.Blob(data=pcm16, mime_type="audio/pcm;rate=16000")
                        )
                elif event == "stop":
                    break
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    return ws


def main() -> None:
    app = web.Application()
    app[CLIENT] = genai.Client(api_key=os.environ["GEMINI_API_KEY"])
    app.add_routes(
        [
            web.post("/twilio/voice", voice),
            web.get("/twilio/media", media),
            web.get("/healthz", healthz),
        ]
    )
    web.run_app(app, host="127.0.0.1", port=int(os.environ["PORT"]), access_log=None, print=None)


if __name__ == "__main__":
    main()
