"""The embedded default: model import from the bundled GGUF file and synthetic skills data."""
