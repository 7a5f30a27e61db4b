"""rearec: ReaRec (Think Before Recommend) — model, objectives, data, training, evaluation, engine."""
from rearec.config import ReaRecConfig
from rearec.engine import FastReaRec
from rearec.model import ReaRec, Recommendations

__all__ = ["FastReaRec", "ReaRec", "ReaRecConfig", "Recommendations"]
