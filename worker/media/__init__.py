"""Untrusted bytes to native crops: fetching, safe decoding, the one crop implementation."""
