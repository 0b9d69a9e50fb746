"""The HTTP front: the OpenAI-compatible server (``nexusrt serve``)."""
