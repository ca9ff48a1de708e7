"""The HTTP service: ``create_app(settings)`` in ``app.main``; ``python -m app`` starts it."""
