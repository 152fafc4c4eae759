"""Offline tools that run in the user's own process, with no server: the public PyTorch extractor, the
``extract`` command and ``export``.
"""
