"""Twilio side: Media Streams protocol and webhooks. Knows nothing of Gemini."""
