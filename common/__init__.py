"""Neutral code both sides import: the site-boundary protocol. Imports neither client nor server."""
