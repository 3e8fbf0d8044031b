"""Command-line entry points; each module parses arguments, calls the library and prints."""
