"""Routing for models tread did not build: :mod:`tread.integrations.diffusers`.

Nothing here is imported by ``import tread``; each integration imports only what it needs.
"""
