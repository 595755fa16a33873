"""API keys, encrypted secrets and the path rules for requests from the network."""
