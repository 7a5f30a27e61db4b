"""rearec: ReaRec (Think Before Recommend) — model, objectives, data, training, evaluation, engine."""
from rearec.config import ReaRecConfig
from rearec.model import ReaRec, Recommendations

__all__ = ["ReaRec", "ReaRecConfig", "Recommendations"]
