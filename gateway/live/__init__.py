"""Gemini Live session manager. Knows nothing of Twilio."""
