"""Stand-ins for the Live API and for Twilio, used by the tests, the demo and the benchmark."""
