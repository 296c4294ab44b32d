"""BentoML serving: ``backbone.py`` is the batched embedding runner, ``api.py`` the public API.

``models.py`` decides which model versions to serve (the MLflow registry's champion, or the
copy bundled into a Bento) and follows the champion alias while the service runs.
"""
