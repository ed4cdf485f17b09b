"""Telephony voice-bot gateway: Twilio Media Streams to Gemini Live."""
