"""Serving: llama.cpp expert servers, the coordinator that fuses them token by token, chat and the
OpenAI-compatible endpoint."""
