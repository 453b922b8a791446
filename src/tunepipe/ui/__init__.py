"""`tunepipe ui`: a local web dashboard over a runs folder (server.py; the page is static/)."""
