"""The sample job: its settings, prompt inputs and the sampling of requests into a folder."""
