"""The LLM proxy: agents in workspaces call it instead of the model provider (docs/llm-proxy.md)."""
