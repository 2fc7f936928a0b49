"""API keys and the identity a request acts as."""
