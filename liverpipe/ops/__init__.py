"""Operating the models over time: the model registry with champion promotion, the
ingest inbox ledger, and the DICOMweb PACS inbox.
"""

from __future__ import annotations

from liverpipe.ops.inbox import (
    LEDGER,
    STATE,
    Ledger,
    Pending,
    TickState,
    begin_tick,
    champion,
    champion_predictor,
    inbox_cases,
    predict_pending,
    to_predict,
    unlabelled_scans,
)
from liverpipe.ops.pacs import (
    PACS_LEDGER,
    Pacs,
    PacsError,
    PacsLedger,
    PollResult,
    RemoteSeries,
    poll_pacs,
    series_to_predict,
)
from liverpipe.ops.promotion import (
    challenge,
    champion_models,
    frozen_cases,
    require_runs,
    rollback,
    score,
)
from liverpipe.ops.registry import ENSEMBLE, REGISTRY, Decision, Registry, judge

__all__ = [
    "ENSEMBLE",
    "LEDGER",
    "PACS_LEDGER",
    "REGISTRY",
    "STATE",
    "Decision",
    "Ledger",
    "Pacs",
    "PacsError",
    "PacsLedger",
    "Pending",
    "PollResult",
    "Registry",
    "RemoteSeries",
    "TickState",
    "begin_tick",
    "challenge",
    "champion",
    "champion_models",
    "champion_predictor",
    "frozen_cases",
    "inbox_cases",
    "judge",
    "poll_pacs",
    "predict_pending",
    "require_runs",
    "rollback",
    "score",
    "series_to_predict",
    "to_predict",
    "unlabelled_scans",
]
