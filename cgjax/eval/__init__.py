"""Evaluation: answer parsing, metrics (incl. coherence and calibration) and the HTML report.

``report`` (matplotlib) is imported on first use: ``from cgjax.eval import report``.
"""
from cgjax.eval.parser import (DEFAULT_SENTINELS, AnswerParser, LabelMatcher, ParsedAnswer, canonical, detect_mode,
                               extract_json, parse_answer, prompt_mode)
from cgjax.eval.metrics import (EvidenceLexicon, activation_metrics, calibration_metrics, classification_metrics,
                                coherence, compare, comparison_rows, coverage, evaluate, expected_calibration_error,
                                explanation_coverage, label_vocabs, match_records, multi_label_all_correct,
                                reliability_bins)

__all__ = [
    "DEFAULT_SENTINELS", "AnswerParser", "LabelMatcher", "ParsedAnswer", "canonical", "detect_mode", "extract_json",
    "parse_answer", "prompt_mode",
    "EvidenceLexicon", "activation_metrics", "calibration_metrics", "classification_metrics", "coherence", "compare",
    "comparison_rows", "coverage", "evaluate", "expected_calibration_error", "explanation_coverage", "label_vocabs",
    "match_records", "multi_label_all_correct", "reliability_bins",
]
