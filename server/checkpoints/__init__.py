"""Checkpoints: built-in models and their conversion from CTranslate2 (never used while serving)."""
