"""The request side: `Completion`, the `load()` handle, the parameters and their checks, response types, chat, output processing."""
