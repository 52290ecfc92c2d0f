"""Thin Prefect flows and deployments wiring liverpipe and storage calls into tasks.

Flows hold parameters, task wiring, retries and artifacts only; no image maths.
"""

__all__: list[str] = []
