"""The `nanoengine` command."""
