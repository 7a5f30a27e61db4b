"""rearec: ReaRec (Think Before Recommend) — model, objectives, data, training, evaluation, engine."""
from rearec.config import ReaRecConfig
from rearec.engine import FastReaRec
from rearec.inputs import Recommendations
from rearec.model import ReaRec

__all__ = ["FastReaRec", "ReaRec", "ReaRecConfig", "Recommendations"]
