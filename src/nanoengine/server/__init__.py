"""`nanoengine serve`: the shared app and its guard, LLM Engine's routes, the OpenAI routes."""
