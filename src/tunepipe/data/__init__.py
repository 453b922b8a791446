"""Data: sources, format detection and conversion, validation, chat templates and loss masks, statistics."""
