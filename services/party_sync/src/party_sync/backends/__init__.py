"""Where party state and the event stream live: ``memory`` (embedded default) and ``redis``."""
